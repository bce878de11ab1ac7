"""Model search: many merges of the same models, each scored on a validation suite (Optuna).

The paper's search (HM3, Sec. 4) draws one density for all models at random, merges with
DARE-TIES, and keeps the merge with the best validation score; the test suite is scored only when
the validation best improves, so that test scores never steer the search. hm3 does the same by
default and adds smarter samplers over per-model densities and weights, the method, and shared method
parameters such as TSV-M's ``lambda`` and ``sv_fraction`` (``SearchSpace.params``, ``--param``):

* ``beta`` (default): the paper's random search. Each density is drawn from Beta(a, b), default
  Beta(1.5, 4): zero density at 0 (a > 1: no degenerate, almost-empty task vectors), mode
  (a-1)/(a+b-2) ≈ 0.14, mean a/(a+b) ≈ 0.27, 88 % of the mass below 0.5 — most trials at
  the low densities where DARE-TIES merges interfere least, some up to 1.
* ``random``: uniform over the space; ``tpe`` (multivariate, constant liar for many workers);
  ``cmaes`` (continuous parameters; a method choice is then sampled at random); ``nsga2``
  (the default for the ``pareto`` objective).

Objectives: ``average`` macro F1 over groups (default); ``worst`` — the smallest ratio of a
group's macro F1 to its original guard's (the originals are scored once on the validation suite);
``pareto`` — three objectives (average macro F1, worst-group ratio, rate of MMLU rows right in
every group) and the Pareto front is reported.

Trials are fast: task vectors are read once (``hm3.merging.fast.TaskVectors``), every trial merges
in memory into one preallocated model, validation texts are tokenised once, and a trial can be
pruned after part of the validation texts (``--prune``, single objective only).

Storage is Optuna's: ``sqlite:///DIR/study.db`` by default, or any database URL (``--storage``),
so workers on several machines share one study (``--study``). ``--trials N`` is the study's total
of finished trials: a killed search, restarted, keeps every finished trial and runs the rest.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import socket
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Sequence

import numpy as np

from hm3.errors import HM3Error

if TYPE_CHECKING:  # pragma: no cover
    import optuna

    from hm3.evaluate import Report, SuiteIndex
    from hm3.merging.fast import TaskVectors, TokenCache

log = logging.getLogger(__name__)

BETA_A, BETA_B = 1.5, 4.0
SAMPLERS = ("beta", "random", "tpe", "cmaes", "nsga2")
OBJECTIVES = ("average", "worst", "pareto")
PARETO_NAMES = ("average_macro_f1", "worst_group_ratio", "mmlu_rate")
DEFAULT_STUDY = "hm3-search"


# -- settings --------------------------------------------------------------------------------------
# shared numeric method parameters a search can draw (``--param NAME=LOW,HIGH``); which method takes
# which is hm3.config.ALLOWED. (density and weight have their own ranges; the rest are flags or names.)
SEARCHABLE = ("lambda", "sv_fraction", "gamma", "epsilon", "regmean_alpha", "fisher_floor")


@dataclass
class SearchSpace:
    """What a trial chooses. ``shared``: one density for all models (the paper); ``per-model``:
    a density and a weight per model (a method without density: the weights). ``methods``: merge
    methods to choose from (empty: the recipe's). ``params``: shared method parameters, each drawn
    from its range in every trial (e.g. ``{"lambda": (0.5, 2.0)}`` for TSV-M or task arithmetic)."""

    kind: str = "shared"
    density: tuple[float, float] = (0.01, 1.0)
    weight: tuple[float, float] = (0.3, 1.5)
    methods: tuple[str, ...] = ()
    params: dict[str, tuple[float, float]] = field(default_factory=dict)

    def check(self) -> None:
        from hm3.config import _check_value
        from hm3.merging.methods import REGISTRY

        if self.kind not in ("shared", "per-model"):
            raise HM3Error(f"search space {self.kind!r}: use 'shared' (one density, the paper) or 'per-model'")
        lo, hi = self.density
        if not (0 < lo < hi <= 1):
            raise HM3Error(f"density range {lo}..{hi}: need 0 < low < high <= 1")
        if not (0 < self.weight[0] < self.weight[1]):
            raise HM3Error(f"weight range {self.weight[0]}..{self.weight[1]}: need 0 < low < high")
        for m in self.methods:
            if m not in REGISTRY:
                raise HM3Error(f"unknown merge method {m!r} in --methods; valid: {', '.join(REGISTRY)}")
        for name, (lo, hi) in self.params.items():
            if name not in SEARCHABLE:
                raise HM3Error(f"--param {name}: not a parameter a search can draw; searchable: {', '.join(SEARCHABLE)} "
                               "(densities and weights: --density-range, --weight-range, --space per-model)")
            if not lo < hi:
                raise HM3Error(f"--param {name}={lo},{hi}: need low < high")
            for v in (lo, hi):
                try:
                    _check_value(f"--param {name}", name, v)
                except ValueError as e:
                    raise HM3Error(str(e)) from None

    def check_methods(self, methods: Sequence[str]) -> None:
        """Every method a trial may use takes the searched parameters and has something to search."""
        from hm3.config import ALLOWED
        from hm3.merging.methods import REGISTRY

        for m in methods:
            missing = [p for p in self.params if p not in ALLOWED[m]]
            if missing:
                raise HM3Error(f"merge method {m!r} takes no {', '.join(missing)}; it takes "
                               f"{', '.join(sorted(ALLOWED[m]))}")
            if not (REGISTRY[m].uses_density or self.params or self.kind == "per-model"):
                takes = [p for p in SEARCHABLE if p in ALLOWED[m]]
                raise HM3Error(f"merge method {m!r} has no density to search; "
                               + (f"search its {', '.join(takes)} with --param NAME=LOW,HIGH, " if takes else "")
                               + "its weights with --space per-model, or choose a method with a density "
                               "(e.g. ties, dare_ties) with --methods")

    def suggest(self, trial: "optuna.Trial", groups: Sequence[str], recipe_method: str) -> tuple[str | None, dict]:
        """The trial's method (None: the recipe's) and merge overrides."""
        from hm3.merging.methods import REGISTRY

        method = trial.suggest_categorical("method", list(self.methods)) if len(self.methods) > 1 else (
            self.methods[0] if self.methods else None)
        density = REGISTRY[method or recipe_method].uses_density
        out: dict[str, Any] = {}
        if self.kind == "shared":
            if density:
                out["density"] = trial.suggest_float("density", *self.density)
        else:
            if density:
                out["density"] = [trial.suggest_float(f"density_{g}", *self.density) for g in groups]
            out["weight"] = [trial.suggest_float(f"weight_{g}", *self.weight) for g in groups]
        for name, (lo, hi) in self.params.items():
            out[name] = trial.suggest_float(name, lo, hi)
        return method, out


@dataclass
class SearchSettings:
    sampler: str = "beta"
    objective: str = "average"
    space: SearchSpace = field(default_factory=SearchSpace)
    beta: tuple[float, float] = (BETA_A, BETA_B)
    prune: bool = False
    chunks: int = 4  # validation parts for pruning
    seed: int = 0
    batch_size: int = 32
    max_length: int | None = None
    truncate: bool = False  # score each text's first window only (faster; see TokenCache)
    self_merge: bool = False
    precision: str = "float32"  # forward passes of the trials: float32 | bfloat16 (TokenCache)
    # how answers are decided (hm3.model.label_thresholds): multi-label groups' thresholds, single-label
    # groups' operating points ({"group/label": t}); the original guards are scored the same way
    threshold: float = 0.5
    thresholds: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.sampler not in SAMPLERS:
            raise HM3Error(f"unknown sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}")
        if self.objective not in OBJECTIVES:
            raise HM3Error(f"unknown objective {self.objective!r}; valid: {', '.join(OBJECTIVES)}")
        if self.beta[0] <= 1 or self.beta[1] <= 0:
            raise HM3Error(f"Beta({self.beta[0]}, {self.beta[1]}): need a > 1 (zero density at 0) and b > 0")
        if self.prune and self.objective == "pareto":
            raise HM3Error("--prune works with one objective only; drop --prune or use --objective average|worst")
        if self.chunks < 1:
            raise HM3Error(f"--chunks must be at least 1, got {self.chunks}")
        from hm3.fastpaths import check_precision

        check_precision(self.precision)
        self.space.check()

    def identity(self) -> dict:
        """What must match for a worker to join an existing study."""
        space = asdict(self.space)
        if not space["params"]:  # studies made before --param existed have no such key
            del space["params"]
        ident = {"objective": self.objective, "space": space, "self_merge": self.self_merge,
                 "max_length": self.max_length, "truncate": self.truncate}
        if self.precision != "float32":  # studies made before --precision existed ran float32
            ident["precision"] = self.precision
        if self.threshold != 0.5 or self.thresholds:  # (likewise before --threshold / --label-threshold)
            ident["thresholds"] = {"default": self.threshold, **self.thresholds}
        return json.loads(json.dumps(ident))  # as stored: tuples become lists


# -- samplers --------------------------------------------------------------------------------------
def beta_sampler(a: float = BETA_A, b: float = BETA_B, seed: int = 0) -> "optuna.samplers.BaseSampler":
    """The paper's random search: every ``density*`` parameter ~ Beta(a, b) (clipped to its
    range), other floats uniform, categories uniform. Draws are seeded by ``(seed, trial number)``,
    so restarted or parallel workers never repeat a trial."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    class BetaSampler(optuna.samplers.BaseSampler):
        def __init__(self):
            self.a, self.b, self.seed = a, b, seed

        def infer_relative_search_space(self, study, trial):
            return {}

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, name, dist):
            # one stream per (seed, trial, parameter): independent of order and of other workers
            key = int.from_bytes(hashlib.sha256(f"{self.seed}/{trial.number}/{name}".encode()).digest()[:8], "little")
            rng = np.random.default_rng(key)
            if isinstance(dist, FloatDistribution):
                if name.startswith("density"):
                    x = float(rng.beta(self.a, self.b))
                    return float(min(max(x, dist.low), dist.high))
                return float(rng.uniform(dist.low, dist.high))
            if isinstance(dist, IntDistribution):
                return int(rng.integers(dist.low, dist.high + 1))
            if isinstance(dist, CategoricalDistribution):
                return dist.choices[int(rng.integers(len(dist.choices)))]
            raise NotImplementedError(type(dist).__name__)

    return BetaSampler()


def make_sampler(settings: SearchSettings, seed: int) -> "optuna.samplers.BaseSampler":
    import optuna

    s = settings.sampler
    if s == "beta":
        return beta_sampler(*settings.beta, seed=seed)
    if s == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=10)
    if s == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise HM3Error("the cmaes sampler needs the `cmaes` package: pip install 'hm3[search]'") from None
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=5, warn_independent_sampling=False,
                                            independent_sampler=optuna.samplers.RandomSampler(seed=seed))
    return optuna.samplers.NSGAIISampler(seed=seed)


def storage_for(url: str | None, out: Path) -> "optuna.storages.BaseStorage":
    """Optuna RDB storage: the default SQLite file in ``out``, or any SQLAlchemy URL. Heartbeats
    let a worker mark the running trials of a killed worker as failed."""
    import optuna
    from sqlalchemy.exc import IntegrityError

    url = url or f"sqlite:///{(out / 'study.db').resolve()}"
    warnings.filterwarnings("ignore", message=".*heartbeat_interval.*")  # experimental in Optuna, stable enough here
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}
    else:
        kwargs["pool_pre_ping"] = True
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=15, grace_period=60)
        except Exception as e:  # bad URL, server down, missing driver
            # Workers starting together race to create Optuna's tables; the loser sees a duplicate
            # key and succeeds once the tables exist.
            # (PostgreSQL: UniqueViolation; SQLite: "UNIQUE constraint failed: alembic_version".)
            if attempt < 4 and (isinstance(e, IntegrityError) or "UniqueViolation" in repr(e)
                                or "already exists" in str(e)):
                time.sleep(0.5 + attempt)
                continue
            raise HM3Error(
                f"cannot open the study storage {_redact(url)} ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from None
    raise AssertionError("unreachable")


def _redact(url: str) -> str:
    """A URL without its password, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':')[0]}{':***' if ':' in cred else ''}@{host}"
    return url


# -- the search ------------------------------------------------------------------------------------
def self_merge_config(config):
    """One model merged with itself: the recipe's single model twice (groups ``g`` and ``g-self``);
    the suite scores ``g``. Random methods drop different elements in the two copies."""
    from hm3.config import MergeConfig, load_config

    cfg = load_config(config)
    if len(cfg.models) != 1:
        raise HM3Error(f"--self-merge needs a recipe with exactly one model; it has {len(cfg.models)}")
    data = cfg.model_dump(mode="json", exclude_none=True, by_alias=True)
    m = data["models"][0]
    group = m.get("group") or _group_of(m["model"])
    first = dict(m, group=group)
    second = dict(m, group=f"{group}-self")
    data["models"] = [first, second]
    return MergeConfig.model_validate(data)


def _group_of(model: str) -> str:
    from hm3.labels import group_name_from

    return group_name_from(Path(model.rstrip("/")).name)


@dataclass
class Context:
    """Everything a trial needs, built once per worker."""

    settings: SearchSettings
    tv: "TaskVectors"
    variants: dict[str, "TaskVectors"]
    clf: Any  # GroupwiseClassifier over the preallocated model
    groups: list[str]  # merged groups the suites check
    val_index: "SuiteIndex"
    val_cache: "TokenCache"
    test_index: "SuiteIndex | None"
    test_cache: "TokenCache | None"
    originals: dict[str, float] | None  # original guards' validation macro F1 per group
    originals_test: dict[str, float] | None = None


def _restrict(rows, groups: Sequence[str], what: str):
    from hm3.evaluate import SuiteRow

    keep = set(groups)
    out, dropped = [], set()
    for r in rows:
        exp = {g: v for g, v in r.expected.items() if g in keep}
        dropped |= set(r.expected) - keep
        if exp:
            out.append(SuiteRow(r.text, exp, r.sources, r.where))
    if dropped:
        log.info("%s: ignoring groups not in the merge: %s", what, ", ".join(sorted(dropped)))
    if not out:
        raise HM3Error(f"{what}: no row checks any of the merged groups ({', '.join(groups)})")
    return out


def search_recipe(config, settings: SearchSettings):
    """The recipe a search merges (with ``self_merge``: the model and its copy), checked against the
    search space: every method a trial may use takes the searched parameters."""
    from hm3.config import load_config

    cfg = self_merge_config(config) if settings.self_merge else load_config(config)
    settings.space.check_methods(settings.space.methods or [cfg.merge_method])
    return cfg


def build_context(config, validation, test, settings: SearchSettings, progress: bool = False) -> Context:
    from hm3.evaluate import SuiteIndex, load_suite
    from hm3.merging.engine import prepare
    from hm3.merging.fast import TaskVectors, TokenCache

    t0 = time.perf_counter()
    tv = TaskVectors.from_prepared(prepare(search_recipe(config, settings)), progress=progress)
    variants = {m: tv.with_method(m) for m in settings.space.methods} or {tv.prep.method.name: tv}
    kw = {"max_length": settings.max_length} if settings.max_length else {}
    clf = tv.classifier(threshold=settings.threshold, thresholds=settings.thresholds, **kw)
    space = tv.prep.space
    val_rows = _restrict(load_suite(validation) if not isinstance(validation, list) else validation, space.names,
                         str(validation) if not isinstance(validation, list) else "validation")
    labels = {g.name: list(g.labels) for g in space}
    multi = space.multi_label()
    val_index = SuiteIndex(val_rows, labels, str(validation) if not isinstance(validation, list) else "validation",
                           multi_label=multi)
    groups = val_index.groups
    chunks = settings.chunks if settings.prune else 1
    val_cache = TokenCache(clf, val_index.texts, batch_size=settings.batch_size, chunks=chunks, seed=settings.seed,
                           truncate=settings.truncate, precision=settings.precision)
    test_index = test_cache = None
    if test is not None:
        test_rows = _restrict(load_suite(test) if not isinstance(test, list) else test, space.names,
                              str(test) if not isinstance(test, list) else "test")
        test_index = SuiteIndex(test_rows, labels, str(test) if not isinstance(test, list) else "test", multi_label=multi)
        test_cache = TokenCache(clf, test_index.texts, batch_size=settings.batch_size, truncate=settings.truncate,
                                precision=settings.precision)
    ctx = Context(settings, tv, variants, clf, groups, val_index, val_cache, test_index, test_cache, None)
    if settings.objective != "average":
        ctx.originals = originals_scores(tv, val_index, settings)
    log.info("search ready in %.1fs: %d models, %d validation texts (%d windows, %d tokens)%s",
             time.perf_counter() - t0, len(tv.prep.models), len(val_index.texts), val_cache.n_windows,
             val_cache.n_tokens, f", {len(test_index.texts)} test texts" if test_index else "")
    return ctx


def originals_scores(tv: "TaskVectors", index: "SuiteIndex", settings: SearchSettings) -> dict[str, float]:
    """Each original guard's macro F1 on its own group of the suite (the ``worst`` denominators)."""
    from hm3.evaluate import score_group, score_multi_label
    from hm3.model import load, unanswered

    out = {}
    kw = {"max_length": settings.max_length} if settings.max_length else {}
    for entry, g in zip(tv.prep.config.models, tv.prep.space):
        if g.name not in index.groups or g.name in out:
            continue
        clf = load(entry.model, **kw)
        own_group = clf.groups[0]  # the guard's group (named after its directory): the merged group's thresholds
        clf.set_thresholds(settings.threshold, {own_group + k[len(g.name):]: v for k, v in settings.thresholds.items()
                                                if k == g.name or k.startswith(g.name + "/")})
        tids = index.texts_of([g.name])
        probs = clf.predict_proba([index.texts[t] for t in tids], batch_size=settings.batch_size)
        own = next(iter(probs.values()))  # a guard has one group; its labels are the merged group's
        pred = unanswered(g, len(index.texts))
        pred[tids] = clf.decisions(clf.space[own_group], own)
        score = score_multi_label if g.multi_label else score_group
        out[g.name] = score(g.name, entry.model, g.labels, index.expected[g.name], pred[index.text_index[g.name]]).macro_f1
    log.info("original guards on validation: %s", ", ".join(f"{g} {v:.4f}" for g, v in out.items()))
    return out


def objective_values(report: "Report", ctx: Context) -> tuple[float, ...]:
    """The trial's value(s) from a validation report."""
    avg = report.average_macro_f1
    if ctx.settings.objective == "average":
        return (avg,)
    worst = report.worst_ratio(ctx.originals) if ctx.originals else min(report.f1().values())
    if ctx.settings.objective == "worst":
        return (worst,)
    benign = report.benign["rate"] if report.benign else float("nan")
    return (avg, worst, benign)


def _finite(v: float) -> float:
    return v if v is not None and math.isfinite(v) else 0.0


def run_trial(trial: "optuna.Trial", ctx: Context) -> "float | tuple[float, ...]":
    import optuna

    t0, cpu0 = time.perf_counter(), time.process_time()
    method, overrides = ctx.settings.space.suggest(trial, [g.name for g in ctx.tv.prep.space], ctx.tv.prep.method.name)
    tv = ctx.variants[method] if method else next(iter(ctx.variants.values()))
    seed = tv.prep.config.seed
    try:
        tv.merge_into(ctx.clf.model, overrides, seed)
    except (ValueError, HM3Error) as e:  # e.g. DELLA with density ± epsilon outside (0, 1)
        trial.set_user_attr("error", str(e))
        raise optuna.TrialPruned(f"merge failed: {e}") from None
    t_merge = time.perf_counter() - t0
    for key in ("density", "weight"):  # what the scores are plotted against
        if key in overrides:
            trial.set_user_attr(f"{key}_mean", float(np.mean(overrides[key])))
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr("method", tv.prep.method.name)
    steps = ctx.val_cache.predict(ctx.clf.model, ctx.groups)
    n_chunks = len(ctx.val_cache.chunks)
    for step, (done, labels) in enumerate(steps):
        if step < n_chunks - 1:
            if ctx.settings.prune:
                partial = objective_values(ctx.val_index.score(labels, done=done), ctx)[0]
                trial.report(_finite(partial), step)
                if trial.should_prune():
                    trial.set_user_attr("seconds", time.perf_counter() - t0)
                    raise optuna.TrialPruned(f"validation so far {partial:.4f}")
            continue
        report = ctx.val_index.score(labels)
    t_val = time.perf_counter() - t0 - t_merge
    values = tuple(_finite(v) for v in objective_values(report, ctx))
    for g, f in report.f1().items():
        trial.set_user_attr(f"val_{g}", f)
    trial.set_user_attr("val_average", report.average_macro_f1)
    if report.benign:
        trial.set_user_attr("val_mmlu_rate", report.benign["rate"])
    if ctx.originals:
        trial.set_user_attr("val_worst_ratio", report.worst_ratio(ctx.originals))
    t_trial, cpu_trial = time.perf_counter() - t0, time.process_time() - cpu0
    if ctx.test_index is not None and _improves(trial, values):
        t_test = time.perf_counter()
        for _, test_labels in ctx.test_cache.predict(ctx.clf.model, ctx.groups):
            pass  # one chunk: all test texts
        test_report = ctx.test_index.score(test_labels)
        trial.set_user_attr("test_average", test_report.average_macro_f1)
        for g, f in test_report.f1().items():
            trial.set_user_attr(f"test_{g}", f)
        if test_report.benign:
            trial.set_user_attr("test_mmlu_rate", test_report.benign["rate"])
        trial.set_user_attr("test_seconds", time.perf_counter() - t_test)
    # a trial's cost is merge + validation; test scoring (when the best improves) is counted apart
    trial.set_user_attr("merge_seconds", t_merge)
    trial.set_user_attr("validation_seconds", t_val)
    trial.set_user_attr("seconds", t_trial)
    trial.set_user_attr("cpu_seconds", cpu_trial)  # summed over threads: with wall seconds, shows contention
    return values[0] if len(values) == 1 else values


def _improves(trial: "optuna.Trial", values: tuple[float, ...]) -> bool:
    """Single objective: better than every finished trial. Several: dominated by none."""
    import optuna

    done = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        return True
    if len(values) == 1:
        return values[0] > max(t.value for t in done)
    for t in done:
        other = t.values
        if all(o >= v for o, v in zip(other, values)) and any(o > v for o, v in zip(other, values)):
            return False
    return True


@dataclass
class SearchResult:
    out: Path
    study_name: str
    trials: int
    best_number: int | None
    best_values: tuple[float, ...] | None
    best_test: float | None
    best_recipe: Path | None
    seconds_per_trial: float | None
    pareto: list[dict] = field(default_factory=list)


def open_study(settings: SearchSettings, out: Path, storage: str | None, study_name: str) -> "optuna.Study":
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = storage_for(storage, out)
    directions = ["maximize"] * (3 if settings.objective == "pareto" else 1)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0) if settings.prune else optuna.pruners.NopPruner()
    try:
        study = optuna.create_study(study_name=study_name, storage=store, directions=directions, load_if_exists=True,
                                    pruner=pruner)
    except ValueError as e:
        raise HM3Error(f"study {study_name!r}: {e}; use another --study") from None
    ident = settings.identity()
    have = study.user_attrs.get("hm3")
    if have is None:
        study.set_user_attr("hm3", ident)
    elif have != ident:
        raise HM3Error(f"study {study_name!r} in {_redact(storage or str(out / 'study.db'))} was made with other settings "
                       f"({json.dumps(have)}); use another --study or the same settings")
    return study


def finished(study) -> int:
    import optuna

    S = optuna.trial.TrialState
    return len(study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED)))


def run_search(
    config,
    validation,
    test,
    trials: int,
    out: str | os.PathLike,
    settings: SearchSettings | None = None,
    *,
    storage: str | None = None,
    study_name: str = DEFAULT_STUDY,
    progress: bool = True,
    write_best: bool = True,
) -> SearchResult:
    """Run (or continue) a search until the study holds ``trials`` finished trials; then write
    ``trials.csv``, ``best/`` (model + ``recipe.yaml``), the score plot (against density, or the first
    searched parameter) and a summary."""
    import optuna

    settings = settings or SearchSettings()
    settings.check()
    if trials < 1:
        raise HM3Error(f"--trials must be at least 1, got {trials}")
    search_recipe(config, settings)  # a recipe the space does not fit fails before a study is made with its settings
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    study = open_study(settings, out, storage, study_name)
    remaining = trials - finished(study)
    if remaining > 0:
        ctx = build_context(config, validation, test, settings, progress=progress)
        # a fresh seed per (re)start: a restarted worker must not replay the sampler's draws
        sampler_seed = settings.seed + 7919 * len(study.trials)
        study.sampler = make_sampler(settings, sampler_seed)
        S = optuna.trial.TrialState
        stop = optuna.study.MaxTrialsCallback(trials, states=(S.COMPLETE, S.PRUNED))
        with _SearchProgress(progress, trials, study) as bar:
            study.optimize(lambda t: run_trial(t, ctx), n_trials=remaining, callbacks=[stop, bar.callback],
                           catch=(), gc_after_trial=False)
        if ctx.originals:
            (out / "originals-validation.json").write_text(json.dumps(ctx.originals, indent=2) + "\n")
    else:
        log.info("study %r already has %d finished trials (asked for %d): writing outputs only", study_name,
                 finished(study), trials)
    return write_outputs(study, config, out, settings, write_best=write_best)


class _SearchProgress:
    """A rich progress bar over the study's finished trials, showing the best score so far."""

    def __init__(self, enabled: bool, total: int, study):
        self.enabled, self.total, self.study = enabled, total, study

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn())
            self.bar.__enter__()
            self.task = self.bar.add_task(self._label(), total=self.total, completed=finished(self.study))
        return self

    def _label(self) -> str:
        best = _best_trials(self.study)
        if not best:
            return "search: no finished trial yet"
        if len(self.study.directions) == 1:
            return f"search: best {best[0].value:.4f} (trial {best[0].number})"
        return f"search: Pareto front of {len(best)}"

    def callback(self, study, trial) -> None:
        if self.enabled:
            self.bar.update(self.task, completed=min(finished(study), self.total), description=self._label())

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)


def _best_trials(study) -> list:
    import optuna

    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    return list(study.best_trials)


# -- outputs ---------------------------------------------------------------------------------------
def trial_rows(study) -> list[dict]:
    """One flat dict per trial: number, state, value(s), parameters, scores and timings."""
    rows = []
    names = PARETO_NAMES if len(study.directions) > 1 else ("value",)
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        vals = t.values or [None] * len(names)
        row.update({n: v for n, v in zip(names, vals)})
        row.update(t.params)
        row.update(t.user_attrs)
        row["datetime_start"] = t.datetime_start.isoformat() if t.datetime_start else ""
        rows.append(row)
    return rows


def write_trials_csv(rows: list[dict], path: Path) -> None:
    from hm3.io import write_text_atomic

    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    write_text_atomic(path, buf.getvalue())


def score_axis(rows: list[dict], settings: SearchSettings) -> tuple[str, str, str]:
    """What the trials' scores are plotted against: ``(row key, name, axis label)`` — the (mean) density
    where trials drew one, else the first searched method parameter, else the mean weight."""
    if any(r.get("density_mean") is not None for r in rows):
        return "density_mean", "density", "density (mean over models)"
    if settings.space.params:
        name = next(iter(settings.space.params))
        return name, name, name
    return "weight_mean", "weight", "weight (mean over models)"


def plot_density_scores(rows: list[dict], path: Path, title: str = "", x: str = "density_mean",
                        x_label: str = "density (mean over models)") -> None:
    """The paper's Figure 3: validation score of every trial against its (mean) density (or another
    drawn value, ``x``), with the test score of the trials that improved the validation best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "value" if any("value" in r for r in rows) else PARETO_NAMES[0]
    done = [r for r in rows if r["state"] == "COMPLETE" and r.get(key) is not None and r.get(x) is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter([r[x] for r in done], [r[key] for r in done], s=10, alpha=0.6, label="validation")
    tested = [r for r in done if r.get("test_average") is not None]
    ax.scatter([r[x] for r in tested], [r["test_average"] for r in tested], s=28, marker="x",
               color="tab:red", label="test (validation best improved)")
    ax.set_xlabel(x_label)
    ax.set_ylabel("average macro F1" if key in ("value", PARETO_NAMES[0]) else key)
    ax.set_title(title or f"{len(done)} trials")
    if x == "density_mean":
        ax.set_xlim(0, 1)
    ax.legend(loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _trial_overrides(trial, groups: Sequence[str]) -> tuple[str | None, dict]:
    """The merge overrides a trial drew (``SearchSpace.suggest``'s), from its stored parameters."""
    p = trial.params
    out: dict[str, Any] = {}
    if "density" in p:
        out["density"] = p["density"]
    for key in ("density", "weight"):
        if f"{key}_{groups[0]}" in p:
            out[key] = [p[f"{key}_{g}"] for g in groups]
    out.update({k: p[k] for k in SEARCHABLE if k in p})
    return p.get("method"), out


def best_recipe(study, trial, config, settings: SearchSettings):
    """The trial's recipe: the search's recipe with the trial's values in ``models[i].parameters``."""
    from hm3.config import load_config
    from hm3.merging.fast import recipe_with

    cfg = self_merge_config(config) if settings.self_merge else load_config(config)
    groups = [m.group or _group_of(m.model) for m in cfg.models]
    method, overrides = _trial_overrides(trial, groups)
    if method:
        overrides["method"] = method
    return recipe_with(cfg, overrides)


def write_outputs(study, config, out: Path, settings: SearchSettings, write_best: bool = True) -> SearchResult:
    import hm3
    from hm3.io import write_text_atomic

    rows = trial_rows(study)
    write_trials_csv(rows, out / "trials.csv")
    best = _best_trials(study)
    multi = len(study.directions) > 1
    pareto = []
    chosen = None
    if best:
        if multi:
            pareto = [{"number": t.number, **dict(zip(PARETO_NAMES, t.values)), **t.params} for t in best]
            write_trials_csv(pareto, out / "pareto.csv")
            chosen = max(best, key=lambda t: t.values[0])  # the front's best average is written to best/
        else:
            chosen = best[0]
    x, name, label = score_axis(rows, settings)
    plot_density_scores(rows, out / f"{name}_vs_score.png", x=x, x_label=label)
    recipe_path = None
    if chosen is not None and write_best:
        recipe = best_recipe(study, chosen, config, settings)
        hm3.merge(recipe, out / "best", force=True, progress=False)
        recipe_path = out / "best" / "recipe.yaml"
        write_text_atomic(recipe_path, recipe.to_yaml())
        write_text_atomic(out / "best" / "search.json", json.dumps({
            "trial": chosen.number, "values": chosen.values, "params": chosen.params,
            "user_attrs": chosen.user_attrs, "study": study.study_name}, indent=2) + "\n")
    times = [r["seconds"] for r in rows if r["state"] == "COMPLETE" and r.get("seconds")]
    result = SearchResult(
        out=out,
        study_name=study.study_name,
        trials=finished(study),
        best_number=chosen.number if chosen else None,
        best_values=tuple(chosen.values) if chosen else None,
        best_test=_best_test(rows, chosen),
        best_recipe=recipe_path,
        seconds_per_trial=float(np.median(times)) if times else None,
        pareto=pareto,
    )
    write_text_atomic(out / "summary.md", summary_markdown(result, rows, settings))
    return result


def _best_test(rows: list[dict], chosen) -> float | None:
    if chosen is None:
        return None
    return next((r.get("test_average") for r in rows if r["number"] == chosen.number), None)


def summary_markdown(result: SearchResult, rows: list[dict], settings: SearchSettings) -> str:
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    lines = [
        f"# Search `{result.study_name}`",
        "",
        f"sampler `{settings.sampler}`"
        + (f" Beta({settings.beta[0]}, {settings.beta[1]})" if settings.sampler == "beta" else "")
        + f", space `{settings.space.kind}`, objective `{settings.objective}`, prune {settings.prune}, seed {settings.seed}"
        + (f", forward passes in {settings.precision} (`best/` is float32; `hm3 eval` scores it in float32)"
           if settings.precision != "float32" else "")
        + (", answers decided at " + ", ".join([f"threshold {settings.threshold:g}"] * (settings.threshold != 0.5)
                                                + [f"{k}={v:g}" for k, v in settings.thresholds.items()])
           + " (score `best/` with the same `--threshold` / `--label-threshold`)"
           if settings.threshold != 0.5 or settings.thresholds else ""),
        "",
        "trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())),
        f"median seconds per finished trial: {result.seconds_per_trial:.2f}" if result.seconds_per_trial else "",
        "",
    ]
    if result.best_number is not None:
        lines.append(f"best trial {result.best_number}: validation {', '.join(f'{v:.4f}' for v in result.best_values)}"
                     + (f", test average macro F1 {result.best_test:.4f}" if result.best_test is not None else ""))
    if result.pareto:
        lines += ["", "## Pareto front", "", "| trial | " + " | ".join(PARETO_NAMES) + " |",
                  "|---:|" + "---:|" * len(PARETO_NAMES)]
        for p in sorted(result.pareto, key=lambda p: -p[PARETO_NAMES[0]]):
            lines.append(f"| {p['number']} | " + " | ".join(f"{p[n]:.4f}" for n in PARETO_NAMES) + " |")
    name = score_axis(rows, settings)[1]
    lines += ["", f"![{name} vs score]({name}_vs_score.png)", ""]
    return "\n".join(lines)


# -- comparing samplers ----------------------------------------------------------------------------
def read_trials(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "trials.csv"
    if not path.is_file():
        raise HM3Error(f"{path}: no trials.csv; run `hm3 search ... --out {path.parent}` first")
    with path.open() as fh:
        return list(csv.DictReader(fh))


def trials_to_reach(rows: list[dict], target: float, key: str = "value") -> tuple[int | None, float | None]:
    """Trials (in trial-number order, pruned ones included) and seconds until a finished trial
    scores at least ``target``; ``(None, None)`` if none does."""
    total = 0.0
    for i, r in enumerate(sorted(rows, key=lambda r: int(r["number"]))):
        total += float(r.get("seconds") or 0)
        if r["state"] == "COMPLETE" and r.get(key) not in (None, "") and float(r[key]) >= target - 1e-12:
            return i + 1, total
    return None, None


def compare_runs(dirs: Sequence[str | os.PathLike], reference: str | os.PathLike | None = None) -> str:
    """A Markdown table: for each search directory, its best validation score and the trials (and
    seconds) it needed to reach the best validation score of ``reference`` (default: the first)."""
    runs = {str(d): read_trials(d) for d in dirs}
    ref = str(reference or dirs[0])
    ref_rows = runs.get(ref) or read_trials(ref)
    done = [float(r["value"]) for r in ref_rows if r["state"] == "COMPLETE" and r.get("value")]
    if not done:
        raise HM3Error(f"{ref}: no finished trial to take a target from")
    target = max(done)
    lines = [f"target: best validation score of `{ref}` = {target:.4f} ({len(ref_rows)} trials)", "",
             "| run | trials | best validation | trials to reach target | seconds to reach target |",
             "|---|---:|---:|---:|---:|"]
    for d, rows in runs.items():
        vals = [float(r["value"]) for r in rows if r["state"] == "COMPLETE" and r.get("value")]
        n, secs = trials_to_reach(rows, target)
        lines.append(f"| `{d}` | {len(rows)} | {max(vals) if vals else float('nan'):.4f} | "
                     f"{n if n is not None else 'not reached'} | {f'{secs:.0f}' if secs is not None else '–'} |")
    return "\n".join(lines) + "\n"


# -- CLI -------------------------------------------------------------------------------------------
def _pair(text: str, what: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise HM3Error(f"{what} {text!r}: expected two numbers 'low,high'") from None
    return a, b


def _params(items: Sequence[str] | None) -> dict[str, tuple[float, float]]:
    """``--param NAME=LOW,HIGH`` options as ``{name: (low, high)}``."""
    out: dict[str, tuple[float, float]] = {}
    for item in items or ():
        name, sep, rng = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise HM3Error(f"--param {item!r}: expected NAME=LOW,HIGH, e.g. lambda=0.5,2")
        if name in out:
            raise HM3Error(f"--param {name} given twice")
        out[name] = _pair(rng, f"--param {name}")
    return out


def register(app, user_errors) -> None:
    import typer

    from hm3.labels import LABEL_THRESHOLD_HELP

    @app.command("search")
    @user_errors
    def search_command(
        config: Path = typer.Argument(..., help="Recipe to search around (method, base, models, seed)."),
        validation: Optional[Path] = typer.Option(None, "--validation", help="Validation suite (JSONL, text + expected)."),
        validation_data: Optional[List[str]] = typer.Option(
            None, "--validation-data", help="GROUP=FILE: a labelled validation set of one group (.jsonl rows "
                                            "{\"text\", \"label\"}, .csv / .tsv columns text, label; repeat), instead "
                                            "of or beside --validation."),
        test: Optional[Path] = typer.Option(None, "--test", help="Test suite: scored when the validation best improves."),
        test_data: Optional[List[str]] = typer.Option(None, "--test-data", help="GROUP=FILE: as --validation-data, "
                                                      "for the test scores."),
        trials: int = typer.Option(100, "--trials", min=1, help="Finished trials the study should hold."),
        out: Path = typer.Option(..., "--out", "-o", help="Output directory (study.db, trials.csv, best/, plot)."),
        sampler: str = typer.Option("beta", "--sampler", help=f"One of {', '.join(SAMPLERS)}."),
        objective: str = typer.Option("average", "--objective", help="average | worst | pareto."),
        space: Optional[str] = typer.Option(None, "--space", help="shared (one density) | per-model (density and "
                                            "weight per model). Default: shared for beta/random, else per-model."),
        methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated methods to choose from."),
        density: str = typer.Option("0.01,1.0", "--density-range"),
        weight: str = typer.Option("0.3,1.5", "--weight-range"),
        param: Optional[List[str]] = typer.Option(
            None, "--param", help="NAME=LOW,HIGH: also draw this shared parameter of the method in every trial "
                                  f"(one of {', '.join(SEARCHABLE)}, as the method takes; e.g. lambda=0.5,2 for tsv; "
                                  "repeat)."),
        beta_a: float = typer.Option(BETA_A, "--beta-a"),
        beta_b: float = typer.Option(BETA_B, "--beta-b"),
        prune: Optional[bool] = typer.Option(None, "--prune/--no-prune", help="Prune hopeless trials on partial "
                                             "validation (default: on for tpe/cmaes)."),
        chunks: int = typer.Option(4, "--chunks", min=1, help="Validation parts when pruning."),
        storage: Optional[str] = typer.Option(None, "--storage", help="Database URL (default: sqlite in --out)."),
        study: str = typer.Option(DEFAULT_STUDY, "--study", help="Study name shared by workers."),
        seed: int = typer.Option(0, "--seed", help="Sampler seed (give each worker its own)."),
        batch_size: int = typer.Option(32, "--batch-size", min=1),
        max_length: Optional[int] = typer.Option(None, "--max-length", help="Token window (default: the model's)."),
        truncate: bool = typer.Option(False, "--truncate", help="Score each text's first window only (faster)."),
        precision: str = typer.Option("float32", "--precision", help="Trials' forward passes: float32 | bfloat16 "
                                      "(autocast; several times faster on CPUs with AMX or AVX512-BF16, labels can "
                                      "differ near a decision boundary)."),
        self_merge: bool = typer.Option(False, "--self-merge", help="Merge the recipe's one model with itself."),
        threshold: float = typer.Option(0.5, "--threshold", help="Multi-label groups: a label is predicted at a "
                                        "score of at least this (trials and original guards alike)."),
        label_threshold: Optional[List[str]] = typer.Option(None, "--label-threshold", help=LABEL_THRESHOLD_HELP),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Search merge densities, weights and method parameters on a validation suite (the paper's model
        search, and better)."""
        from hm3.evaluate import suite_and_data
        from hm3.io import group_pairs
        from hm3.model import thresholds_option

        val_files = group_pairs(validation_data, "--validation-data", "FILE", "jailbreak=jb-val.csv")
        if val_files:  # otherwise the suite file itself (its path names it in the outputs)
            validation, _ = suite_and_data(validation, val_files, "--validation FILE and/or --validation-data GROUP=FILE")
        elif validation is None:
            raise HM3Error("nothing to score the trials on: pass --validation FILE and/or --validation-data GROUP=FILE")
        test_files = group_pairs(test_data, "--test-data", "FILE", "jailbreak=jb-test.csv")
        if test_files:
            test, _ = suite_and_data(test, test_files, "--test FILE and/or --test-data GROUP=FILE")
        kind = space or ("shared" if sampler in ("beta", "random") else "per-model")
        settings = SearchSettings(
            sampler=sampler, objective=objective,
            space=SearchSpace(kind, _pair(density, "--density-range"), _pair(weight, "--weight-range"),
                              tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else (),
                              _params(param)),
            beta=(beta_a, beta_b),
            prune=(sampler in ("tpe", "cmaes") and objective != "pareto") if prune is None else prune,
            chunks=chunks, seed=seed, batch_size=batch_size, max_length=max_length, truncate=truncate,
            self_merge=self_merge, precision=precision, threshold=threshold,
            thresholds=thresholds_option(label_threshold),
        )
        result = run_search(config, validation, test, trials, out, settings, storage=storage, study_name=study,
                            progress=progress)
        typer.echo((out / "summary.md").read_text())
        if result.best_recipe:
            typer.echo(f"best model: {out / 'best'} (recipe {result.best_recipe})")

    @app.command("search-compare")
    @user_errors
    def compare_command(
        runs: List[Path] = typer.Argument(..., help="Search output directories (the first gives the target)."),
        reference: Optional[Path] = typer.Option(None, "--reference", help="Run whose best validation score is the target."),
    ) -> None:
        """Trials each search needed to reach the best validation score of a reference search."""
        typer.echo(compare_runs(runs, reference))
