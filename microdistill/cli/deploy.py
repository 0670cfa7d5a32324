"""The verbs that put a student in front of traffic; cli.py adds them to the `microdistill` command.

    microdistill export --student runs/demo/student --out runs/demo/export [--quantize int8]
    microdistill serve --student runs/demo/student --teacher qwen2.5-coder-0.5b-instruct --target-agreement 0.97
    microdistill calibrate-confidence --student runs/demo/student

Like cli.py: library modules are imported inside each verb (so `--help` imports no torch), and
every option's default is ServeConfig's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def export(
    student: Path = typer.Option(..., help="Student folder (the --out of train): heads, or a decoder of an enum-only task."),
    out: Path = typer.Option(..., help="Export folder to write (replaced as a whole, only once parity holds)."),
    quantize: Optional[str] = typer.Option(None, help="int8: quantise the weights (about 1/4 the size)."),
    data: Optional[Path] = typer.Option(None, help="Shard folder whose held-out split checks parity (default: the student's)."),
) -> None:
    """Export a student to ONNX for the torch-free runtime, checked against PyTorch first."""
    from microdistill.export import export as run_export

    run_export(student, out, quantize=quantize, data=data)


def serve(
    student: Path = typer.Option(..., help="Student folder (a classifier-head student: it gives a confidence per field) or an export folder (heads or decoder; no torch)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher for inputs the student is unsure of: preset, HF folder, "
                                          ".gguf or openai:MODEL (with --teacher-url)."),
    teacher_url: Optional[str] = typer.Option(None, help="OpenAI base URL of an openai:MODEL teacher (key: $MICRODISTILL_API_KEY)."),
    min_confidence: Optional[float] = typer.Option(None, help="The student answers when every field's calibrated "
                                                   "confidence reaches this; the teacher answers the rest."),
    target_agreement: Optional[float] = typer.Option(None, help="Or: the threshold that reached this agreement with the "
                                                     "teacher on the held-out inputs (the student's calibration.json)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    batch_window_ms: float = typer.Option(2.0, help="How long the student waits for concurrent requests to join a batch."),
    max_batch: int = typer.Option(64, help="Texts per batch gathered from concurrent requests."),
    max_queue: int = typer.Option(1024, help="Texts waiting for the student or the teacher before requests get 503."),
    max_texts: int = typer.Option(256, help="Texts per request (413 beyond)."),
    max_text_chars: int = typer.Option(10_000, help="Characters per text (413 beyond)."),
    max_body_bytes: int = typer.Option(1_048_576, help="Bytes per request body (413 beyond)."),
    drain_timeout_s: float = typer.Option(30.0, help="On SIGTERM, how long in-flight requests may take to finish."),
    threads: Optional[int] = typer.Option(None, help="Threads for the student (torch or onnxruntime; default: their own choice)."),
) -> None:
    """Serve the student over HTTP: /v1/predict, OpenAI-compatible /v1/chat/completions, /health, /metrics."""
    from microdistill.serve.app import run_server
    from microdistill.serve.service import ServeConfig

    run_server(student, ServeConfig(
        teacher=teacher, teacher_url=teacher_url, min_confidence=min_confidence, target_agreement=target_agreement, host=host, port=port,
        batch_window_ms=batch_window_ms, max_batch=max_batch, max_queue=max_queue, max_texts=max_texts,
        max_text_chars=max_text_chars, max_body_bytes=max_body_bytes, drain_timeout_s=drain_timeout_s,
        threads=threads))


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


def add_serving_verbs(app: typer.Typer) -> None:
    app.command("export")(export)
    app.command("serve")(serve)
    app.command("calibrate-confidence")(calibrate_confidence)
