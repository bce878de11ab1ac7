"""The compiled merge loops (``_native.c``), loaded with ctypes: one pass over a tensor's inputs for
the task-arithmetic family instead of ~20 numpy calls per element and model (issue 6).

Optional. ``pip install`` builds them where a C compiler exists (setup.py); without one, or with
``HM3_NATIVE=0``, ``available()`` is False and every merge runs ``hm3.merging.kernels``' numpy code.
Either way the results are the same bits: the C loops do kernels' float32 operations in kernels'
order (``tests/test_native.py`` compares them on every option they take). What they take is what
``hm3.merging.streamed`` takes (``streamed.unsupported``), in float32, with up to ``MAX_MODELS``.

The calls release the GIL (ctypes), so two merge workers run on two cores.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from hm3.merging import kernels

MAX_MODELS = 32  # _native.c's HM3_MAX_MODELS
_F32 = np.dtype(np.float32)


class _Model(ctypes.Structure):
    _fields_ = [
        ("src", ctypes.c_void_p),
        ("bits", ctypes.c_void_p),
        ("tie_from", ctypes.c_int64),
        ("thr", ctypes.c_float),
        ("inverse", ctypes.c_float),
        ("factor", ctypes.c_float),
        ("weight", ctypes.c_float),
        ("mode", ctypes.c_int32),
        ("unused", ctypes.c_int32),
    ]


class _Args(ctypes.Structure):
    _fields_ = [
        ("n", ctypes.c_int64),
        ("base", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("models", ctypes.POINTER(_Model)),
        ("nm", ctypes.c_int32),
        ("src_is_delta", ctypes.c_int32),
        ("linear", ctypes.c_int32),
        ("consensus", ctypes.c_int32),
        ("normalize", ctypes.c_int32),
        ("has_lambda", ctypes.c_int32),
        ("total", ctypes.c_float),
        ("lambda_", ctypes.c_float),
    ]


def library_path() -> Path | None:
    """The built ``_native`` library beside this module, or None (not built)."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / f"_native{suffix}"
        if p.is_file():
            return p
    return None


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    if os.environ.get("HM3_NATIVE", "1").strip() == "0":
        return None
    path = library_path()
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    i64, vp, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.hm3_merge.argtypes = [ctypes.POINTER(_Args), i64, i64]
    lib.hm3_merge.restype = ctypes.c_int
    lib.hm3_bracket.argtypes = [i64, vp, vp, f32, f32, i64, vp, vp, vp, i64]
    lib.hm3_bracket.restype = i64
    lib.hm3_bracket_portable.argtypes = lib.hm3_bracket.argtypes
    lib.hm3_bracket_portable.restype = i64
    lib.hm3_dare_block.argtypes = [i64, vp, vp, vp, ctypes.c_int16, vp, vp, vp]
    lib.hm3_dare_block.restype = None
    lib.hm3_sfc64_fill.argtypes = [vp, vp, i64]
    lib.hm3_sfc64_fill.restype = None
    lib.hm3_keep_bits.argtypes = [i64, vp, ctypes.c_int16, vp]
    lib.hm3_keep_bits.restype = None
    lib.hm3_keep_bits_portable.argtypes = lib.hm3_keep_bits.argtypes
    lib.hm3_keep_bits_portable.restype = None
    return lib


def available() -> bool:
    """Whether the compiled loops are built and enabled (``HM3_NATIVE=0`` turns them off)."""
    return _lib() is not None


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _flat32(a: np.ndarray) -> np.ndarray:
    if a.dtype != _F32 or not a.flags.c_contiguous:
        raise ValueError("the compiled loops take C-contiguous float32 arrays")
    return a.reshape(-1)


def bracket(src: np.ndarray, base: np.ndarray | None, lo: float, hi: float, block: int, *, portable: bool = False
            ) -> tuple[np.ndarray, int, np.ndarray]:
    """``kernels._bracket``'s scan over ``|src - base|`` (``|src|`` without ``base``): the values in
    ``[lo, hi]`` in memory order, how many lie below ``lo``, and how many of them each block of
    ``block`` elements holds. AVX2 where the CPU has it (``portable``: the plain C loop)."""
    lib = _lib()
    scan = lib.hm3_bracket_portable if portable else lib.hm3_bracket
    s = _flat32(src)
    b = None if base is None else _flat32(base)
    n = s.size
    counts = np.empty(max(1, -(-n // block)), dtype=np.int64)
    below = ctypes.c_int64(0)
    cap = n // 16 + 1024  # the bracket is ~1.6-6.5% of the values; a miss is scanned again with room
    while True:
        inside = np.empty(min(n, cap), dtype=np.float32)
        got = scan(n, _ptr(s), _ptr(b), float(lo), float(hi), block, ctypes.addressof(below), _ptr(counts),
                   _ptr(inside), inside.size)
        if got <= inside.size:
            return inside[:got], int(below.value), counts
        cap = got


def dare_block(src: np.ndarray, base: np.ndarray | None, r16: np.ndarray, below: int, bits: np.ndarray,
               rows: np.ndarray | None = None) -> None:
    """``streamed._bits``' work on one block: its keep bits (``r16 < below``, packed into ``bits``)
    and, with ``rows`` (``(2, rows)`` float32 views), the l1 rescale's row sums of ``|x|`` and
    ``|keep·x|`` in ``kernels.row_sums``' order. ``x = src - base`` (``src`` without ``base``); the
    block starts at a multiple of ``kernels.SUM_CHUNK``."""
    s = _flat32(src)
    r = np.ascontiguousarray(r16, dtype=np.int16)
    if r.size < s.size or bits.size * 8 < s.size:
        raise ValueError("draws or bits shorter than the block")
    rx = rkx = None
    if rows is not None:
        rx, rkx = rows[0], rows[1]
        if not (rx.flags.c_contiguous and rkx.flags.c_contiguous and rx.dtype == _F32 and rkx.dtype == _F32):
            raise ValueError("row sums go into contiguous float32 rows")
    _lib().hm3_dare_block(s.size, _ptr(s), _ptr(None if base is None else _flat32(base)), _ptr(r), int(below),
                          _ptr(bits), _ptr(rx), _ptr(rkx))


class Draws:
    """``kernels.draws(rng, count)`` for a stream of blocks, twice as fast where ``rng``'s bit
    generator is numpy's ``SFC64`` (0.95 vs 1.95 ns per draw on the session-25 VM): the same values
    from the compiled generator, into one reused buffer. The generator's state is read once and
    written back by ``close()`` (or leaving the ``with``), so ``rng`` then continues exactly where
    ``random_raw`` would have left it. Any other bit generator: numpy's own draws."""

    def __init__(self, rng: np.random.Generator, largest: int):
        self.rng = rng
        self.state = None
        bg = rng.bit_generator
        if _lib() is not None and type(bg) is np.random.SFC64:
            self.full = bg.state
            self.state = np.array(self.full["state"]["state"], dtype=np.uint64)
            self.buf = np.empty(max(1, largest), dtype=np.uint64)

    def __call__(self, count: int) -> np.ndarray:
        """The next ``count`` draws as int64 (valid until the next call)."""
        if self.state is None:
            return kernels.draws(self.rng, count)
        if count > self.buf.size:
            raise ValueError(f"{count} draws asked of a buffer of {self.buf.size}")
        _lib().hm3_sfc64_fill(_ptr(self.state), _ptr(self.buf), count)
        return self.buf[:count].view(np.int64)

    def close(self) -> None:
        if self.state is not None:
            self.full["state"]["state"] = self.state.copy()
            self.rng.bit_generator.state = self.full
            self.state = None

    def __enter__(self) -> "Draws":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def keep_bits(r16: np.ndarray, below: int, *, portable: bool = False) -> np.ndarray:
    """DARE's keep bits on their own: ``r16 < below`` packed little-endian (``np.packbits(...,
    bitorder="little")``), as ``dare_block`` makes them. AVX2 where the CPU has it (``portable``:
    the plain C loop)."""
    lib = _lib()
    r = np.ascontiguousarray(r16, dtype=np.int16).reshape(-1)
    bits = np.empty((r.size + 7) // 8, dtype=np.uint8)
    (lib.hm3_keep_bits_portable if portable else lib.hm3_keep_bits)(r.size, _ptr(r), int(below), _ptr(bits))
    return bits


def merge(base: np.ndarray, srcs: Sequence[np.ndarray], *, deltas: bool, weights: Sequence[float],
          thresholds: Sequence[tuple[float, int] | None] | None = None,
          bits: Sequence[np.ndarray | None] | None = None, inverse: Sequence[float | None] | None = None,
          factors: Sequence | None = None, linear: bool = False, consensus: str | None = None,
          normalize: bool = False, total: float = 1.0, lambda_: float = 1.0) -> np.ndarray:
    """One tensor merged in one pass (``_native.c``'s ``hm3_merge``): each model's ``x_i`` (``srcs[i]``
    if ``deltas``, else ``srcs[i] - base``), its mask (``thresholds[i]`` = ``(t, tie_from)``: TIES'
    ``|x| >= t`` without the ties from position ``tie_from`` on; or ``bits[i]``, DARE's packed keep
    bits), ``/ inverse[i]``, ``* factors[i]``, ``* weights[i]``; then ``kernels.combine``'s election
    (``consensus`` "sum"/"count"), sum, division, λ and base — or ``kernels.linear`` (``linear``).
    A new float32 array of ``base``'s shape."""
    lib = _lib()
    nm = len(srcs)
    if not 1 <= nm <= MAX_MODELS:
        raise ValueError(f"the compiled loops merge 1 to {MAX_MODELS} models, got {nm}")
    b = _flat32(base)
    out = np.empty(base.shape, dtype=np.float32)
    o = out.reshape(-1)
    flat = [_flat32(s) for s in srcs]
    if any(f.size != b.size for f in flat):
        raise ValueError("the compiled loops need inputs and output of one size")
    models = (_Model * nm)()
    keep_alive = []
    for i, f in enumerate(flat):
        m = models[i]
        m.src, m.weight, m.factor, m.inverse, m.mode, m.tie_from = f.ctypes.data, weights[i], 1.0, 0.0, 0, 0
        if factors is not None and factors[i] is not None:
            m.factor = float(factors[i])
        if inverse is not None and inverse[i] is not None:
            m.inverse = float(inverse[i])
        if thresholds is not None and thresholds[i] is not None:
            m.mode, (m.thr, m.tie_from) = 1, thresholds[i]
        elif bits is not None and bits[i] is not None:
            bi = np.ascontiguousarray(bits[i], dtype=np.uint8)
            if bi.size * 8 < b.size:
                raise ValueError("keep bits shorter than the tensor")
            keep_alive.append(bi)
            m.mode, m.bits = 2, bi.ctypes.data
    args = _Args(n=b.size, base=b.ctypes.data, out=o.ctypes.data, models=models, nm=nm, src_is_delta=int(deltas),
                 linear=int(linear), consensus={None: 0, "sum": 1, "count": 2}[consensus],
                 normalize=int(normalize), has_lambda=int(lambda_ != 1), total=float(total), lambda_=float(lambda_))
    if lib.hm3_merge(ctypes.byref(args), 0, b.size) != 0:
        raise RuntimeError("hm3_merge refused its arguments")
    return out
