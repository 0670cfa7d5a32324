"""Extraction by several workers: which inputs each labels, and the one calibration they share.

    microdistill extract --input corpus.jsonl --out shards/ --part 0/4     # and 1/4, 2/4, 3/4
    torchrun --nproc-per-node 4 -m microdistill extract --input corpus.jsonl --out shards/

Every worker runs the same command with its own `--part I/N` (under torchrun, RANK/WORLD_SIZE).
An input belongs to part `hash(id) mod N`: every input is in exactly one part, whatever the
order or timing of the workers, and whatever `--limit` a later run is given.

Worker 0 prepares the folder: it calibrates (kept vocabulary, dtype check, input embeddings),
writes the root manifest with `parts: N` and a `calibration_id`, and stores there the
calibration answers it could keep (they cover inputs of every part; no one labels them again).
The other workers wait until the root manifest is complete, then each writes its own
`parts/I-of-N/` (its manifest and shards, stamped with the calibration id). Worker 0 prepares
rather than "whoever locks first" because a fixed preparer leaves no stale lock to clean up
after a crash: re-running worker 0 finishes the preparation, re-running any worker resumes it.
`store.ShardSet` reads the root and its parts as one folder.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from microdistill.core.console import say
from microdistill.core.errors import UserError
from microdistill.data.shards import ShardWriter, part_dir, read_manifest

WAIT_S = 4 * 3600.0  # how long a worker waits for worker 0's calibration (a big corpus's embedding pass is long)
POLL_S = 2.0
# what a part copies from the root manifest: everything its examples depend on
SHARED = ("task", "task_fingerprint", "teacher", "signal", "vocab", "hidden_layer", "dtype_check", "calibration_id")


class PartError(UserError):
    """A part of an extraction that does not fit its folder; one line for the user."""


@dataclass(frozen=True)
class Part:
    """Worker `index` of `count` (0-based)."""

    index: int
    count: int

    @classmethod
    def parse(cls, spec: str) -> Part:
        """"I/N" as given to --part."""
        try:
            i, n = (int(x) for x in spec.split("/"))
        except ValueError:
            raise PartError(f"--part {spec!r}: expected I/N, this worker's number and the number of workers "
                            "(e.g. 0/4)") from None
        if not 0 <= i < n:
            raise PartError(f"--part {spec!r}: I must be from 0 to N-1")
        return cls(i, n)

    def owns(self, eid: str) -> bool:
        # the id's last 8 hex digits: the first 8 draw the held-out split, so parts split alike
        return int(eid[8:], 16) % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def from_env(env: Mapping[str, str] = os.environ) -> Part | None:
    """torchrun's RANK / WORLD_SIZE as a part, when more than one process runs."""
    n = int(env.get("WORLD_SIZE", "1"))
    return Part(int(env.get("RANK", "0")), n) if n > 1 else None


def root_fields(part: Part) -> dict[str, Any]:
    """What worker 0 adds to a new root manifest."""
    return {"parts": part.count, "calibration_id": uuid.uuid4().hex}


def check_root(out: Path, part: Part | None) -> dict[str, Any] | None:
    """The manifest at `out` as written (None when there is none yet), refused when it does not
    fit a worker with this `part` (None: a single-process extraction)."""
    if not (out / "manifest.json").is_file():
        return None
    m = read_manifest(out)
    if "part" in m:
        i, n = m["part"]
        raise PartError(f"{out} is part {i}/{n} of the shard folder {out.parent.parent}; give that folder as --out")
    n = m.get("parts")
    if part is None and n:
        raise PartError(f"{out} is extracted in {n} parts; run each worker with --part I/{n}")
    if part is not None and not n:
        raise PartError(f"{out} was extracted by one process; continue it without --part, or use another --out")
    if part is not None and n != part.count:
        raise PartError(f"{out} is extracted in {n} parts, not {part.count}; run the workers with --part I/{n}")
    return m


def wait_for_root(out: Path, part: Part, timeout_s: float = WAIT_S, progress: bool = True) -> None:
    """Until worker 0 has prepared `out` (its manifest complete); every other worker waits here."""
    deadline = time.monotonic() + timeout_s
    said = False
    while not (m := check_root(out, part)) or not m.get("complete"):
        if time.monotonic() > deadline:
            raise PartError(f"{out}: not calibrated after {timeout_s:.0f} s; run worker 0 (--part 0/{part.count}) "
                            "first, then this worker again")
        if not said:
            say(f"worker {part}: waiting for worker 0 to calibrate {out}", progress)
            said = True
        time.sleep(POLL_S)


def open_part(out: Path, root: dict[str, Any], part: Part) -> ShardWriter:
    """The writer of this worker's part folder (store.with_parts has refused a part of another
    calibration when the root was read)."""
    header = {**{k: root[k] for k in SHARED if k in root}, "part": [part.index, part.count]}
    return ShardWriter(part_dir(out, part.index, part.count), header)
