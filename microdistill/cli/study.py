"""The verbs that study shards and training choices; cli.py adds them to the `microdistill` command.

    microdistill inspect runs/demo/shards
    microdistill compare --data runs/demo/shards --out runs/demo/compare --configs curriculum,ce,kd

Like cli.py: library modules are imported inside each verb (so `--help` imports no torch), and
compare's option defaults are CompareConfig's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from microdistill.core.errors import UserError


def inspect(
    data: Path = typer.Argument(..., metavar="DIR", help="Shard folder written by extract."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Check a shard folder and summarise it: counts, labels, vocabulary, size, teacher, timings."""
    import json

    from microdistill.data.inspection import inspect as run_inspect, summary

    info = run_inspect(data)
    if json_out:
        typer.echo(json.dumps(info, indent=1, ensure_ascii=False))
        return
    typer.echo(summary(info))


def compare(
    data: Optional[Path] = typer.Option(None, help="Shard folder written by extract."),
    out: Optional[Path] = typer.Option(None, help="Comparison folder: one student folder per configuration and the report."),
    configs: str = typer.Option("curriculum,ce,kd", help="Comma-separated named configurations (see --list)."),
    plan: Optional[Path] = typer.Option(None, help="YAML list of runs (name, optional base, TrainConfig fields) instead of --configs."),
    preset: str = typer.Option("micro", help="Student size preset for every run."),
    max_steps: Optional[int] = typer.Option(None, help="The same step budget for every run."),
    epochs: Optional[int] = typer.Option(None, help="Epochs for every run instead of a step budget (default 10)."),
    seed: int = typer.Option(0, help="Random seed for every run."),
    limit_train: Optional[int] = typer.Option(None, help="Use only the first N training examples."),
    sizes: Optional[str] = typer.Option(None, help="Also train on the first N examples for each N, e.g. 100,200,400 (accuracy vs data)."),
    sizes_for: Optional[str] = typer.Option(None, help="Only these configurations get the --sizes curve (default: all)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size for every run (default: train's)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate for every run (default: train's)."),
    eval_limit: Optional[int] = typer.Option(None, help="Evaluate on at most N held-out examples per epoch."),
    list_: bool = typer.Option(False, "--list", help="List the named configurations and exit."),
    quiet: bool = typer.Option(False, help="No live progress."),
) -> None:
    """Train several distillation configurations on the same data and budget -> compare.md, curves.png, compare.json."""
    from microdistill.flows.compare import CompareConfig, compare as run_compare, load_plan
    from microdistill.train.recipes import CONFIGS

    if list_:
        for name, (what, _) in CONFIGS.items():
            typer.echo(f"{name:12s} {what}")
        return
    if data is None or out is None:
        raise UserError("compare needs --data (a shard folder) and --out (a folder for the runs and the report)")
    try:
        size_list = tuple(int(s) for s in sizes.split(",") if s.strip()) if sizes else None
    except ValueError:
        raise UserError(f"--sizes {sizes!r}: expected comma-separated numbers of training examples, e.g. 100,200,400") from None
    entries = load_plan(plan) if plan else [c.strip() for c in configs.split(",") if c.strip()]
    cfg = CompareConfig(preset=preset, max_steps=max_steps, epochs=epochs, seed=seed, limit_train=limit_train,
                        sizes=size_list, batch_size=batch_size, lr=lr, eval_limit=eval_limit,
                        sizes_for=tuple(c.strip() for c in sizes_for.split(",") if c.strip()) if sizes_for else None)
    result = run_compare(data, out, entries, cfg, progress=not quiet)
    v = result["verdict"]
    for r in result["runs"]:
        typer.echo(f"{r['name']:12s} exact match {r['exact_match']:.2%}  token accuracy {r['token_acc']:.2%}  "
                   f"{r['steps']} steps  {r['wall_s']:.1f} s")
    if v["runner_up"] is not None:
        typer.echo(f"winner: {v['winner']} (over {v['runner_up']}: exact match {100 * v['margin']:+.2f} points, "
                   f"standard error {100 * v['margin_se']:.2f}; token accuracy {100 * v['token_margin']:+.2f} points)")
    typer.echo(f"report: {out / 'compare.md'}")


def add_study_verbs(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
    app.command("compare")(compare)
