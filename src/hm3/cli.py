"""The `hm3` command: a few lines per command over the Python API.

Every user error is an ``HM3Error``: printed as one line ``error: ...`` on stderr, exit code 2,
nothing written. Commands of later stages (zoo, eval, search, serve, bench) register themselves
from their own modules through ``register(app)``, so each stays next to the code it calls.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

import typer

# torch's transparent-huge-page allocation (THP_MEM_ALLOC_ENABLE=1) is left to the user: on one VM it
# made the first touch of a large tensor 3x cheaper (session 1); on another (session 13) it made it up
# to 7x dearer, whole `hm3 merge` runs 1.1-1.7x as long and the first inference pass 1.25x. Set it in
# the environment where it pays.

from hm3.errors import FORCE_HELP, HM3Error
from hm3.fastpaths import CALIBRATE_HELP, CALIBRATED
from hm3.labels import LABEL_THRESHOLD_HELP

app = typer.Typer(
    name="hm3",
    help="Merge text classifiers with different label sets into one model (HM3, arXiv 2409.19173).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

log = logging.getLogger("hm3")


def user_errors(fn: Callable) -> Callable:
    """Turn HM3Error (and other input errors) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HM3Error as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        except OSError as e:  # about a path the user gave (a file where a folder goes, no space left...)
            if e.filename is None:
                raise
            logging.getLogger("hm3").debug("%s", fn.__name__, exc_info=True)  # the traceback with --verbose
            typer.echo(f"error: {e.filename}: {e.strerror or e}", err=True)
            raise typer.Exit(2)

    return wrapper


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug details.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # transformers' own progress bars and load reports are noise around hm3's. Said through the
    # environment, which transformers and huggingface_hub read when (and only if) a command imports
    # them: importing transformers here cost every command ~1.5 s (it scans its ~1,600 model files).
    for name in ("transformers", "huggingface_hub", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already (e.g. hm3.cli called in-process): set it now
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


@app.command()
@user_errors
def merge(
    config: Path = typer.Argument(..., help="YAML recipe (mergekit keys + hm3 `group`/`labels`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Also read pytorch_model.bin (pickle) checkpoints."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Merge the recipe's classifiers into one model with a head row block per group."""
    from hm3.merging.engine import merge as run

    result = run(config, out, force=force, allow_pickle=allow_pickle, progress=progress)
    groups = ", ".join(f"{g.name}({g.size}{', multi-label' if g.multi_label else ''})" for g in result.space)
    typer.echo(f"wrote {result.path}: {result.space.total} labels in groups {groups} ({result.seconds:.1f}s)")


@app.command()
@user_errors
def predict(
    model: Path = typer.Argument(..., help="Merged model or single classifier directory."),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help=".txt (one text a line), .jsonl (field `text`), "
                                         "or - for one text a line on stdin."),
    text: Optional[list[str]] = typer.Option(None, "--text", "-t", help="A text to classify (repeat for more)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSONL output (default: stdout)."),
    groups: Optional[str] = typer.Option(None, "--groups", help="Comma-separated groups (default: all)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    aggregate: str = typer.Option("mean", "--aggregate", help="Long texts: 'mean' or 'max' over windows."),
    threshold: float = typer.Option(0.5, "--threshold", help="Multi-label groups: list the labels scoring at least this."),
    label_threshold: Optional[list[str]] = typer.Option(
        None, "--label-threshold", help=LABEL_THRESHOLD_HELP),
    fast: Optional[str] = typer.Option(
        None, "--fast", help="Opt-in faster CPU path: int8, int8-checked, onnx, onnx-int8, bf16 (answers can differ from "
        "fp32 near a decision boundary; agreement: docs/BENCHMARKS.md)."),
    calibrate: Optional[Path] = typer.Option(None, "--calibrate", help=CALIBRATE_HELP),
) -> None:
    """Classify texts: per text and group, the label and the group's softmax scores (a multi-label
    group: a sigmoid score per label, and the labels at or above --threshold)."""
    from hm3.io import check_output_file, texts_from
    from hm3.model import load, thresholds_option

    if output is not None:
        check_output_file(output)  # before the texts are classified
    if calibrate is not None and fast not in CALIBRATED:
        raise HM3Error(f"--calibrate {calibrate} is for --fast {' or '.join(CALIBRATED)}")
    texts = texts_from(input, text)
    calibration = texts_from(calibrate) if calibrate is not None else None
    clf = load(model, aggregate=aggregate, threshold=threshold, thresholds=thresholds_option(label_threshold))
    if fast:
        from hm3.fastpaths import accelerate

        clf = accelerate(clf, fast, calibration=calibration)
    names = [g.strip() for g in groups.split(",") if g.strip()] if groups else None
    preds = clf.predict(texts, names, batch_size=batch_size, progress=output is not None)
    lines = [
        json.dumps({"text_index": i, "groups": {g: p.to_json() for g, p in row.items()}}) for i, row in enumerate(preds)
    ]
    if output is None:
        typer.echo("\n".join(lines))
    else:
        from hm3.io import write_text_atomic

        write_text_atomic(output, "\n".join(lines) + "\n")
        typer.echo(f"wrote {len(lines)} predictions to {output}", err=True)


@app.command()
@user_errors
def inspect(model: Path = typer.Argument(..., help="Model directory.")) -> None:
    """Show a model's groups, labels and merge recipe."""
    from rich.console import Console
    from rich.table import Table

    from hm3.io import resolve
    from hm3.labels import MULTI_LABEL, kind_name

    path = resolve(model)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise HM3Error(f"{path}: no config.json; expected a model directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise HM3Error(f"{cfg_file}: invalid JSON ({e.msg})") from None
    meta = cfg.get("hm3")
    console = Console()
    table = Table(title=f"{path}  ({cfg.get('model_type')}, {cfg.get('num_hidden_layers', cfg.get('n_layers', '?'))} layers)")
    table.add_column("group")
    table.add_column("labels")
    table.add_column("kind")
    if meta:
        for g in meta["groups"]:
            table.add_row(g["name"], ", ".join(g["labels"]), kind_name(bool(g.get("multi_label"))))
    else:
        labels = [v for _, v in sorted(((int(k), v) for k, v in (cfg.get("id2label") or {}).items()))]
        table.add_row(path.name + " (single classifier)", ", ".join(labels),
                      kind_name(cfg.get("problem_type") == MULTI_LABEL))
    console.print(table)
    if meta:
        import yaml

        console.print(f"method: {meta.get('method')}  seed: {meta.get('seed')}")
        console.print(yaml.safe_dump(meta.get("recipe", {}), sort_keys=False).rstrip())
        if meta.get("refit"):
            console.print(f"refit: {json.dumps(meta['refit'])}")


@app.command()
def methods() -> None:
    """List the merge methods with their defaults and references."""
    from hm3.merging.methods import REGISTRY

    for m in REGISTRY.values():
        typer.echo(f"{m.name:18s} base={'yes' if m.needs_base else 'no ':3s} {m.defaults}  {m.reference}\n    {m.doc}")


@app.command()
@user_errors
def demo(
    workdir: Path = typer.Option(Path(".cache/hm3/demo"), help="Where the demo keeps its guards and merge."),
) -> None:
    """Build two small real guards on the offline MiniLM base (cached), merge them, compare."""
    from hm3.demo import run_demo

    run_demo(workdir)


# Later stages register their commands from their own modules.
for _module in ("hm3.zoo.cli", "hm3.evaluate", "hm3.agreement", "hm3.search", "hm3.serve", "hm3.bench", "hm3.refit",
                "hm3.expand"):
    try:
        _mod = importlib.import_module(_module)
    except ImportError as _e:  # a module not written yet, or an optional extra not installed
        if _e.name and not _e.name.startswith(_module):
            log.debug("commands of %s unavailable: %s", _module, _e)
        continue
    if hasattr(_mod, "register"):
        _mod.register(app, user_errors)


def main() -> None:
    """The console script: the command, then a quick exit.

    Python's shutdown after ``import torch`` takes ~0.25 s (torch's finalizers deregister every
    operator library it loaded; measured 1.08 s vs 0.83 s for ``python -c "import torch"``), a tenth
    of a whole ``hm3 merge`` of two bert-base models. Once the command has returned, every file it
    wrote is closed and renamed into place, so the process flushes its streams and logs and ends
    with ``os._exit``. Unless a thread of its own is still running (Python's exit would wait for it),
    or the command failed with an exception (its traceback is Python's to print).
    """
    try:
        app()
        code: int | str | None = 0
    except SystemExit as e:  # click ends every command, successful or not, with SystemExit
        code = e.code
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    if code is not None and not isinstance(code, int):  # sys.exit("message"): Python prints it, exit 1
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (hm3 ... | head): nothing left to say
            pass
    os._exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    main()
