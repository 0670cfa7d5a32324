"""The calls a server answered, kept so the student can learn from them (`serve --traffic DIR`).

    microdistill serve --student runs/x/student --teacher ... --target-agreement 0.97 --traffic runs/x/traffic

Off by default: the log holds what clients sent. Each answered text is one JSON line: when
(`at`, seconds since the epoch), the text, the answer (`output`, `fields`), the student's
calibrated `confidence` per field, and who answered (`answered_by`: student, teacher or
student-fallback). A line the teacher answered is a label the teacher already paid for; the rest
are the pool the student is least sure of. `traffic.json` says which task and format the folder
holds, so a folder of another task or version is refused in one line.

Crash-safe by construction: each server process appends to its own `traffic-<start>-<pid>.jsonl`
with one write per line (O_APPEND), so a SIGKILL can cut at most the line being written, which
a reader skips. `sample` keeps that share of the calls; the folder stops growing at `max_bytes`
(what is dropped is counted in /metrics).
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any, Iterator

from microdistill.core.errors import UserError
from microdistill.core.files import atomic_write_json

FORMAT, VERSION = "microdistill.traffic", 1
MANIFEST = "traffic.json"


class TrafficError(UserError):
    """A traffic folder that cannot be used; one line for the user."""


def check_folder(folder: Path, task) -> None:
    """`folder` holds (or will hold) traffic of `task` in this format; written when new."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TrafficError(f"--traffic {folder}: is a file; give a folder for the traffic log")
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            raise TrafficError(f"{manifest}: unreadable ({type(e).__name__}); give another --traffic folder") from None
        if (m.get("format"), m.get("version")) != (FORMAT, VERSION):
            raise TrafficError(f"{manifest}: a {m.get('format')!r} folder of version {m.get('version')!r}, not "
                               f"{FORMAT} {VERSION}; give another --traffic folder")
        if m.get("task_fingerprint") != task.fingerprint():
            raise TrafficError(f"--traffic {folder}: holds the traffic of task {m.get('task')!r}, not {task.name!r}; "
                               "give another --traffic folder")
        return
    if folder.is_dir() and any(folder.iterdir()):
        raise TrafficError(f"--traffic {folder}: holds other files and no {MANIFEST}; give a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest, {"format": FORMAT, "version": VERSION, "task": task.name,
                                 "task_fingerprint": task.fingerprint()})


class TrafficLog:
    """Appends answered calls to this process's file in `folder` (see the module docstring)."""

    def __init__(self, folder: Path, task, sample: float = 1.0, max_bytes: int | None = None, seed: int | None = None):
        check_folder(folder, task)
        self.folder, self.sample, self.max_bytes = Path(folder), sample, max_bytes
        self.rng = random.Random(seed)
        self.path = self.folder / f"traffic-{int(time.time())}-{os.getpid()}.jsonl"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.size = sum(p.stat().st_size for p in self.folder.glob("traffic-*.jsonl"))
        self.written = self.dropped = 0

    def record(self, texts: list[str], results: list[dict[str, Any]]) -> None:
        """Log each answered text (those the sample keeps, while the folder is under its cap)."""
        now = time.time()
        for text, r in zip(texts, results):
            if self.sample < 1.0 and self.rng.random() >= self.sample:
                continue
            line = (json.dumps({"at": round(now, 3), "text": text, "output": r["output"], "fields": r["fields"],
                                "confidence": r["confidence"], "answered_by": r["answered_by"]},
                               ensure_ascii=False) + "\n").encode()
            if self.max_bytes is not None and self.size + len(line) > self.max_bytes:
                self.dropped += 1
                continue
            os.write(self.fd, line)  # one write per line: a kill cuts at most this one
            self.size += len(line)
            self.written += 1

    def close(self) -> None:
        os.close(self.fd)


def read_traffic(folder: Path, task=None) -> Iterator[dict[str, Any]]:
    """Every whole record of a traffic folder, oldest file first (a line cut by a kill is skipped)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise TrafficError(f"{folder}: not a traffic folder ({MANIFEST} is missing)")
    if task is not None:
        check_folder(folder, task)
    for path in sorted(folder.glob("traffic-*.jsonl"), key=lambda p: p.stat().st_mtime):
        for line in path.read_bytes().splitlines():
            try:
                yield json.loads(line)
            except ValueError:
                continue  # the last line of a file whose writer was killed mid-write
