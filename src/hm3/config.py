"""The merge recipe: mergekit's YAML keys plus hm3's per-model ``group`` and ``labels``.

.. code-block:: yaml

    merge_method: ties               # see `hm3 methods`
    base_model: ./base               # required by every method but linear; hm3:minilm = the zoo's base
    models:
      - model: ./jailbreak-guard
        group: jailbreak             # hm3: the group name (default: the directory name)
        labels: [benign, jailbreak]  # hm3: replaces uninformative names (LABEL_0, ...)
        parameters: {weight: 1.0, density: 0.5}
    parameters: {normalize: true, lambda: 1.0}
    dtype: float32
    seed: 0                          # hm3: every random step is seeded from (seed, tensor name)
    head: {density: keep, hidden: merge}   # hm3: see HeadConfig
    data: {texts: {jailbreak: ./jb.txt}}   # hm3: unlabelled text for data-aware methods (DataConfig)
    refit: {mode: labelled, data: {jailbreak: ./jb-train.jsonl}}   # hm3: head re-fit (RefitConfig)

A parameter value is a number, or mergekit's conditional list
``[{filter: classifier, value: 1.0}, {value: 0.5}]``: the first entry whose ``filter`` is a
substring of the tensor name (an entry without ``filter`` matches all) gives the value.
Relative paths are resolved against the recipe's folder first, then the working directory.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Mapping, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hm3.errors import HM3Error
from hm3.merging.methods import REGISTRY

# Parameters each method understands. `int8_mask` is mergekit's memory option: accepted, no effect.
COMMON = {"weight", "int8_mask"}
GTA = COMMON | {"density", "normalize", "rescale", "lambda", "rescale_norm", "consensus"}
ALLOWED: dict[str, set[str]] = {
    "linear": COMMON | {"normalize"},
    "task_arithmetic": GTA,
    "ties": GTA,
    "dare_linear": GTA,
    "dare_ties": GTA,
    "breadcrumbs": GTA | {"gamma"},
    "breadcrumbs_ties": GTA | {"gamma"},
    "della": GTA | {"epsilon"},
    "della_linear": GTA | {"epsilon"},
    "model_stock": COMMON | {"filter_wise"},
    # data-aware methods (hm3.merging.data_aware); they read statistics of the recipe's `data:` texts
    "regmean": COMMON | {"regmean_alpha"},
    "fisher": COMMON | {"fisher_floor", "fisher_normalize"},
    "adamerging": COMMON | {"density"},
    # spectral methods (hm3.merging.spectral)
    "tsv": COMMON | {"lambda", "sv_fraction"},
    "iso_c": COMMON | {"lambda"},
}


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Union[float, bool, str]


ParamValue = Union[float, bool, str, list[Conditional]]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    group: str | None = None
    labels: list[str] | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class HeadConfig(BaseModel):
    """How classification heads are merged.

    ``density``: ``keep`` (default) — head tensors keep all their values (density 1.0, like
    mergekit's ``filter: classifier`` trick); ``model`` — each model's own density; or a number.
    Any density below 1 is applied to each group's own rows only, so zero padding never dilutes it.
    ``hidden``: DistilBERT ``pre_classifier`` / RoBERTa ``classifier.dense``: ``merge`` them like
    body tensors (head density), or keep the ``base`` model's.
    """

    model_config = ConfigDict(extra="forbid")
    density: Union[Literal["keep", "model"], float] = "keep"
    hidden: Literal["merge", "base"] = "merge"

    @field_validator("density")
    @classmethod
    def _density(cls, v):
        if isinstance(v, float) and not (0 < v <= 1):
            raise ValueError(f"head density must be in (0, 1], got {v}")
        return v


class BodyConfig(BaseModel):
    """Body distillation after the head re-fit (see hm3.body_distill): the whole model (or its top
    ``layers`` encoder layers) trained so every group's softmax follows its guard on the re-fit's texts."""

    model_config = ConfigDict(extra="forbid")
    epochs: float = Field(2.0, gt=0)
    lr: float = Field(2e-5, gt=0)
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(128, ge=16)  # tokens per text (first window)
    layers: int | None = Field(None, ge=1)  # train only the top encoder layers (+ pooler, head); None: all
    # keep the word embeddings (half of MiniLM's weights) as merged: session 11, CS3 on an AMX CPU, the
    # training steps 20% faster with the same validation answers (paired 0.9997, 2 of 7,275 labels moved)
    freeze_embeddings: bool = False
    weight_decay: float = Field(0.01, ge=0)
    # targets (1 - a)·guard + a·one-hot(label) on the texts that have a label in their own group's data
    label_weight: float = Field(0.0, ge=0, le=1)
    heads_after: bool = False  # then re-fit the heads once more on the trained body (same refit settings)
    # "all": every group learns on every re-fit text (the guards run on the texts the re-fit did not ask
    # them about); "refit": each group only on the texts its own head was re-fitted on (no more guard passes)
    targets: Literal["all", "refit"] = "all"


#: what ``refit.without_bf16`` / ``refit.without_amx`` may change: the cost of the re-fit, not its data or
#: its groups
TIER_KEYS = ("max_texts", "cross_texts", "c", "temperature", "max_length", "truncate", "batch_size",
             "label_weight", "body")


#: the re-fit tiers of ``precision: auto``: key -> (the precision ``auto`` resolves to where the tier applies,
#: whether it applies only on a CPU without AMX tiles)
REFIT_TIERS = {"without_bf16": ("float32", False), "without_amx": ("bfloat16", True)}


def refit_tier(precision: str, amx: bool, owner: Any) -> str | None:
    """Which tier of ``owner`` (a ``RefitConfig`` or a zoo ``Recommendation``: one attribute per
    ``REFIT_TIERS`` key, holding that tier's keys) applies at ``precision`` (``auto`` resolved) on a CPU with
    (``amx``) or without AMX tiles; None (also for an empty tier): the re-fit's own keys."""
    for name, (at, no_amx_only) in REFIT_TIERS.items():
        if precision == at and not (no_amx_only and amx) and getattr(owner, name):
            return name
    return None


class RefitConfig(BaseModel):
    """Post-merge head re-fit per group (see hm3.refit). Paths relative to the recipe.

    ``labelled``: logistic regression on ``data`` rows ``{"text", "label"}``. ``distill``: fit the
    group's rows to the original guard's probabilities on unlabelled ``data`` texts (default: the
    recipe's ``data.texts``); the guard is ``teachers[group]`` or, by default, the recipe's model of
    that group. ``c``: inverse L2 strength, or ``auto`` — picked on ``validation[group]`` (default: a
    seeded 20% hold-out of ``data``). Test data is never read. ``cross_texts`` / ``extra_texts`` /
    ``label_weight``: distill on other groups' texts, on unlabelled files of other domains, and with
    the labels mixed into the teacher's targets (hm3.refit). ``body``: then fine-tune the whole merged
    model towards every group's guard on the same texts (hm3.body_distill; minutes, not seconds).
    """

    model_config = ConfigDict(extra="forbid")
    mode: Literal["labelled", "distill"] = "labelled"
    data: dict[str, str] = Field(default_factory=dict)  # group -> .jsonl (text[, label]) or .txt
    validation: dict[str, str] = Field(default_factory=dict)  # group -> file for choosing c
    teachers: dict[str, str] = Field(default_factory=dict)  # distill: group -> original guard dir
    groups: list[str] | None = None  # default: every group with data
    # per group (and per validation file), a seeded sample; or {group: n} (groups not named: 500)
    max_texts: Union[int, dict[str, int]] = 500
    c: Union[Literal["auto"], float] = "auto"
    temperature: float = Field(1.0, gt=0)
    max_length: int | None = Field(None, ge=16)  # default: the merged model's inference window
    truncate: bool = False  # each text's first window only (else all its windows, as inference)
    batch_size: int = Field(32, ge=1)
    cross_texts: int = Field(0, ge=0)  # distill: + this many texts of each other group's data, teacher-labelled
    # distill: + cross_texts of each of these unlabelled files, or {file: n} for n texts of each
    extra_texts: Union[list[str], dict[str, int]] = Field(default_factory=list)
    label_weight: float = Field(0.0, ge=0, le=1)  # distill: targets (1-a)·teacher + a·label where data has labels
    body: BodyConfig | None = None  # distill: then train the body on the same texts (hm3.body_distill)
    # forward passes for features and teachers (hm3.refit); auto: bfloat16 on CPUs with bf16 matrix instructions
    precision: Literal["float32", "bfloat16", "auto"] = "float32"
    # with precision auto: these keys replace the ones above where auto resolves to float32 (a CPU without
    # AMX / AVX512-BF16): a cheaper re-fit for a time budget that needs bf16 (``for_precision``)
    without_bf16: dict[str, Any] | None = None
    # with precision auto: these keys replace the ones above where auto resolves to bfloat16 on a CPU without
    # AMX tiles (AVX512-BF16 only: bf16 ~2x fp32 there, not several times)
    without_amx: dict[str, Any] | None = None

    @field_validator("max_texts")
    @classmethod
    def _max_texts(cls, v):
        counts = v.values() if isinstance(v, dict) else [v]
        if not all(isinstance(n, int) and n >= 1 for n in counts):
            raise ValueError(f"max_texts must be a positive integer or a mapping of groups to them, got {v!r}")
        return v

    @field_validator("c")
    @classmethod
    def _c(cls, v):
        if v != "auto" and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"c must be a positive number or 'auto', got {v!r}")
        return v

    @field_validator("extra_texts")
    @classmethod
    def _extra_texts(cls, v):
        if isinstance(v, dict) and not all(isinstance(n, int) and n >= 1 for n in v.values()):
            raise ValueError(f"extra_texts: each file's count must be a positive integer, got {v!r}")
        return v

    @model_validator(mode="after")
    def _cross(self):
        if self.cross_texts and self.mode != "distill":
            raise ValueError("cross_texts needs mode: distill (other groups' texts have no labels for a group; "
                             "its teacher labels them)")
        if self.label_weight and self.mode != "distill":
            raise ValueError("label_weight needs mode: distill (it mixes labels into the teacher's probabilities)")
        if self.extra_texts and self.mode != "distill":
            raise ValueError("extra_texts needs mode: distill (unlabelled files: the teachers label them)")
        if isinstance(self.extra_texts, list) and self.extra_texts and not self.cross_texts:
            raise ValueError("extra_texts needs cross_texts > 0: how many texts of each file every distilled "
                             "head fits its teacher on (or give a count per file: {file: n})")
        if self.body is not None and self.mode != "distill":
            raise ValueError("body needs mode: distill (the body is trained towards the original guards' "
                             "probabilities)")
        for name, (at, no_amx_only) in REFIT_TIERS.items():
            tier = getattr(self, name)
            if tier is None:
                continue
            if self.precision != "auto":
                raise ValueError(f"{name} needs precision: auto (with {self.precision} it would always or "
                                 "never apply)")
            bad = sorted(set(tier) - set(TIER_KEYS))
            if bad:
                raise ValueError(f"{name} cannot set {', '.join(bad)}; it changes what the re-fit costs: "
                                 f"{', '.join(TIER_KEYS)}")
            try:
                self.for_precision(at, amx=not no_amx_only)
            except ValidationError as e:
                raise ValueError(_format_validation(e, f"{name} makes an invalid re-fit")) from None
        return self

    def tier(self, precision: str, amx: bool = True) -> str | None:
        """Which of ``without_bf16`` / ``without_amx`` applies here (``refit_tier``); None: the re-fit's own."""
        return refit_tier(precision, amx, self)

    def for_precision(self, precision: str, amx: bool = True) -> "RefitConfig":
        """The re-fit that runs at ``precision`` (``auto`` resolved) on a CPU with or without AMX tiles: this
        one, or with the keys of the tier that applies there (``tier``) in place."""
        name = self.tier(precision, amx)
        if name is None:
            return self
        fields = self.model_dump(exclude=set(REFIT_TIERS))
        return RefitConfig.model_validate({**fields, **getattr(self, name)})


class AdaMergingConfig(BaseModel):
    """Learning layer-wise coefficients (``merge_method: adamerging``), see hm3.merging.data_aware."""

    model_config = ConfigDict(extra="forbid")
    objective: Literal["distill", "entropy"] = "distill"
    steps: int = Field(30, ge=1)
    lr: float = Field(0.05, gt=0)
    init: float = 0.3
    batch_size: int = Field(8, ge=1)
    max_texts: int = Field(64, ge=1)  # per group
    max_length: int = Field(64, ge=8)  # tokens per text: each step is a forward and backward pass


class DataConfig(BaseModel):
    """Unlabelled text for data-aware merge methods (regmean, fisher, adamerging): per group, a
    ``.jsonl`` (field ``text``; labels ignored) or ``.txt`` file of that model's domain.
    Statistics are cached on disk (``$HM3_CACHE/stats``), keyed by model and text hashes."""

    model_config = ConfigDict(extra="forbid")
    texts: dict[str, str] = Field(default_factory=dict)
    max_texts: int = Field(256, ge=1)  # per group, a seeded sample
    max_length: int = Field(128, ge=8)  # tokens per text (truncated)
    batch_size: int = Field(16, ge=1)
    cache: bool = True
    adamerging: AdaMergingConfig = Field(default_factory=AdaMergingConfig)


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    seed: int = 0
    tokenizer_source: str | None = None
    out_dtype: str | None = None  # mergekit key, accepted for compatibility; `dtype` decides
    head: HeadConfig = Field(default_factory=HeadConfig)
    refit: RefitConfig | None = None
    data: DataConfig | None = None

    @field_validator("merge_method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in REGISTRY:
            raise ValueError(f"unknown merge_method {v!r}; valid: {', '.join(REGISTRY)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "MergeConfig":
        method = REGISTRY[self.merge_method]
        if method.needs_base and not self.base_model:
            raise ValueError(f"merge_method {self.merge_method!r} needs `base_model` (the model the others were fine-tuned from)")
        if method.needs_stats and (self.data is None or not self.data.texts):
            raise ValueError(
                f"merge_method {self.merge_method!r} is data-aware: add a `data:` section with `texts:` naming "
                "unlabelled text (.jsonl field text, or .txt) for every group"
            )
        if len(self.models) < method.min_models:
            raise ValueError(f"merge_method {self.merge_method!r} needs at least {method.min_models} models")
        allowed = ALLOWED[self.merge_method]
        for where, params in [("parameters", self.parameters)] + [
            (f"models[{i}].parameters", m.parameters) for i, m in enumerate(self.models)
        ]:
            for key, value in params.items():
                if key not in allowed:
                    raise ValueError(f"{where}.{key}: not a parameter of {self.merge_method}; valid: {', '.join(sorted(allowed))}")
                for v in _values(value):
                    _check_value(f"{where}.{key}", key, v)
        groups = [m.group for m in self.models if m.group]
        dup = sorted({g for g in groups if groups.count(g) > 1})
        if dup:
            raise ValueError(f"duplicate group names {dup}: every model needs its own `group`")
        return self

    # -- paths ---------------------------------------------------------------------------------------
    def resolved(self, root: Path | None) -> "MergeConfig":
        """A copy with model paths resolved against ``root`` (the recipe's folder)."""
        data = self.model_copy(deep=True)
        data.base_model = _packaged(data.base_model)
        data.tokenizer_source = _packaged(data.tokenizer_source)
        if root is None:
            return data
        data.base_model = _resolve_path(data.base_model, root)
        data.tokenizer_source = _resolve_path(data.tokenizer_source, root)
        for m in data.models:
            m.model = _resolve_path(m.model, root)
        if data.refit is not None:
            r = data.refit
            r.data = {g: _resolve_path(p, root) for g, p in r.data.items()}
            r.validation = {g: _resolve_path(p, root) for g, p in r.validation.items()}
            r.teachers = {g: _resolve_path(p, root) for g, p in r.teachers.items()}
            r.extra_texts = ({_resolve_path(p, root): n for p, n in r.extra_texts.items()}
                             if isinstance(r.extra_texts, dict) else [_resolve_path(p, root) for p in r.extra_texts])
        if data.data is not None:
            data.data.texts = {g: _resolve_path(p, root) for g, p in data.data.texts.items()}
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True, by_alias=True), sort_keys=False)


def _values(value: Any) -> list[Any]:
    return [c.value for c in value] if isinstance(value, list) else [value]


def _check_value(where: str, key: str, v: Any) -> None:
    if key in ("normalize", "rescale", "int8_mask", "filter_wise", "fisher_normalize"):
        if not isinstance(v, bool):
            raise ValueError(f"{where}: expected true or false, got {v!r}")
        return
    if key == "rescale_norm":
        if v not in ("l1", "l2", "linf", "inverse"):
            raise ValueError(f"{where}: expected one of l1, l2, linf, inverse; got {v!r}")
        return
    if key == "consensus":
        if v not in ("sum", "count"):
            raise ValueError(f"{where}: expected 'sum' or 'count', got {v!r}")
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}: expected a number, got {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"{where}: must be a finite number, got {v}")
    if key == "density" and not (0 < v <= 1):
        raise ValueError(f"{where}: density must be in (0, 1], got {v}")
    if key in ("gamma", "epsilon") and not (0 <= v < 1):
        raise ValueError(f"{where}: {key} must be in [0, 1), got {v}")
    if key == "regmean_alpha" and not (0 <= v <= 1):
        raise ValueError(f"{where}: regmean_alpha (off-diagonal scale of the Gram matrices) must be in [0, 1], got {v}")
    if key == "sv_fraction" and not (0 < v <= 1):
        raise ValueError(f"{where}: sv_fraction (share of each task matrix's rank kept) must be in (0, 1], got {v}")
    if key == "fisher_floor" and v < 0:
        raise ValueError(f"{where}: fisher_floor must be >= 0, got {v}")


#: ``base_model`` names for models shipped inside Python packages: a recipe that names one runs on
#: any machine with the package installed (the path is found at load time)
PACKAGED_MODELS = ("hm3:minilm",)


def _packaged(p: str | None) -> str | None:
    """``hm3:minilm`` → this machine's offline all-MiniLM-L6-v2 (the guard zoo's base); else ``p``."""
    if p == "hm3:minilm":
        from hm3.zoo.base import base_model_dir  # HM3Error with the pip command if not installed

        return str(base_model_dir())
    return p


def _resolve_path(p: str | None, root: Path) -> str | None:
    if p is None:
        return None
    path = Path(p).expanduser()
    if path.is_absolute():
        return str(path)
    if (root / path).exists():
        return str((root / path).resolve())
    if path.exists():
        return str(path.resolve())
    return p  # perhaps a hub id; loading says what is wrong if it is neither


def _format_validation(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the recipe format in `hm3 merge --help`)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{source}: " + "; ".join(parts)


def load_config(source: "str | Path | dict | MergeConfig") -> MergeConfig:
    """Parse and validate a recipe from a YAML file, a dict or a MergeConfig."""
    if isinstance(source, MergeConfig):
        return source
    root: Path | None = None
    name = "recipe"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise HM3Error(f"{path}: no such recipe file")
        name, root = str(path), path.resolve().parent
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise HM3Error(f"{path}: malformed YAML ({str(e).splitlines()[0]}{_yaml_where(e)})") from None
        if not isinstance(data, dict):
            raise HM3Error(f"{path}: expected a mapping with merge_method, base_model and models")
    else:
        data = source
    try:
        cfg = MergeConfig.model_validate(data)
    except ValidationError as e:
        raise HM3Error(_format_validation(e, name)) from None
    return cfg.resolved(root)


def _yaml_where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def resolve_param(value: ParamValue | None, tensor: str) -> Any:
    """The value a (possibly conditional) parameter takes for one tensor; None if no entry matches."""
    if isinstance(value, list):
        for entry in value:
            if entry.filter is None or entry.filter in tensor:
                return entry.value
        return None
    return value
