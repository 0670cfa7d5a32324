"""Extraction: label a corpus with any teacher and store what it said as shards.

    microdistill extract --task reddit-comment --input comments.jsonl --out shards/
    microdistill extract ... --out shards/ --part 1/4      # one of 4 workers (parts.py)
    microdistill extract ... --teacher openai:MODEL --teacher-url URL   # a served teacher (served.py)
    microdistill inspect shards/

One run, whatever the teacher: read and filter the corpus, load the teacher, open the folder
(checked against the task and teacher that made it; a new one prepared), label what is not
there yet, close the manifest with timings and filter counts. How a teacher is labelled depends
on what it gives: a white box (local.py: decoding with full logits) or a black box (served.py:
calls, answers and top-k log-probabilities). Re-running the same command continues where it
stopped; the kept vocabulary of an existing folder is reused, never recomputed.

    config.py      ExtractConfig (no torch)
    folder.py      the folder's header, same-teacher checks, the tokenizer beside the shards
    local.py       a local teacher: decoding into records, reusing calibration answers
    served.py      a served teacher: calls in flight, top-k as logits and decision points
    prepare.py     a new folder's set-up: the kept vocabulary from a calibration sample, the dtype check
    embeddings.py  the teacher's input embeddings in context
    parts.py       extraction by N workers
    recording.py   the cascade's teacher calls kept as records for update (serve --traffic)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microdistill.core.console import say
from microdistill.core.files import writer_lock
from microdistill.core.task import Task, load_task
from microdistill.data.corpus import Item, filter_inputs, read_corpus
from microdistill.data.shards import INPUT_EMBEDDINGS, JOURNAL, part_dir
from microdistill.extract.config import ExtractConfig, ExtractError
from microdistill.extract.parts import WAIT_S, Part
from microdistill.teachers import Teacher, load_teacher

__all__ = ["Chosen", "ExtractConfig", "ExtractError", "LABELLINGS", "extract"]


def _local():
    from microdistill.extract.local import LocalLabelling

    return LocalLabelling


def _served():
    from microdistill.extract.served import ServedLabelling

    return ServedLabelling


@dataclass(frozen=True)
class Chosen:
    """Inputs chosen from a corpus for the teacher to label (flows/select.py), and how."""

    items: list[Item]  # read, filtered and chosen
    filters: dict[str, Any]  # the corpus' filter report
    round: dict[str, Any]  # how they were chosen: strategy, student, pool, budget, ids


# How each kind of teacher access is labelled (Teacher.access): one entry per way.
LABELLINGS = {"white": _local, "black": _served}


def extract(input_path: str | Path, out_dir: str | Path, config: ExtractConfig | None = None, *,
            task: Task | None = None, teacher: Teacher | None = None, progress: bool = True,
            part: Part | None = None, wait_s: float = WAIT_S, chosen: Chosen | None = None,
            drafter_for=None) -> Path:
    """Label the corpus at `input_path` with the teacher and write shards to `out_dir`.

    `task` and `teacher`, when given, are used instead of loading `config.task` / `config.teacher`
    (a caller that already holds them). With `part`, this process is one worker of several
    (parts.py): worker 0 prepares the folder, the others wait for it up to `wait_s` seconds, and
    each labels only its own inputs. `chosen`: inputs of the corpus already read, filtered and
    chosen (flows/select.py), labelled instead of the corpus, and how they were chosen, which
    the manifest's `rounds` keeps. `drafter_for(teacher, task)`: the --draft student's proposals
    (students/decoder/draft.py draft_loader), required with `config.draft`. Returns `out_dir`.
    """
    cfg = config or ExtractConfig()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExtractError(f"--out {out_dir}: is a file; give a folder for the shards")
    if out_dir.is_dir() and not (out_dir / "manifest.json").is_file():  # what a run killed early leaves may stay
        other = sorted(p.name for p in out_dir.iterdir() if p.name not in {".lock", "parts", INPUT_EMBEDDINGS, JOURNAL})
        if other:
            raise ExtractError(f"--out {out_dir}: holds other files ({', '.join(other[:3])}) and no shards; choose a new "
                               "or empty folder, or a shard folder to add to")
    if cfg.draft is not None and drafter_for is None:
        raise ExtractError("--draft: pass drafter_for=draft_loader(config) (students/decoder/draft.py) to extract()")
    task = task or load_task(cfg.task)
    raw_items = read_corpus(input_path, field=cfg.field, labels=cfg.labels) if chosen is None else []
    teacher = teacher or load_teacher(cfg.teacher, cfg.teacher_url, cfg.teacher_tokenizer, progress=progress)
    way = LABELLINGS[teacher.access]()(teacher, task, cfg, out_dir, progress, **(
        {"drafter_for": drafter_for} if drafter_for is not None else {}))
    if part is not None and not way.parts:
        raise ExtractError("--part splits a local teacher's work; a served teacher scales with --concurrency")
    if chosen is None:
        items, report = filter_inputs(raw_items, task, teacher.tokenizer, source=str(input_path))
        say(f"{input_path}: {report.summary()}", progress)
        filters = {**report.as_dict(), "corpus": str(input_path)}
    else:
        items, filters = chosen.items, {**chosen.filters, "corpus": str(input_path)}
    mine = part_dir(out_dir, part.index, part.count) if part is not None and part.index else out_dir
    with writer_lock(mine, "shard folder", ExtractError):
        return _label(way, items, filters, out_dir, part, wait_s, started, progress, chosen)


def _label(way, items, filters: dict, out_dir: Path, part: Part | None, wait_s: float, started: float,
           progress: bool, chosen: Chosen | None) -> Path:
    """Open the folder, label what is left and close the manifest (the lock held)."""
    todo = way.open(items, filters, part, wait_s)
    if way.writer is None:  # nothing to label and no folder to update
        return out_dir
    timings = dict(way.writer.manifest.get("timings", {}))
    if todo:
        stats = way.label(todo)
        seconds = max(stats["seconds"], 1e-9)
        timings.update(extract_s=round(time.perf_counter() - started, 3),
                       examples_per_s=round(stats["written"] / seconds, 4),
                       tokens_per_s=round(stats["tokens"] / seconds, 2), **way.timings)
        filters["cut_at_max_tokens"] = int(stats["cut"])
        filters.update({"skipped": stats["skipped"]} if "skipped" in stats else {})
        say(way.summary(stats, timings), progress)
    rounds = {"rounds": [*way.writer.manifest.get("rounds", []), chosen.round]} if chosen is not None else {}
    way.writer.close(timings=timings, filters=filters, **way.closing, **rounds)
    say(f"{out_dir}: {way.writer.n_done} examples", progress)
    return out_dir
