"""Speed, size and memory of student and teacher, measured the same way in the same process.

    microdistill eval --student runs/demo/student --data runs/demo/shards   # the report's speed section

Both models answer the same inputs as they would in use: the student with its constrained
prediction, the teacher with constrained greedy decoding exactly as extraction ran it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from microdistill.teachers import preset_of
from microdistill.teachers.presets import PRESETS, cache_root


def timing(fn: Callable[[list[str]], Any], texts: list[str], batched: list[str] | None = None,
           batch: int | None = None) -> tuple[dict[str, float], list]:
    """Latency of `fn` on one text at a time (p50/p95 ms) and its throughput on `batched` (default:
    the same texts) in calls of `batch` texts (default: all at once); returns those figures and
    what the batched calls returned.

    One warm-up call first, so lazy initialisation (grammar compilation, caches) is not timed.
    """
    batched = list(texts) if batched is None else batched
    batch = batch or max(len(batched), 1)
    fn(texts[:1])
    ms = []
    for t in texts:
        t0 = time.perf_counter()
        fn([t])
        ms.append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    outputs = [out for i in range(0, len(batched), batch) for out in fn(batched[i:i + batch])]
    batched_s = time.perf_counter() - t0
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "per_s": len(batched) / batched_s, "n": len(texts), "batch": batch}, outputs


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """Peak growth of resident memory while the block runs, sampled every few milliseconds.

    Torch allocates outside Python's allocator, so tracemalloc cannot see model memory;
    the process's resident set can.
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s, self.peak, self.start = interval_s, 0, 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def weights_bytes(model) -> int:
    """Bytes the parameters and buffers take in memory."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def teacher_file_bytes(teacher) -> int | None:
    """Size on disk of what the teacher ships as: its GGUF file, or its folder's weight files."""
    preset = preset_of(teacher.source or "")
    path = cache_root() / PRESETS[preset].file if preset else Path(teacher.source or "")
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    return None


def student_runner(student) -> Callable[[list[str]], list[dict]]:
    return lambda texts: student.predict(texts, max(len(texts), 1), constrain=True)


@dataclass
class Timed:
    """One model's measurements: speed (see `timing`), parameters, bytes on disk, memory."""

    name: str
    speed: dict
    params: int | None  # None: a served teacher, whose weights are elsewhere
    file_bytes: int | None
    rss_bytes: int
    weights_bytes: int | None
    outputs: list
    consistency: dict | None = None  # the teacher's self-consistency (consistency.py), when measured
    dtype: str | None = None  # the teacher's weights' dtype, as it was timed


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def speed_size_memory(student: Timed, teacher: Timed | None) -> dict:
    import torch

    t = teacher
    return {
        "speed": {
            "student": student.speed, "teacher": t.speed if t else None,
            "speedup_p50": ratio(t.speed["p50_ms"], student.speed["p50_ms"]) if t else None,
            "speedup_throughput": ratio(student.speed["per_s"], t.speed["per_s"]) if t else None,
            "torch_threads": torch.get_num_threads(),
        },
        "size": {
            "student_params": student.params, "student_bytes": student.file_bytes,
            "teacher_params": t.params if t else None, "teacher_bytes": t.file_bytes if t else None,
            "ratio": ratio(t.file_bytes, student.file_bytes) if t else None,
            "params_ratio": ratio(t.params, student.params) if t else None,
        },
        "memory": {
            "student_rss_bytes": student.rss_bytes, "student_weights_bytes": student.weights_bytes,
            "teacher_rss_bytes": t.rss_bytes if t else None, "teacher_weights_bytes": t.weights_bytes if t else None,
            "ratio": ratio(t.rss_bytes, student.rss_bytes) if t else None,
            "method": "peak growth of the process's resident memory while loading and timing each model",
        },
    }


