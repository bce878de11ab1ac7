"""One exception type for everything the user can fix.

The CLI prints ``error: <message>`` on one line and exits with code 2; the message must say what was
wrong, where (file, key, tensor) and how to fix it.
"""


class HM3Error(Exception):
    """A user-facing error: bad input, bad config, incompatible checkpoints."""


#: the help of every command's ``--force`` (``hm3.io.prepare_output`` says why it refuses)
FORCE_HELP = "Replace an existing output directory: an empty one or a model directory, never other files."
