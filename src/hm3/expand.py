"""Write a recipe's models with their heads expanded to the merged label space.

``expand_models(recipe, out)`` writes, for every model of the recipe, an ordinary
``*ForSequenceClassification`` directory whose output head has one row per label of the merged
space: the model's own group keeps its rows, every other row is zero. The base (when the recipe
has one) is written the same way with an all-zero head. These are exactly the tensors hm3's engine
merges internally (``Prepared.inputs``), so any other tool — mergekit in particular — can merge
the same models and its result can be compared tensor by tensor::

    out/
      <group>/          one per model: config.json (merged id2label), model.safetensors, tokenizer
      _base/            the base model (group names cannot start with "_", so no clash)
      mergekit.yml      the recipe in mergekit's terms, over the directories above

Every expanded config carries hm3's group metadata, so ``hm3.load`` gives group-wise softmax for
an expanded model and for a mergekit merge of them (mergekit copies the base's config).

``mergekit_recipe`` translates an hm3 recipe into mergekit's; where mergekit cannot express hm3's
semantics (a head density below 1, which hm3 applies to each group's own rows; Model Stock's head;
hm3-only keys) it says how the result will differ. Do not import torch at module level: the CLI
registers this module's command when ``hm3 --help`` runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hm3.errors import FORCE_HELP, HM3Error

log = logging.getLogger(__name__)

BASE = "_base"  # directory and key of the expanded base model
MERGEKIT_RECIPE = "mergekit.yml"
HM3_ONLY = ("rescale_norm", "consensus")  # hm3 parameters mergekit 0.1.5 does not have
MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                    "breadcrumbs_ties", "della", "della_linear", "model_stock")


def expand_models(config, out_dir, *, force: bool = False, allow_pickle: bool = False) -> dict[str, Path]:
    """Write every model of ``config`` (and its base) as an expanded classifier under ``out_dir``.

    Returns ``{group: directory}`` for the models plus ``{"_base": directory}`` when the recipe has
    a base model. ``out_dir`` is written atomically; an existing one is refused unless ``force``.
    Weights are written as float32 (as the engine reads them); all expanded models are held in
    memory until written, which is fine for encoder classifiers of a few hundred MB.
    """
    import torch

    from hm3.heads import expand_out
    from hm3.io import AtomicDir, prepare_output
    from hm3.merging.engine import merged_config, prepare, tokenizer_source

    out_dir = Path(out_dir)
    prepare_output(out_dir, force)  # fail before loading anything
    prep = prepare(config, allow_pickle=allow_pickle)
    space = prep.space
    names = [g.name for g in space]
    with_base = prep.base is not None
    targets = names + ([BASE] if with_base else [])
    states: dict[str, dict[str, torch.Tensor]] = {t: {} for t in targets}

    for name, kind, base, _deltas in prep.inputs():
        # The models' own tensors, not base + delta: re-adding the delta could round differently
        # in the last bit, and another tool must see the very tensors hm3 started from.
        for group, ckpt in zip(names, prep.models):
            t = ckpt.tensor(name)
            states[group][name] = (expand_out(t, space, group) if kind == "out" else t).contiguous()
        if with_base:
            # `base` is what the engine merges against: the base's tensor, a zero head (`out`), or
            # zeros for a head layer a headless base lacks; a `copy` tensor is the models' own.
            states[BASE][name] = base.contiguous()

    recipe_text = None
    try:
        recipe, notes = mergekit_recipe(prep.config, {t: (out_dir / t).resolve() for t in targets}, prep=prep)
        recipe_text = _recipe_yaml(recipe, notes, prep.config.seed)
        for n in notes:
            log.warning("mergekit recipe: %s", n)
    except HM3Error as e:
        log.warning("no %s written: %s", MERGEKIT_RECIPE, e)

    tok_src = tokenizer_source(prep)
    with AtomicDir(out_dir, force) as tmp:
        for target in targets:
            _write(tmp / target, states.pop(target), _expanded_config(prep, merged_config, target), tok_src)
        if recipe_text is not None:
            (tmp / MERGEKIT_RECIPE).write_text(recipe_text)
    log.info("wrote %d expanded models (%d labels) to %s", len(targets), space.total, out_dir)
    return {t: out_dir / t for t in targets}


def _expanded_config(prep, merged_config, target: str):
    """The merged model's config (all labels, groups) marked as one expanded input model."""
    cfg = merged_config(prep)
    cfg.dtype = "float32"  # tensors are read as float32 and written unchanged
    source = prep.base if target == BASE else prep.models[[g.name for g in prep.space].index(target)]
    cfg.hm3 = {
        "format": 1,
        "groups": prep.space.to_json(),
        "expanded": {"group": None if target == BASE else target, "source": str(source.path)},
    }
    return cfg


def _write(path: Path, state, config, tokenizer_src: Path) -> None:
    from safetensors.torch import save_file

    from hm3.io import copy_tokenizer

    path.mkdir()
    config.save_pretrained(str(path))
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    copy_tokenizer(tokenizer_src, path)  # byte for byte, as the merged model's


# -- mergekit recipe -------------------------------------------------------------------------------
def mergekit_recipe(config, paths: dict[str, Path], *, prep=None) -> tuple[dict, list[str]]:
    """mergekit 0.1.5's recipe for merging the expanded models in ``paths`` (from ``expand_models``).

    Returns ``(recipe, notes)``: ``notes`` lists every way mergekit's result will differ from
    hm3's. Raises HM3Error when the recipe cannot be expressed at all (an hm3-only parameter value).
    Head tensors keep density 1.0 through mergekit's conditional parameters when hm3 does (the
    default ``head: {density: keep}``): ``[{filter: classifier.weight, value: 1.0}, ..., {value: d}]``.
    """
    from hm3.merging.engine import prepare

    if prep is None:
        prep = prepare(config)
    cfg, method = prep.config, prep.method
    if method.name not in MERGEKIT_METHODS:
        raise HM3Error(f"merge_method {method.name!r} has no mergekit 0.1.5 equivalent; "
                       f"mergekit shares {', '.join(MERGEKIT_METHODS)}")
    notes: list[str] = []
    for where, params in [("parameters", cfg.parameters)] + [
        (f"models[{i}].parameters", m.parameters) for i, m in enumerate(cfg.models)
    ]:
        for key in HM3_ONLY:
            if key not in params:
                continue
            value = params[key]
            if (key, value) in (("rescale_norm", "l1"), ("consensus", "sum")):
                continue  # mergekit's own behaviour, spelled out
            raise HM3Error(
                f"{where}.{key}: {value!r} is an hm3-only option; mergekit 0.1.5 has no equivalent"
            )

    head_names = _head_tensors(prep)
    keep_heads = method.uses_density and cfg.head.density == "keep"
    if method.uses_density and isinstance(cfg.head.density, float) and cfg.head.density < 1:
        notes.append(
            f"head.density {cfg.head.density}: hm3 prunes each group's own head rows; mergekit prunes "
            "the whole zero-padded head, so a small group keeps more of its own values"
        )
    if method.uses_density and cfg.head.density == "model" and _mentions(cfg, "density"):
        notes.append("head.density model: where a model's density is below 1, hm3 prunes each group's own "
                     "head rows; mergekit prunes the whole zero-padded head")
    if cfg.head.hidden == "base":
        notes.append("head.hidden: base keeps the base's head layer; mergekit merges it like any tensor")
    headless = any(
        k == "hidden" and (prep.base is None or n not in prep.base) for n, k in prep.kinds.items()
    )
    if headless:
        notes.append("the base has no task-specific head layer: hm3 averages the models' layers, mergekit "
                     "applies the method against the zero layer of the expanded base")
    if method.name == "model_stock":
        notes.append("model_stock: hm3 keeps each group's own head rows (groups' rows are disjoint, so "
                     "Model Stock would pull them towards the zero base); mergekit applies it to the head")
    if method.random:
        notes.append(f"{method.name} is random: mergekit draws from the global RNG (--random-seed), hm3 from "
                     f"generators seeded by (seed, tensor name); the masks differ")

    def translate(params: dict) -> dict:
        out = {}
        for key, value in params.items():
            if key in HM3_ONLY:
                continue
            out[key] = [c.model_dump(exclude_none=True) for c in value] if isinstance(value, list) else value
        if keep_heads and "density" in out:
            d = out["density"]
            rest = d if isinstance(d, list) else [{"value": d}]
            out["density"] = [{"filter": n, "value": 1.0} for n in head_names] + rest
        return out

    recipe: dict = {"merge_method": cfg.merge_method}
    if method.name != "linear":  # hm3's linear ignores the base; in mergekit it would be an input
        if BASE not in paths:
            raise HM3Error(
                f"{cfg.merge_method} needs the expanded base model; expand a recipe with `base_model`"
            )
        recipe["base_model"] = str(paths[BASE])
    models = []
    for group, entry in zip(prep.space.names, cfg.models):
        if group not in paths:
            raise HM3Error(f"no expanded model for {entry.model!r}; pass the mapping expand_models returned")
        item: dict = {"model": str(paths[group])}
        params = translate(entry.parameters)
        if "weight" not in params and "weight" not in cfg.parameters and method.name != "model_stock":
            params["weight"] = 1.0  # hm3's default; mergekit requires a weight
        if params:
            item["parameters"] = params
        models.append(item)
    recipe["models"] = models
    shared = translate(cfg.parameters)
    if shared:
        recipe["parameters"] = shared
    recipe["dtype"] = cfg.dtype
    return recipe, notes


def _mentions(cfg, key: str) -> bool:
    return key in cfg.parameters or any(key in m.parameters for m in cfg.models)


def _head_tensors(prep) -> list[str]:
    """Names of the head tensors (output and hidden) for mergekit filters: a filter matches any
    tensor whose name contains it, so check that it catches no body tensor."""
    heads = [n for n, k in prep.kinds.items() if k in ("out", "hidden")]
    for n, k in prep.kinds.items():
        if k not in ("out", "hidden") and any(h in n for h in heads):
            raise HM3Error(
                f"tensor {n!r} contains a head tensor's name; a mergekit filter cannot single out the head"
            )
    return heads


def _recipe_yaml(recipe: dict, notes: list[str], seed: int) -> str:
    import yaml

    lines = ["# mergekit 0.1.5 recipe over the expanded models (written by `hm3 expand`).",
             f"# Run: mergekit-yaml {MERGEKIT_RECIPE} OUT --random-seed {seed}"]
    if notes:
        lines.append("# Differences from hm3's merge of the same recipe:")
        lines += [f"#  - {n}" for n in notes]
    return "\n".join(lines) + "\n" + yaml.safe_dump(recipe, sort_keys=False)


# -- CLI -------------------------------------------------------------------------------------------
def register(app, user_errors) -> None:
    import typer

    @app.command()
    @user_errors
    def expand(
        config: Path = typer.Argument(..., help="YAML recipe (as for `hm3 merge`)."),
        out: Path = typer.Option(
            ..., "--out", "-o", help="Output directory: one expanded model per group, plus _base."
        ),
        force: bool = typer.Option(False, "--force", help=FORCE_HELP),
        allow_pickle: bool = typer.Option(
            False, "--allow-pickle", help="Also read pytorch_model.bin (pickle) checkpoints."
        ),
    ) -> None:
        """Write the recipe's models with heads expanded to all labels (for mergekit or other tools)."""
        paths = expand_models(config, out, force=force, allow_pickle=allow_pickle)
        for key, path in paths.items():
            typer.echo(f"{key}: {path}")
        if (out / MERGEKIT_RECIPE).is_file():
            typer.echo(f"mergekit recipe: {out / MERGEKIT_RECIPE}")
