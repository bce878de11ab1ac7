"""Modules imported on first use.

``from hm3._lazy import torch`` gives a stand-in that imports torch the first time one of its
attributes is read, then serves every attribute from torch itself. The modules a plain ``hm3 merge``
runs through (config, io, heads, the merge engine and its methods) use it instead of ``import torch``,
so a merge that never needs torch (``hm3.merging.numpy_engine``) does not pay its ~0.8 s import.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """A module imported when an attribute is first read. After that import the module's namespace
    is copied onto the stand-in, so later reads are plain attribute lookups."""

    def __init__(self, name: str):
        self.__dict__["_lazy_name"] = name

    def _load(self) -> ModuleType:
        module = importlib.import_module(self.__dict__["_lazy_name"])
        self.__dict__.update(vars(module))
        return module

    def __getattr__(self, attr: str):  # only called for names not (yet) on the stand-in
        return getattr(self._load(), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__dict__['_lazy_name']!r}>"


torch = LazyModule("torch")
