"""The verbs that use a student; cli/__init__.py adds them to the `microdistill` command.

    microdistill predict --student runs/demo/student "some text"
    microdistill export --student runs/demo/student --out runs/demo/export [--quantize int8]
    microdistill serve --student runs/demo/student --teacher qwen2.5-coder-0.5b-instruct --target-agreement 0.97
    microdistill calibrate-confidence --student runs/demo/student

Library modules are imported inside each verb (so `--help` imports no torch); serve's flags come
from ServeConfig (verbs.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from microdistill.cli.verbs import Flags, fail, verb
from microdistill.flows.config import UpdateConfig
from microdistill.serve.config import ServeConfig


def predict(
    texts: list[str] = typer.Argument(None, help="Texts to label (or use --input)."),
    student: Path = typer.Option(..., help="Student folder (the --out of train) or export folder (of export: no torch)."),
    input: Optional[Path] = typer.Option(None, "--input", help="A file with one text per line ('-' for stdin)."),
    constrain: bool = typer.Option(True, help="Constrain generation to the task's schema (--no-constrain: raw output)."),
    batch_size: int = typer.Option(64, help="Texts decoded together."),
    task: Optional[str] = typer.Option(None, help="Refuse a student that does another task than this one."),
) -> None:
    """Label texts with a trained or exported student; prints one JSON object per input."""
    import json

    from microdistill.data.corpus import read_lines
    from microdistill.serve.answerers import load_answerer

    if batch_size < 1:
        fail(f"--batch-size must be at least 1 (got {batch_size})")
    items = list(texts or []) + (read_lines(input) if input is not None else [])
    if not items:
        fail("nothing to predict: give texts as arguments or --input FILE")
    results = load_answerer(student, task).predict(items, batch_size, constrain=constrain)
    for r in results:
        typer.echo(json.dumps(r, ensure_ascii=False))


def export(
    student: Path = typer.Option(..., help="Student folder (the --out of train): heads, or a decoder of an enum-only task."),
    out: Path = typer.Option(..., help="Export folder to write (replaced as a whole, only once parity holds)."),
    quantize: Optional[str] = typer.Option(None, help="int8: quantise the weights (about 1/4 the size), written only "
                                           "if it keeps the student's answers on the held-out and probe texts."),
    data: Optional[Path] = typer.Option(None, help="Shard folder whose held-out split checks parity (default: the student's)."),
    int8_anyway: bool = typer.Option(False, help="Write int8 even where it changes answers float32 keeps."),
) -> None:
    """Export a student to ONNX for the torch-free runtime, checked against PyTorch first."""
    from microdistill.export import export as run_export

    run_export(student, out, quantize=quantize, data=data, int8_anyway=int8_anyway)


@verb
def serve(
    student: Path = typer.Option(..., help="Student folder (a classifier-head student: it gives a confidence per "
                                 "field) or an export folder (heads or decoder; no torch)."),
    cfg: ServeConfig = Flags(ServeConfig),
) -> None:
    """Serve the student over HTTP: /v1/predict, OpenAI-compatible /v1/chat/completions, /health, /metrics."""
    from microdistill.serve.app import run_server

    run_server(student, cfg)


@verb
def update(
    student: Path = typer.Option(..., help="The student to improve (a classifier-head student: it says what it doubts)."),
    input: Path = typer.Option(..., "--input", help="The pool: a corpus with a text field, or a serve --traffic folder."),
    out: Path = typer.Option(..., help="Where the new student goes, only if the gate keeps it (new or a student folder)."),
    shards: Optional[Path] = typer.Option(None, help="The student's shard folder, which the new labels join (default: "
                                          "the one it was trained on)."),
    cfg: UpdateConfig = Flags(UpdateConfig),
    quiet: bool = typer.Option(False, help="No progress lines."),
) -> None:
    """Label what the student doubts, train on all the labels, keep the new student if it is not worse."""
    from microdistill.flows.continual import update as run_update

    report = run_update(student, input, out, cfg, shards, progress=not quiet)
    reused = sum(r.get("reused_labels", 0) for r in report["rounds"])
    typer.echo(f"{report['teacher_calls']} teacher calls in {len(report['rounds'])} round(s)"
               + (f" and {reused} teacher answers the server kept" if reused else "") + "; held-out agreement "
               f"{report['rounds'][0]['old_agreement']:.2%} -> {report['rounds'][-1]['new_agreement']:.2%}; "
               f"student saved in {out}")


def calibrate_confidence(
    student: Path = typer.Option(..., help="Student folder (a classifier-head student)."),
    data: Optional[Path] = typer.Option(None, help="Shard folder it was trained on (default: the one its config names)."),
    quiet: bool = typer.Option(False, help="No progress lines."),
) -> None:
    """Fit one temperature per field on the held-out split -> STUDENT/calibration.json (ECE before/after)."""
    from microdistill.students.confidence import calibrate_confidence as fit

    r = fit(student, data, progress=not quiet)
    temps = ", ".join(f"{k} {v:.2f}" for k, v in r["temperatures"].items())
    typer.echo(f"{r['n']} held-out examples: ECE {r['ece_before']:.2%} -> {r['ece_after']:.2%} (cross-fitted); "
               f"temperatures {temps}; written to {student / 'calibration.json'}")


VERBS = {"predict": predict, "export": export, "serve": serve, "update": update,
         "calibrate-confidence": calibrate_confidence}
