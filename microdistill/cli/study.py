"""The verbs that study whether and how to distil; cli/__init__.py adds them to the `microdistill` command.

    microdistill cost runs/demo --calls-per-day 20000
    microdistill compare --data runs/demo/shards --out runs/demo/compare --configs curriculum,ce,kd
    microdistill inspect runs/demo/shards
    microdistill tasks

Library modules are imported inside each verb (so `--help` imports no torch); cost's and compare's
flags come from their config classes (verbs.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from microdistill.cli.verbs import Flags, verb
from microdistill.core.errors import UserError
from microdistill.extract.config import ExtractConfig
from microdistill.flows.config import CompareConfig
from microdistill.plan.cost import CostConfig, PilotConfig


@verb
def cost(
    run_dir: Optional[Path] = typer.Argument(None, metavar="RUN", help="A run folder (runs/NAME) whose logs and report "
                                             "to use."),
    cfg: CostConfig = Flags(CostConfig),
    shards: Optional[Path] = typer.Option(None, help="Shard folder (default: RUN/shards)."),
    student: Optional[Path] = typer.Option(None, help="Student folder (default: RUN/student)."),
    report: Optional[Path] = typer.Option(None, help="Evaluation report.json or its folder (default: RUN/eval)."),
    measure: bool = typer.Option(False, help="Measure throughput on a small sample (--input, --task, --teacher, "
                                 "--preset) instead of a run's logs."),
    input: Optional[Path] = typer.Option(None, "--input", help="Corpus for --measure (default: the packaged sample "
                                         "comments)."),
    measured: ExtractConfig = Flags(ExtractConfig, only=("task", "teacher")),
    pilot: PilotConfig = Flags(PilotConfig),
    target_agreement: Optional[float] = typer.Option(None, help="Forecast the examples needed for this exact-match "
                                                     "agreement (0-1); plans that corpus unless --corpus-size."),
    points: Optional[str] = typer.Option(None, help="Pilot results 'examples:agreement,...' for the forecast "
                                         "(default: train a pilot at 25/50/100% of the shards)."),
    out: Optional[Path] = typer.Option(None, help="Where cost.json, cost.png and forecast.png go (default: RUN/cost, "
                                       "or ./cost)."),
    json_out: bool = typer.Option(False, "--json", help="Print the analysis as JSON."),
) -> None:
    """Break-even of the student against the teacher: cost per day, one-off cost, days to pay back."""
    import json

    from microdistill.flows.cost import cost_analysis
    from microdistill.plan.forecast import parse_points
    from microdistill.report.cost import summary_table

    analysis = cost_analysis(
        run_dir, cfg, out, shards=shards, student=student, report=report, measure=measured if measure else None,
        corpus=input, preset=pilot.preset, sample=pilot.sample, train_steps=pilot.train_steps,
        target_agreement=target_agreement, points=parse_points(points) if points else None)
    if json_out:
        typer.echo(json.dumps(analysis.to_dict(), indent=1))
        return
    from rich.console import Console

    Console().print(summary_table(analysis))
    typer.echo(f"plot: {analysis.plot}")


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


@verb
def compare(
    data: Optional[Path] = typer.Option(None, help="Shard folder written by extract."),
    out: Optional[Path] = typer.Option(None, help="Comparison folder: one student folder per configuration and the "
                                       "report."),
    configs: str = typer.Option("curriculum,ce,kd", help="Comma-separated named configurations (see --list)."),
    plan: Optional[Path] = typer.Option(None, help="YAML list of runs (name, optional base, TrainConfig fields) "
                                        "instead of --configs."),
    cfg: CompareConfig = Flags(CompareConfig),
    list_: bool = typer.Option(False, "--list", help="List the named configurations and exit."),
    quiet: bool = typer.Option(False, help="No live progress."),
) -> None:
    """Train several distillation configurations on the same data and budget -> compare.md, curves.png, compare.json."""
    from microdistill.flows.compare import compare as run_compare, load_plan
    from microdistill.train.recipes import CONFIGS

    if list_:
        for name, (what, _) in CONFIGS.items():
            typer.echo(f"{name:12s} {what}")
        return
    if data is None or out is None:
        raise UserError("compare needs --data (a shard folder) and --out (a folder for the runs and the report)")
    entries = load_plan(plan) if plan else [c.strip() for c in configs.split(",") if c.strip()]
    result = run_compare(data, out, entries, cfg, progress=not quiet)
    v = result["verdict"]
    for r in result["runs"]:
        typer.echo(f"{r['name']:12s} exact match {r['exact_match']:.2%}  token accuracy {r['token_acc']:.2%}  "
                   f"{r['steps']} steps  {r['wall_s']:.1f} s")
    if v["runner_up"] is not None:
        typer.echo(f"winner: {v['winner']} (over {v['runner_up']}: exact match {100 * v['margin']:+.2f} points, "
                   f"standard error {100 * v['margin_se']:.2f}; token accuracy {100 * v['token_margin']:+.2f} points)")
    typer.echo(f"report: {out / 'compare.md'}")


def tasks() -> None:
    """List the built-in task presets."""
    from microdistill.core.task import load_task, presets

    for name in presets():
        t = load_task(name)
        typer.echo(f"{name:20s} fields: {', '.join(t.field_names)}")


VERBS = {"cost": cost, "compare": compare, "inspect": inspect, "tasks": tasks}
