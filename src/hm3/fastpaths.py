"""Opt-in faster CPU inference for a ``GroupwiseClassifier``, with its agreement against fp32.

The default path (``hm3.load``) already does what is free: length-sorted batches with dynamic
padding and ``torch.inference_mode``. The paths here change the arithmetic, so their answers can
differ from fp32 near a decision boundary; ``agreement`` measures how often the predicted label of
each group stays the same, and ``hm3 bench inference`` reports it.

* ``int8``      — PyTorch dynamic quantisation of the encoder's ``nn.Linear`` layers: int8 weights
                  with one scale per output channel, activations quantised on the fly. Three things
                  keep its answers close to fp32 (``quantize_int8``): each quantised layer's input is
                  *smoothed* (SmoothQuant: per-channel scales move the activations' outlier channels
                  into the weights, calibrated on texts — the caller's, else seeded random-token
                  windows); the FFN down-projections (fed by GELU's outliers), pooler and classifier
                  stay fp32; activations use all 8 bits where the CPU has VNNI (7 elsewhere, as torch
                  does to avoid int16 overflow). No extra package.
* ``int8-checked`` — ``int8``, then every window where some group's top-two logits are closer than
                  ``margin`` (0.5 nats) is run again in fp32: int8 decides only where its error
                  (p99 ≈ 0.5-0.8 nats on the zoo's validation suite) rarely flips the label — its
                  tail is longer, so this narrows the gap to fp32 without closing it for certain.
                  Holds both models; its speed depends on how many windows are close calls.
* ``onnx``      — the model exported to ONNX (fp32) and run by ONNX Runtime (``pip install
                  'hm3[fast]'``). Same arithmetic up to operator fusion: agreement ≈ 100%.
* ``onnx-int8`` — the ONNX model with ONNX Runtime's dynamic int8 weight quantisation.
* ``bf16``      — ``torch.autocast`` to bfloat16: the matrix products run in bf16 (AMX or AVX512-BF16
                  where the CPU has them: several times fp32's speed), softmax and layer norms stay
                  fp32, weights stay fp32 on disk and in memory. On a CPU without bf16 instructions
                  it is slower than fp32 (``bf16_is_fast`` tells; a warning says so).

``accelerate(clf, path)`` returns a new classifier with the same tokenizer, label space and
windowing; only the forward pass differs. Exports are cached next to the model (``cache_dir``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

from hm3.errors import HM3Error

log = logging.getLogger(__name__)

PATHS = ("int8", "int8-checked", "onnx", "onnx-int8", "bf16")
#: the paths that calibrate on texts (``accelerate(calibration=...)``, ``--calibrate``)
CALIBRATED = ("int8", "int8-checked")
# Forward-pass precisions of the search's trials (``hm3 search --precision``) and of ``forward_context``.
PRECISIONS = ("float32", "bfloat16")

# Modules dynamic int8 leaves in fp32: the pooler and the classifier are a sliver of the compute, and
# the classifier's rows are the groups' decisions.
FP32_MODULES = ("pooler", "classifier", "pre_classifier")
# int8's recipe. Session 35, the zoo's validation suite (512 texts x 5 groups), agreement with fp32 of
# the five-guard TIES merge (the bench's) / the recommended merge-all.yaml merge, 7-bit activations:
# every encoder linear 96.6% / 98.6%; + smoothing (alpha 0.7) 98.2%; FFN down-projections in fp32 as
# well 99.3% / 99.1% (8-bit activations: 99.6% / 99.7%). Speed vs fp32 1.2-1.3x (all linears: 1.4x).
# alpha 0.5 / 0.9: 98.6-99.3%; calibrated on 64 random-token windows instead of 128 validation texts:
# 98.6-98.7% (8-bit: 99.1-99.2%); on other sets of 128-256 validation texts (8-bit): 99.3-99.6%.
SMOOTH_ALPHA = 0.7  # SmoothQuant's migration strength: s_j = max|x_j|^a / max|w_j|^(1-a)
CALIBRATION_TEXTS = 128  # at most this many of the caller's texts calibrate the smoothing (evenly spaced)
RANDOM_WINDOWS = 64  # without texts: seeded windows of random (non-special) tokens
CALIBRATE_HELP = (f"--fast int8 / int8-checked: a file of texts like the ones to classify (.txt, .jsonl, .csv, .tsv; "
                  f"up to {CALIBRATION_TEXTS} of them, evenly spaced) to calibrate int8's smoothing (default: "
                  "random tokens).")
# int8-checked: re-run a window in fp32 when some group's top-two logits are closer than this. Chosen
# on the zoo's validation suite (five-guard TIES merge): int8's logit error had p99 0.55-0.65 nats, and
# 0.5 left 6 of 2,610 window-group labels different (plain int8: 64), re-running 21% of the windows.
# Not a guarantee: int8's error is heavy-tailed and model-dependent (the two-guard merge: p99 0.6-0.8,
# a few windows 1.2-2.4 nats, so even 1.5 left 2 of 1,044 labels different).
CHECK_MARGIN = 0.5


def accelerate(clf, path: str, *, cache_dir: str | os.PathLike | None = None, threads: int | None = None,
               calibration: Sequence[str] | None = None):
    """A copy of ``clf`` whose forward pass runs on ``path`` (one of ``PATHS``). ``calibration``: texts
    like the ones to classify, for the int8 paths' smoothing (default: random-token windows)."""
    from hm3.model import GroupwiseClassifier

    if path not in PATHS:
        raise HM3Error(f"unknown fast path {path!r}; valid: {', '.join(PATHS)}")
    if calibration is not None and path not in CALIBRATED:
        raise HM3Error(f"calibration texts are for the {' and '.join(CALIBRATED)} paths; {path} does not use them")
    if path in CALIBRATED:
        int8 = quantize_int8(clf.model, activation_ranges(clf, calibration))
        model = int8 if path == "int8" else CheckedInt8(clf.model, clf.space, int8=int8, cuts=clf.all_cuts())
    elif path == "bf16":
        model = Autocast(clf.model, "bfloat16")
    else:
        cache = Path(cache_dir) if cache_dir else Path(clf.name or ".") / ".hm3-fast"
        onnx_file = export_onnx(clf.model, cache / "model.onnx")
        if path == "onnx-int8":
            onnx_file = quantize_onnx(onnx_file, cache / "model.int8.onnx")
        model = OnnxClassifier(onnx_file, clf.model.config, threads=threads)
    return GroupwiseClassifier(model, clf.tokenizer, clf.space, max_length=clf.max_length, stride=clf.stride,
                               aggregate=clf.aggregate, threshold=clf.threshold, thresholds=clf.thresholds,
                               name=f"{clf.name}[{path}]")


def int8_linears(model) -> list[str]:
    """The names of the linear layers ``quantize_int8`` makes int8: every ``nn.Linear`` but those in
    ``FP32_MODULES`` and the down-projections (more inputs than outputs: a transformer's FFN output,
    whose input is the activation function's, with outliers per token that no per-channel scale
    tames)."""
    import torch

    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not any(part in FP32_MODULES for part in name.split("."))
            and m.in_features <= m.out_features]


def full_range_int8() -> bool:
    """Whether int8 activations may use all 8 bits: on a CPU with AVX512-VNNI the int8 products are
    summed in int32; without it, FBGEMM's u8 x s8 pairs are summed in int16 and 8-bit activations can
    overflow, so torch quantises them to 7 bits (``reduce_range``)."""
    import torch

    probe = getattr(torch.cpu, "_is_vnni_supported", None)  # private helper of torch.cpu (2.x)
    return bool(probe()) if probe is not None else False


def activation_ranges(clf, texts: Sequence[str] | None = None) -> dict:
    """Per layer of ``int8_linears``: the largest absolute value each input channel takes on
    ``texts`` (up to ``CALIBRATION_TEXTS`` of them, evenly spaced; every window of each), or, without
    texts, on ``RANDOM_WINDOWS`` seeded windows of random non-special tokens (windows of up to 128
    tokens). Padding positions count, as they do when int8 quantises a batch."""
    import torch

    if texts is not None:
        texts = [t for t in texts if t and t.strip()]
        if not texts:
            raise HM3Error("calibration: no texts (give texts like the ones to classify, or none for random tokens)")
        step = max(1, math.ceil(len(texts) / CALIBRATION_TEXTS))
        texts = texts[::step][:CALIBRATION_TEXTS]
    names = int8_linears(clf.model)
    ranges: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            seen = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
            ranges[name] = torch.maximum(ranges[name], seen) if name in ranges else seen
        return record

    hooks = [clf.model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        if texts is not None:
            clf.window_logits(clf.windows(texts)[0])
        else:
            clf.window_logits(random_windows(clf.tokenizer, min(128, clf.max_length)))
    finally:
        for h in hooks:
            h.remove()
    return ranges


def random_windows(tokenizer, length: int, n: int = RANDOM_WINDOWS, seed: int = 0) -> list[list[int]]:
    """``n`` token windows of ``length`` (special tokens at both ends): random non-special tokens
    between, drawn with ``seed``."""
    import random

    special = set(tokenizer.all_special_ids)
    pool = [i for i in range(len(tokenizer)) if i not in special]
    rng = random.Random(seed)
    first = [tokenizer.cls_token_id] if tokenizer.cls_token_id is not None else []
    last = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else []
    body = max(1, length - len(first) - len(last))
    return [first + rng.choices(pool, k=body) + last for _ in range(n)]


def quantize_int8(model, ranges: dict | None = None, *, alpha: float = SMOOTH_ALPHA, full_range: bool | None = None):
    """Dynamic int8 quantisation of ``int8_linears(model)``: int8 weights with a scale per output
    channel, activations quantised per batch (8 bits when ``full_range``, default
    ``full_range_int8()``, else 7). With ``ranges`` (``activation_ranges``) the layers are smoothed
    first (``smooth``). A new model; ``model`` is left as it was."""
    import copy
    import warnings

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if ranges is not None:
        model, targets = smooth(model, ranges, alpha=alpha)
    else:
        model, targets = copy.deepcopy(model), int8_linears(model)
    full = full_range_int8() if full_range is None else full_range
    mapping = {torch.nn.Linear: _full_range_linear() if full else torch.ao.nn.quantized.dynamic.Linear}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notice that it moves to torchao
        return quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in targets}, dtype=torch.qint8,
                                mapping=mapping, inplace=True).eval()


def smooth(model, ranges: dict, *, alpha: float = SMOOTH_ALPHA):
    """SmoothQuant (Xiao et al. 2023) on ``int8_linears(model)``, in fp32: in each layer, the weight's
    input column j is multiplied by ``s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)`` (``max|x_j|`` from
    ``ranges``) and the layer's input divided by ``s_j`` — the same function, with the activations'
    outlier channels moved into the weights, which have a scale per output channel to absorb them.
    Returns ``(a new model, the names of the smoothed layers' inner linears)``."""
    import copy

    import torch

    names = int8_linears(model)
    if missing := sorted(set(names) - set(ranges)):
        raise HM3Error(f"int8: no activation range for {', '.join(missing[:3])} (ranges from another model?)")
    model = copy.deepcopy(model)
    smoothed = _smoothed_linear()
    for name in names:
        lin = model.get_submodule(name)
        w_max = lin.weight.detach().abs().amax(0).float().clamp(min=1e-5)
        x_max = ranges[name].float()
        s = (x_max.clamp(min=1e-5) ** alpha / w_max ** (1 - alpha)).clamp(min=1e-5)
        # a channel calibration never saw move is left alone: its tiny s would blow it up if it ever did
        s = torch.where(x_max > 0, s, torch.ones_like(s))
        with torch.no_grad():
            lin.weight.mul_(s.to(lin.weight.dtype))
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, smoothed(lin, 1 / s))
    return model, [f"{name}.inner" for name in names]


@functools.cache
def _smoothed_linear():
    """The module ``quantize_int8`` puts in a smoothed layer's place: ``inner(x / s)``, ``inner``'s
    weight already multiplied by ``s`` (``inv`` = 1 / s)."""
    import torch

    class SmoothedLinear(torch.nn.Module):
        def __init__(self, inner, inv):
            super().__init__()
            self.inner = inner
            self.register_buffer("inv", inv.to(inner.weight.dtype))

        def forward(self, x):
            return self.inner(x * self.inv)

    return SmoothedLinear


@functools.cache
def _full_range_linear():
    """torch's dynamic int8 linear with 8-bit activations (torch's own uses 7: ``reduce_range``)."""
    import torch
    from torch.ao.nn.quantized.dynamic import Linear

    class FullRangeLinear(Linear):
        def forward(self, x):
            return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params,
                                                      reduce_range=False).to(x.dtype)

    return FullRangeLinear


class CheckedInt8:
    """Stands in for the classifier inside ``GroupwiseClassifier``: int8 logits, except for the rows
    where some group's top-two logits are closer than ``margin`` (a multi-label group: some logit is
    within ``margin`` of its label's threshold's, ``log(t / (1 - t))``; a single-label group at an
    operating point: also its label's log-odds, ``log(p / (1 - p))``, within ``margin`` of the
    threshold's), which the fp32 model recomputes. ``cuts``: ``GroupwiseClassifier.all_cuts`` (a
    multi-label group's thresholds default to 0.5). ``int8``: the int8 model (default
    ``quantize_int8(model)``, unsmoothed)."""

    def __init__(self, model, space, margin: float = CHECK_MARGIN, cuts: "dict | None" = None, int8=None):
        import torch

        from hm3.model import operating_point

        self.fp32, self.int8 = model, quantize_int8(model) if int8 is None else int8
        # a one-label softmax group has no close call
        self.rows = [g.rows for g in space if len(g.labels) > 1 and not g.multi_label]
        self.sigmoid_rows = [g.rows for g in space if g.multi_label]
        self.boundaries = []  # per multi-label group: each label's threshold as a logit
        self.points = []  # per single-label group at an operating point: (rows, its label, threshold as log-odds)
        for g in space:
            if g.multi_label:
                t = torch.as_tensor((cuts or {}).get(g.name, [0.5] * g.size), dtype=torch.float32)
                self.boundaries.append(torch.log(t / (1 - t)))
            elif (point := operating_point(g, (cuts or {}).get(g.name))) is not None:
                label, t = point
                self.points.append((g.rows, g.labels.index(label), math.log(t / (1 - t))))
        self.margin = margin
        self.config = model.config
        self.training = False
        self.rerun = self.seen = 0  # windows recomputed in fp32 / windows classified

    def eval(self) -> "CheckedInt8":
        return self

    def __call__(self, input_ids, attention_mask):
        import torch

        logits = self.int8(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T)
        close = torch.zeros(logits.shape[0], dtype=torch.bool)
        for rows in self.rows:
            top2 = logits[:, rows].topk(2, dim=1).values
            close |= (top2[:, 0] - top2[:, 1]) < self.margin
        for rows, boundary in zip(self.sigmoid_rows, self.boundaries):
            close |= ((logits[:, rows] - boundary).abs() < self.margin).any(dim=1)
        for rows, j, boundary in self.points:
            z = logits[:, rows]
            log_odds = z[:, j] - torch.logsumexp(torch.cat([z[:, :j], z[:, j + 1:]], dim=1), dim=1)
            close |= (log_odds - boundary).abs() < self.margin
        self.seen += logits.shape[0]
        if close.any():
            idx = close.nonzero().squeeze(1)
            self.rerun += idx.numel()
            logits = logits.clone()
            logits[idx] = self.fp32(input_ids=input_ids[idx], attention_mask=attention_mask[idx]).logits.to(logits.dtype)
        return SimpleNamespace(logits=logits)


def bf16_is_fast() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX tiles or AVX512-BF16)."""
    import torch

    # private helpers of torch.cpu (present in 2.x); a torch without them is treated as "no"
    probes = [getattr(torch.cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(p()) for p in probes if p is not None)


def has_amx() -> bool:
    """Whether this CPU has AMX tiles: bf16 matrix products several times fp32's. With AVX512-BF16 alone
    (``bf16_is_fast`` is true too) they are only ~2x (a 2048² product 0.042 s vs 0.093 s on an AMD EPYC)."""
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private (torch 2.x); absent: "no"
    return bool(probe()) if probe is not None else False


def forward_context(precision: str):
    """A context for forward passes at ``precision`` (one of ``PRECISIONS``): ``bfloat16`` is
    ``torch.autocast`` on the CPU (bf16 matrix products, fp32 softmax and layer norms)."""
    import contextlib

    import torch

    if precision == "float32":
        return contextlib.nullcontext()
    if precision == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    raise HM3Error(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")


#: model types whose forward pass fails under bf16 autocast: transformers' DeBERTa (v1) fills masked
#: attention scores with float32's minimum, which overflows bfloat16 (a RuntimeError in every batch)
NO_BF16 = frozenset({"deberta"})


def resolve_precision(precision: str, model_type: str | None = None) -> str:
    """``auto`` → ``bfloat16`` on a CPU with bf16 matrix instructions (unless ``model_type`` cannot
    run under it: ``NO_BF16``), else ``float32``; any other value is checked (``check_precision``)
    and returned."""
    if precision == "auto":
        return "bfloat16" if bf16_is_fast() and model_type not in NO_BF16 else "float32"
    check_precision(precision, also_valid=("auto",), model_type=model_type)
    return precision


def check_precision(precision: str, also_valid: tuple[str, ...] = (), model_type: str | None = None) -> None:
    """Refuse an unknown precision (the message lists ``PRECISIONS`` and ``also_valid``), and bfloat16
    for a ``model_type`` in ``NO_BF16``; warn when bf16 would be slower than fp32 on this CPU."""
    if precision not in PRECISIONS:
        raise HM3Error(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS + also_valid)}")
    if precision == "bfloat16" and model_type in NO_BF16:
        raise HM3Error(f"{model_type} models cannot run under bfloat16 autocast (transformers fills masked attention "
                       "scores with a float32 minimum that overflows bf16); use float32 (or precision auto), or the "
                       "int8 / onnx fast paths")
    if precision == "bfloat16" and not bf16_is_fast():
        log.warning("this CPU has no bf16 matrix instructions (AMX, AVX512-BF16): bfloat16 will be slower than "
                    "float32 here")


class Autocast:
    """Stands in for the classifier inside ``GroupwiseClassifier``: the same model, its forward pass
    under ``forward_context(precision)``, logits returned as fp32."""

    def __init__(self, model, precision: str):
        check_precision(precision, model_type=model.config.model_type)
        self.model, self.precision = model, precision
        self.config = model.config
        self.training = False

    def eval(self) -> "Autocast":
        return self

    def __call__(self, input_ids, attention_mask):
        with forward_context(self.precision):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return SimpleNamespace(logits=logits.float())


def export_onnx(model, out: str | os.PathLike) -> Path:
    """Export ``input_ids, attention_mask → logits`` with dynamic batch and length; cached by
    the weights file's identity (path, size, mtime) recorded next to the export."""
    import json

    import torch

    out = Path(out)
    source = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    # attention exported as transformers' eager matmul-softmax-matmul: ONNX Runtime runs it ~1.5x faster than
    # the SDPA export's decomposed graph (MiniLM, 32 x 512 tokens: 2.8 s vs 4.2 s; torch's own SDPA 2.2 s)
    stamp = {"source": str(source), "num_labels": int(model.config.num_labels), "attention": "eager"}
    weights = Path(str(source)) / "model.safetensors"
    if weights.is_file():
        st = weights.stat()
        stamp.update(size=st.st_size, mtime=st.st_mtime_ns)
    stamp_file = out.with_suffix(".json")
    if out.is_file() and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return out
    try:
        import onnx  # noqa: F401  the exporter needs it
    except ImportError:
        raise HM3Error("the onnx fast path needs onnx and onnxruntime: pip install 'hm3[fast]'") from None

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    was_training = model.training
    attention = getattr(model.config, "_attn_implementation", None)
    switch = attention not in (None, "eager") and hasattr(model, "set_attn_implementation")
    wrapper = Logits(model).eval()
    # Trace with padding in the mask: with an all-ones mask transformers may skip masking, and the
    # trace would keep that shortcut for every batch.
    ids = torch.full((2, 16), 101, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    import warnings

    try:
        if switch:
            model.set_attn_implementation("eager")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, (ids, mask), str(tmp), input_names=["input_ids", "attention_mask"], output_names=["logits"],
                dynamic_axes={"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
                              "logits": {0: "batch"}},
                opset_version=17, dynamo=False,
            )
    finally:
        if switch:  # the caller's model keeps answering as it did
            model.set_attn_implementation(attention)
        model.train(was_training)  # the exporter restores the wrapper's mode onto the model
    os.replace(tmp, out)
    stamp_file.write_text(json.dumps(stamp))
    log.info("exported %s", out)
    return out


def quantize_onnx(src: Path, out: Path) -> Path:
    """ONNX Runtime's dynamic int8 weight quantisation of an exported model (cached)."""
    if out.is_file() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise HM3Error("the onnx-int8 fast path needs onnxruntime: pip install 'hm3[fast]'") from None
    tmp = out.with_name(f".{out.name}.tmp")
    quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)
    os.replace(tmp, out)
    return out


class OnnxClassifier:
    """Stands in for a transformers classifier inside ``GroupwiseClassifier``: called with
    ``input_ids``/``attention_mask`` tensors, returns an object with ``.logits``."""

    def __init__(self, onnx_file: str | os.PathLike, config, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise HM3Error("the onnx fast path needs onnxruntime: pip install 'hm3[fast]'") from None
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
        self.config = config
        self.training = False

    def eval(self) -> "OnnxClassifier":
        return self

    def __call__(self, input_ids, attention_mask):
        import torch

        logits = self.session.run(["logits"], {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})[0]
        return SimpleNamespace(logits=torch.from_numpy(logits))


def agreement(reference, fast, texts: Sequence[str], batch_size: int = 32) -> dict[str, float]:
    """Per group (and ``all``): the fraction of texts whose answer is the same at ``reference``'s
    thresholds (a single-label group: the same label, at its operating point if it has one; a
    multi-label group: the same set of labels)."""
    ref = reference.predict_proba(texts, batch_size=batch_size)
    got = fast.predict_proba(texts, batch_size=batch_size)
    out, same, total = {}, 0, 0
    for g, p in ref.items():
        a, b = (reference.decisions(reference.space[g], q) for q in (p, got[g]))
        k = int((a == b).reshape(len(p), -1).all(axis=1).sum())
        out[g] = k / max(1, len(p))
        same, total = same + k, total + len(p)
    out["all"] = same / max(1, total)
    return out
