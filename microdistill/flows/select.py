"""Label what the student is least sure of: choose inputs from a pool, then extract them.

    microdistill extract --input pool.jsonl --out shards/ --select margin --student runs/x/student --budget 200

The pool is read and filtered as extraction reads a corpus; inputs the folder already holds are
left out, so rounds accumulate in one folder. A strategy that needs the student (margin,
entropy, diverse: data/select.py) asks it for its calibrated probabilities per field (and, for
diverse, its reading of each input); the teacher then labels the `budget` chosen inputs, and the
folder's manifest keeps each round in `rounds`: strategy, student, pool size and the chosen ids.
"""

from __future__ import annotations

import time
from pathlib import Path

from microdistill.core.console import say
from microdistill.core.errors import UserError
from microdistill.core.task import load_task
from microdistill.data.corpus import example_id, filter_inputs, read_corpus
from microdistill.data.select import NEEDS_STUDENT, STRATEGIES, choose
from microdistill.data.shards import ShardSet
from microdistill.extract import Chosen, ExtractConfig, extract
from microdistill.students import PerField, load_student
from microdistill.teachers import load_teacher


class SelectError(UserError):
    """A selection that cannot be made; one line for the user."""


class EmptyPool(SelectError):
    """Every input of the pool that passes the filters is labelled already."""


def select_and_extract(pool_path: Path, out_dir: Path, cfg: ExtractConfig, strategy: str, budget: int,
                       student_dir: Path | None = None, seed: int = 0, progress: bool = True,
                       drafter_for=None) -> Path:
    """Choose `budget` inputs of the pool by `strategy` and label them into `out_dir`."""
    if strategy not in STRATEGIES:
        raise SelectError(f"--select {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if budget < 1:
        raise SelectError(f"--budget must be at least 1 (got {budget})")
    if strategy in NEEDS_STUDENT and student_dir is None:
        raise SelectError(f"--select {strategy} chooses by the student's confidence: give --student")
    task = load_task(cfg.task)
    student = load_student(student_dir) if strategy in NEEDS_STUDENT else None
    if student is not None:
        if not isinstance(student, PerField):
            raise SelectError(f"student {student_dir}: a {student.kind} student gives no probability per field; "
                              "choose with a classifier-head student, or --select random")
        if student.task.fingerprint() != task.fingerprint():
            raise SelectError(f"student {student_dir} does the task {student.task.name!r}, not {task.name!r}")
    teacher = load_teacher(cfg.teacher, cfg.teacher_url, cfg.teacher_tokenizer, progress=progress)
    items, report = filter_inputs(read_corpus(pool_path, field=cfg.field, labels=cfg.labels), task, teacher.tokenizer,
                                  source=str(pool_path))
    done = {r.id for r in ShardSet(out_dir).records()} if (Path(out_dir) / "manifest.json").is_file() else set()
    pool = [it for it in items if example_id(it.text) not in done]
    if not pool:
        raise EmptyPool(f"pool {pool_path}: no input that passes the task's filters and is not labelled in "
                          f"{out_dir} yet ({report.summary()})")
    if budget > len(pool):
        raise SelectError(f"--budget {budget}: the pool holds {len(pool)} inputs not labelled yet; give at most that")
    texts = [it.text for it in pool]
    probs = student.probabilities(texts) if student is not None else None
    vectors = student.vectors(texts) if strategy == "diverse" else None
    picked = choose(len(pool), budget, strategy, probs, vectors, seed)
    say(f"{pool_path}: {len(pool)} inputs not labelled yet; {strategy} chose {len(picked)}", progress)
    round_ = {"strategy": strategy, "student": str(student_dir) if student_dir else None, "pool": len(pool),
              "budget": budget, "seed": seed, "at": time.time(), "ids": [example_id(pool[i].text) for i in picked]}
    chosen = Chosen([pool[i] for i in picked], report.as_dict(), round_)
    return extract(pool_path, out_dir, cfg, task=task, teacher=teacher, progress=progress, chosen=chosen,
                   drafter_for=drafter_for)
