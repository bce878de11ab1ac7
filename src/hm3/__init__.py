"""hm3: merge text classifiers with different label sets into one model (arXiv 2409.19173).

    import hm3
    hm3.merge("recipe.yaml", "merged/")          # or a dict / hm3.MergeConfig
    clf = hm3.load("merged/")
    clf.predict(["some text"])                    # per text, per group: label and scores
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["merge", "load", "MergeConfig", "HM3Error", "LabelSpace", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from hm3.config import MergeConfig
    from hm3.errors import HM3Error
    from hm3.labels import LabelSpace
    from hm3.merging.engine import merge
    from hm3.model import load


def __getattr__(name: str):
    # Lazy imports: `import hm3` and `hm3 --help` stay fast; torch/transformers load on first use.
    if name == "merge":
        from hm3.merging.engine import merge

        return merge
    if name == "load":
        from hm3.model import load

        return load
    if name == "MergeConfig":
        from hm3.config import MergeConfig

        return MergeConfig
    if name == "HM3Error":
        from hm3.errors import HM3Error

        return HM3Error
    if name == "LabelSpace":
        from hm3.labels import LabelSpace

        return LabelSpace
    raise AttributeError(f"module 'hm3' has no attribute {name!r}")
