"""The offline guard zoo: real text from PyPI archives and fine-tuned MiniLM guards (see DATA.md)."""
