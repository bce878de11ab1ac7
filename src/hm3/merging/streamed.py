"""One tensor's merge read where its inputs lie, block by block: no task vectors in memory (issue 6).

``kernels.merge`` takes whole task vectors: the numpy engine first writes the ``N`` task vectors of a
tensor into a scratch buffer, and TIES writes a trimmed copy of each, so a word-embedding matrix
costs ``2N`` arrays of ~90 MB, each a pass over memory, and in a new process a page fault per fresh
page. Here the inputs are the maps of the checkpoint files, read twice, block by block
(``kernels.blocks``), and every step of a block runs while it is in cache:

1. what each model keeps, model by model: TIES' threshold by ``kernels.select`` over ``|w - b|``
   computed a block at a time (the ties it drops too), or DARE's random bits, drawn from the
   tensor's generator in ``kernels.bernoulli_parts``' order and kept packed (1 bit an element),
   with the l1 norms of its rescale summed in ``kernels.fixed_sum``'s order;
2. the merge: ``kernels.combine`` (or ``kernels.linear``) over ``TaskVector`` sources, each of which
   computes a model's kept task vector for the block it is asked for.

The same bits as ``kernels.merge`` on the stacked task vectors (``tests/test_streamed.py``), since
every element goes through the same float32 operations in the same order. What it does not take
(TIES with a rescale, DARE's l2 / linf rescale, a density of 0 or below, no base, head rows) the
numpy engine merges as before (``unsupported`` says why).

Where the compiled loops are built (``hm3.merging.native``), step 2 is one C pass over the inputs
and step 1's bracket scan too; else numpy's block-wise calls. The same bits either way
(``tests/test_native.py``). ``merge(..., deltas=True)`` takes task vectors instead of models (the
search's in-memory engine and the torch methods: ``kernels.generalized_task_arithmetic``).
"""

from __future__ import annotations

import numpy as np

from hm3.merging import kernels, native
from hm3.merging.kernels import BLOCK, Rescale, Sparsify, blocks


def unsupported(method: str, p, has_base: bool) -> str | None:
    """Why ``merge`` does not take this tensor's merge (``kernels.merge`` then does), or None."""
    if not has_base:
        return "no base model"
    if method == "linear":
        return None
    if method not in kernels.GTA_METHODS:
        return f"method {method!r}"
    sparsify, consensus = kernels.GTA_METHODS[method]
    if consensus and p.consensus not in ("sum", "count"):
        return f"consensus {p.consensus!r}"
    if sparsify is not None and any(d <= 0 for d in p.density):
        return "a density of 0 or below"
    if sparsify is Sparsify.magnitude and p.rescale is not None:
        return "TIES with a rescale"
    if sparsify is Sparsify.random and p.rescale not in (None, Rescale.inverse, Rescale.l1):
        return f"DARE's {p.rescale.value} rescale"
    return None


class TaskVector:
    """Model ``i``'s kept task vector of one tensor, a block at a time: ``tv[b]`` is ``S(w - base)``
    (``S(w)`` when ``base`` is None: ``w`` is the task vector) over block slice ``b`` in a buffer of
    its own (the caller may change it; the next block overwrites it). ``S``: nothing dropped; TIES'
    ``|x| >= t`` with the ties in ``drop`` dropped; or DARE's packed ``bits``, then its inverse rescale."""

    dtype = np.dtype(np.float32)

    def __init__(self, w: np.ndarray, base: np.ndarray | None, key: object, *, t: float | None = None,
                 drop: np.ndarray | None = None, bits: np.ndarray | None = None, inverse: float | None = None):
        self.w, self.base, self.t, self.drop, self.bits, self.inverse = w, base, t, drop, bits, inverse
        width = min(w.size, BLOCK)
        self._out = kernels.scratch(("streamed", key), width, np.float32)
        self._mask = kernels.scratch("streamed mask", width, np.float32) if t is not None or bits is not None else None

    def __getitem__(self, b: slice) -> np.ndarray:
        m = b.stop - b.start
        x = _task_vector(self.w, self.base, b, self._out[:m])
        if self.t is not None:  # kernels.magnitude: 1.0 where |x| >= t, the dropped ties 0, times x
            mask = np.greater_equal(np.abs(x, out=self._mask[:m]), self.t, out=self._mask[:m])
            if self.drop is not None and self.drop.size:
                lo, hi = np.searchsorted(self.drop, (b.start, b.stop))
                mask[self.drop[lo:hi] - b.start] = 0
            np.multiply(mask, x, out=x)
        elif self.bits is not None:  # kernels.bernoulli_parts: keep * x
            keep = np.unpackbits(self.bits[b.start // 8: (b.stop + 7) // 8], count=m, bitorder="little")
            mask = self._mask[:m]
            np.copyto(mask, keep)  # 1.0 / 0.0
            np.multiply(mask, x, out=x)
        if self.inverse is not None:
            np.divide(x, self.inverse, out=x)
        return x


def _task_vector(w: np.ndarray, b: np.ndarray | None, s, out: np.ndarray) -> np.ndarray:
    """``w[s] - b[s]`` (``w[s]`` itself when ``b`` is None: ``w`` holds task vectors) into ``out``."""
    if b is None:
        np.copyto(out, w[s])
        return out
    return np.subtract(w[s], b[s], out=out)


def _magnitude(w: np.ndarray, b: np.ndarray | None, density: float) -> tuple[float, np.ndarray | None]:
    """TIES: the threshold of ``|w - b|`` (``|w|`` without ``b``) and the ties it drops
    (``kernels.magnitude``'s kept set)."""
    n = w.size
    buf = kernels.scratch("streamed |x|", min(n, BLOCK), np.float32)

    def values(s: slice) -> np.ndarray:
        a = buf[: s.stop - s.start]
        return np.abs(_task_vector(w, b, s, a), out=a)

    scan = (lambda lo, hi: native.bracket(w, b, lo, hi, BLOCK)) if native.available() else None
    t, _, drop = kernels.select(n, kernels.keep_count(density, n), values, ties=True, scan=scan,
                                gather=lambda at: np.abs(w[at] if b is None else np.subtract(w[at], b[at])))
    return t, drop


def _bits(w: np.ndarray, b: np.ndarray | None, density: float, rescale, rng) -> tuple[np.ndarray | None, object]:
    """DARE: ``(packed keep bits or None: all kept, the l1 rescale factor or None)``, from the draws
    ``kernels.bernoulli_parts`` makes of ``rng`` (the same calls in the same order). ``b`` None:
    ``w`` is the task vector."""
    n = w.size
    q = round(density * (1 << 16))
    if q >= 1 << 16:  # within 2^-17 of 1: keep all, no draw (an l1 factor would be 1)
        return None, None
    below = q - (1 << 15)  # kernels.bernoulli_parts: keep where the int16 is below this
    bits = np.empty((n + 7) // 8, dtype=np.uint8)
    fast = native.available()  # else numpy's calls, block by block
    l1 = rescale is Rescale.l1
    if l1:
        sums = np.empty((2, kernels._rows(n)), dtype=np.float32)  # rows of |x|, of |keep * x|
    if not fast:
        keep = kernels.scratch("streamed keep", min(n, BLOCK), bool)
        if l1:
            x = kernels.scratch("streamed x", min(n, BLOCK), np.float32)
            kx = kernels.scratch("streamed kx", min(n, BLOCK), np.float32)
    with native.Draws(rng, (min(n, BLOCK) + 3) // 4) as draws:  # kernels.draws' values (compiled: faster)
        for s in blocks(n):  # BLOCK is a multiple of 8 and of SUM_CHUNK: a block's bits and rows start whole
            m = s.stop - s.start
            r16 = draws((m + 3) // 4).view(np.int16)[:m]
            rows = slice(s.start // kernels.SUM_CHUNK, s.start // kernels.SUM_CHUNK + kernels._rows(m))
            packed = bits[s.start // 8: (s.stop + 7) // 8]
            if fast:
                native.dare_block(w[s], None if b is None else b[s], r16, below, packed,
                                  sums[:, rows] if l1 else None)
                continue
            packed[:] = np.packbits(np.less(r16, below, out=keep[:m]), bitorder="little")
            if l1:
                xb = _task_vector(w, b, s, x[:m])
                kb = np.multiply(np.less(r16, below, out=kx[:m]), xb, out=kx[:m])  # 1.0 / 0.0 times x, as there
                kernels.row_sums(np.abs(xb, out=xb), sums[0, rows])
                kernels.row_sums(np.abs(kb, out=kb), sums[1, rows])
    factor = kernels.norm_ratio(kernels.fixed_sum(sums[0]), kernels.fixed_sum(sums[1])) if l1 else None
    return bits, factor


# Overflow (a huge lambda) is not warned about here: the caller checks the result for NaN/inf.
@np.errstate(over="ignore", invalid="ignore")
def merge(method: str, base: np.ndarray, models: list[np.ndarray], p, rng: np.random.Generator | None, *,
          deltas: bool = False) -> np.ndarray:
    """``kernels.merge(method, base, stack(models) - base, p, rng)``, the same bits, without the
    task vectors in memory: ``base`` and ``models`` are float32 arrays of one shape (maps of the
    files); with ``deltas``, ``models`` are the task vectors themselves. A new float32 array.
    ``unsupported`` must say None."""
    shape = base.shape
    b = np.ascontiguousarray(base).reshape(-1)
    w = [np.ascontiguousarray(m).reshape(-1) for m in models]
    if not w or b.size == 0:
        return b.copy().reshape(shape)
    sub = None if deltas else b  # what a model's task vector is taken from
    fast = native.available() and len(w) <= native.MAX_MODELS
    if method == "linear":
        if fast:
            return native.merge(b, w, deltas=deltas, weights=p.weight, linear=True, normalize=p.normalize,
                                total=kernels.weight_total(p.weight, np.float32)).reshape(shape)
        return kernels.linear(b, [TaskVector(wi, sub, i) for i, wi in enumerate(w)], p).reshape(shape)
    sparsify, consensus = kernels.GTA_METHODS[method]
    sources, factors, thresholds, keep, inverse = [], [], [], [], []
    for i, wi in enumerate(w):  # model by model: DARE's draws come in kernels' order
        d, factor, t, drop, bits, inv = p.density[i], None, None, None, None, None
        if sparsify is None or d >= 1:
            pass
        elif sparsify is Sparsify.magnitude:
            t, drop = _magnitude(wi, sub, d)
        else:
            bits, factor = _bits(wi, sub, d, p.rescale, rng)
            inv = d if p.rescale is Rescale.inverse else None
        factors.append(factor)
        inverse.append(inv)
        keep.append(bits)
        thresholds.append(None if t is None else (t, int(drop[0]) if drop is not None and drop.size else b.size))
        if not fast:
            sources.append(TaskVector(wi, sub, i, t=t, drop=drop, bits=bits, inverse=inv))
    if not fast:
        return kernels.combine(b, sources, [True] * len(w), factors, p, consensus).reshape(shape)
    total = kernels.weight_total(p.weight, np.float32)
    if abs(total) < 1e-8:  # kernels.combine's rule
        total = np.float32(1)
    return native.merge(b, w, deltas=deltas, weights=p.weight, thresholds=thresholds, bits=keep, inverse=inverse,
                        factors=factors, consensus=p.consensus if consensus else None, normalize=p.normalize,
                        total=total, lambda_=p.lambda_).reshape(shape)
