"""`hm3 zoo build`: the offline guard zoo as a command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer, user_errors) -> None:
    zoo = typer.Typer(help="The offline guard zoo: five guards fine-tuned from the MiniLM base.", no_args_is_help=True)
    app.add_typer(zoo, name="zoo")

    @zoo.command("build")
    @user_errors
    def build(
        out: Path = typer.Option(..., "--out", "-o", help="Zoo directory (resumable: finished guards are kept)."),
        groups: Optional[str] = typer.Option(None, help="Comma-separated subset of jailbreak,harm,spam,sentiment,question."),
        seed: int = typer.Option(0, help="Seed of the data splits and the fine-tuning."),
        max_train: Optional[int] = typer.Option(None, help="Cap on training examples per guard (default per guard)."),
        epochs: Optional[int] = typer.Option(None, help="Epochs per guard (default per guard)."),
        threads: Optional[int] = typer.Option(None, help="torch threads (1 is faster on a busy machine)."),
        style: str = typer.Option("lp-ft", help="Fine-tuning style: lp-ft (the default: linear probe, then "
                                  "fine-tune), standard, frozen-embeddings, small-steps (half the learning rate). Styles "
                                  "meant to interfere less when merged; build each into its own --out."),
    ) -> None:
        """Fine-tune the guards, write their splits, model cards, the evaluation suites, a probe of text from
        other sources and the recommended merges."""
        from hm3.zoo.build import build_zoo

        names = [g.strip() for g in groups.split(",") if g.strip()] if groups else None
        result = build_zoo(out, names, seed=seed, max_train=max_train, epochs=epochs, num_threads=threads,
                           style=style)
        for group, marker in result["guards"].items():
            m = marker["metrics"]
            typer.echo(f"{group:10s} test macro F1 {m['test_macro_f1']:.3f}  sizes {marker['sizes']}")
        for split, path in result["suites"].items():
            typer.echo(f"suite {split}: {path}")
        typer.echo(f"probe of other sources: {result['probe']}")
