"""Serving options: who answers, where the server listens, and its limits, checked before anything loads.

    microdistill serve --help

No torch here: the command line builds its flags from `ServeConfig` (service.py runs it).
"""

from __future__ import annotations

from dataclasses import dataclass

from microdistill.core.errors import UserError
from microdistill.core.options import Options, option
from microdistill.extract.config import TEACHER_URL_HELP
from microdistill.teachers import is_served_spec


class ServeError(UserError):
    """A serving option that cannot be used; one line for the user."""


@dataclass(frozen=True)
class ServeConfig(Options):
    """How the server runs: who answers, where it listens, and its limits."""

    teacher: str | None = option(None, help=(
        "Teacher for inputs the student is unsure of: preset, HF folder, .gguf or openai:MODEL (with --teacher-url)."))
    teacher_url: str | None = option(None, help=TEACHER_URL_HELP)
    min_confidence: float | None = option(None, help=(
        "The student answers when every field's calibrated confidence reaches this; the teacher answers the rest."))
    target_agreement: float | None = option(None, help=(
        "Or: the threshold that reached this agreement with the teacher on the held-out inputs (the student's "
        "calibration.json)."))
    on_teacher_error: str = option("student", help=(
        "When the teacher fails (down, or slow past its tries): student (the student's answer stands, marked "
        "answered_by student-fallback and counted in /metrics) or error (503)."))
    teacher_attempts: int = option(2, help="Tries per call to a served teacher before it counts as failed.")
    teacher_timeout_s: float = option(30.0, help="Seconds a served teacher may take per call.")
    teacher_concurrency: int = option(8, help="Calls in flight to a served teacher.")
    traffic: str | None = option(None, path=True, help=(
        "Keep every answered call in this folder (text, answer, confidences, who answered) for `update` to learn "
        "from; off by default, as it stores what clients send."))
    traffic_sample: float = option(1.0, help="The share of answered calls --traffic keeps.")
    traffic_max_mb: float | None = option(None, help="--traffic's log stops growing at this many megabytes (the rest "
                                                     "are counted as dropped in /metrics; the teacher's answers kept "
                                                     "as labels are all kept).")
    watch_s: float | None = option(None, help=(
        "Reload the student whenever its folder is saved again, looking every this many seconds (SIGHUP reloads it "
        "at once); calls in flight finish on the old one."))
    served_model_name: tuple[str, ...] = option((), repeat=True, help=(
        "A model name clients may call the student by (repeatable; the first is the id /v1/models lists; default: "
        "the task's name): an application keeps the model name it sends and changes only its base URL."))
    host: str = option("127.0.0.1", help="Address to listen on.")
    port: int = option(8000, help="Port to listen on.")
    batch_window_ms: float = option(0.0, help=(
        "How long the student waits for concurrent requests to join a batch. At 0 a batch is what queued while the "
        "last one ran: a lone caller waits for nothing, and busy servers still batch (benchmarks/serve_scaling.py)."))
    max_batch: int = option(64, help="Texts per batch gathered from concurrent requests.")
    max_queue: int = option(1024, help=(
        "Texts waiting for the student or the teacher before requests get 503 (a full queue refuses, it never grows)."))
    max_texts: int = option(256, help="Texts per request (413 beyond).")
    max_text_chars: int = option(10_000, help="Characters per text (413 beyond).")
    max_body_bytes: int = option(1_048_576, help="Bytes per request body (413 beyond).")
    drain_timeout_s: float = option(30.0, help="On SIGTERM, how long in-flight requests may take to finish.")
    threads: int | None = option(None, help=(
        "Threads for the student (torch or onnxruntime; default: their own choice)."))

    def __post_init__(self) -> None:
        if self.min_confidence is not None and self.target_agreement is not None:
            raise ServeError("give --min-confidence or --target-agreement, not both")
        for name in ("min_confidence", "target_agreement"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ServeError(f"--{name.replace('_', '-')} must be between 0 and 1, got {v}")
        if self.teacher_url is not None and not is_served_spec(self.teacher or ""):
            raise ServeError(f"--teacher-url is for a served teacher (openai:MODEL), not {self.teacher!r}")
        if self.teacher is not None and self.min_confidence is None and self.target_agreement is None:
            raise ServeError("with --teacher, give --min-confidence or --target-agreement: without a threshold "
                             "the teacher would never be asked")
        for name in ("max_batch", "max_queue", "max_texts", "max_text_chars", "max_body_bytes", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ServeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if any(not name.strip() for name in self.served_model_name):
            raise ServeError("--served-model-name must not be empty")
        if self.on_teacher_error not in ("student", "error"):
            raise ServeError(f"--on-teacher-error {self.on_teacher_error!r}: choose student or error")
        for name in ("teacher_attempts", "teacher_concurrency"):
            if getattr(self, name) < 1:
                raise ServeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.teacher_timeout_s <= 0:
            raise ServeError(f"--teacher-timeout-s must be positive, got {self.teacher_timeout_s}")
        if self.watch_s is not None and self.watch_s <= 0:
            raise ServeError(f"--watch-s must be positive, got {self.watch_s}")
        if not 0.0 < self.traffic_sample <= 1.0:
            raise ServeError(f"--traffic-sample must be in (0, 1], got {self.traffic_sample}")
        if self.traffic_max_mb is not None and self.traffic_max_mb <= 0:
            raise ServeError(f"--traffic-max-mb must be positive, got {self.traffic_max_mb}")
        if not 0 <= self.port <= 65535:  # checked before the student loads, not when the socket opens
            raise ServeError(f"--port must be from 0 to 65535, got {self.port}")
        if self.batch_window_ms < 0 or self.drain_timeout_s < 0:
            raise ServeError("--batch-window-ms and --drain-timeout-s must not be negative")
