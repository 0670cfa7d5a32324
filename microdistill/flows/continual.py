"""One command for the learning loop: choose what the teacher labels, label it, train, and keep the
new student only if it is not worse.

    microdistill update --student runs/x/student --input pool.jsonl --budget 200 --out runs/x/student-2
    microdistill update --student runs/x/student --input runs/x/traffic --rounds 3 --out runs/x/student-2

Each round: `--select` chooses `--budget` inputs of the pool (a corpus, or a `serve --traffic`
folder: the calls the student answered are the inputs it doubts) that the student's shards do
not hold yet; the teacher that labelled those shards labels them into the same folder; a student
of the same options is trained on all the labels, from its pretrained start (or, with
`--warm-epochs N`, from the current student's weights for N epochs); and the gate scores
the old and the new student on the held-out inputs the shards held before the update (a fixed
set, the same for every round): the new one is kept only if it agrees with the teacher at least
as often (`--tolerance` less, at most). `--out` gets the last kept student and `update.json`:
per round, the teacher calls it spent and what they bought. A traffic folder's teacher answers
that the server kept as records (extract/recording.py) are added to the shards first, at no
teacher call, and a selection never picks them again. Rounds work in `.OUT.rounds/` beside
`--out` (removed when it finishes; a refused round's student stays there to be looked at): a
killed update leaves the old student where it was, and the same command resumes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from microdistill.core.console import say
from microdistill.core.files import atomic_dir, atomic_write_json, check_output_folder
from microdistill.data.shards import ShardSet
from microdistill.extract.config import ExtractConfig
from microdistill.extract.recording import merge_labels
from microdistill.flows.config import UpdateConfig, UpdateError
from microdistill.flows.select import EmptyPool, select_and_extract
from microdistill.serve.traffic import MANIFEST as TRAFFIC, read_traffic
from microdistill.students import KINDS, load_student
from microdistill.students.folder import FORMAT
from microdistill.teachers import recorded_spec
from microdistill.train import TrainConfig, train_once


def update(student_dir: Path, pool: Path, out_dir: Path, cfg: UpdateConfig = UpdateConfig(),
           shards_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run `cfg.rounds` rounds (see the module docstring); returns update.json's content."""
    student_dir, out_dir = Path(student_dir), Path(out_dir)
    check_output_folder(out_dir, "--out", "config.json", FORMAT, "a student folder", {"student": student_dir},
                        UpdateError)
    old = load_student(student_dir)
    if cfg.warm_epochs and not KINDS[old.kind].warm_starts:  # refused before the teacher is asked anything
        raise UpdateError(f"--warm-epochs: student {student_dir} is a {old.kind} student, which cannot start from "
                          "another student's weights")
    shards_dir = Path(shards_dir or (old.meta.get("shards") or {}).get("path") or "")
    if not (shards_dir / "manifest.json").is_file():
        raise UpdateError(f"student {student_dir}: the shards it was trained on ({shards_dir}) are not here; give "
                          "them with --shards")
    shards = ShardSet(shards_dir)
    if shards.task().fingerprint() != old.task.fingerprint():
        raise UpdateError(f"shard folder {shards_dir} is for another task than student {student_dir}")
    work = out_dir.parent / f".{out_dir.name}.rounds"
    work.mkdir(parents=True, exist_ok=True)
    gate = gate_set(shards, work)
    reused = merge_labels(Path(pool), shards_dir) if (Path(pool) / TRAFFIC).is_file() else 0
    if reused:
        say(f"[update] {reused} teacher answers from {pool} added to {shards_dir}: no teacher call for them", progress)
    pool = corpus_of(Path(pool), work, old.task)
    (work / "task.yaml").write_text(json.dumps(old.task.model_dump(mode="json")))
    m = shards.manifest  # label as the folder's examples were: its teacher, where it was served, its vocabulary size
    extract_cfg = ExtractConfig(task=str(work / "task.yaml"), teacher=recorded_spec(m.get("teacher")),
                                teacher_url=(m.get("api") or {}).get("url"), vocab_size=m["vocab"].get("size") or 512)
    # the old student's options, from the pretrained start (never from the student its run warm-started from)
    train_cfg = replace(TrainConfig.from_dict(old.meta.get("training") or {}), init_from="")
    current, before, rounds = student_dir, score(old, gate), []
    for k in range(cfg.rounds):
        n = len(ShardSet(shards_dir))
        try:
            select_and_extract(pool, shards_dir, extract_cfg, cfg.select, cfg.budget, current, cfg.seed + k, progress)
        except EmptyPool:
            if not (k == 0 and reused):
                raise
            say("[update] every input of the traffic is labelled already: this round trains on them", progress)
        warm = {"init_from": str(current), "epochs": cfg.warm_epochs, "max_steps": None} if cfg.warm_epochs else {}
        new = train_once(shards_dir, work / f"round-{k + 1}", replace(train_cfg, **warm), progress)
        after = score(load_student(new), gate)
        rounds.append({"round": k + 1, "teacher_calls": len(ShardSet(shards_dir)) - n, "select": cfg.select,
                       "reused_labels": reused if k == 0 else 0, "warm_start": bool(cfg.warm_epochs),
                       "train_s": json.loads((new / "training.json").read_text()).get("wall_s"),
                       "gate_n": len(gate), "old_agreement": before,
                       "new_agreement": after, "kept": after + cfg.tolerance >= before})
        say(f"[update] round {k + 1}: {rounds[-1]['teacher_calls']} teacher calls; held-out agreement "
            f"{before:.2%} -> {after:.2%}", progress)
        if not rounds[-1]["kept"]:
            raise UpdateError(f"round {k + 1}: the new student agrees with the teacher on {after:.2%} of the "
                              f"{len(gate)} held-out inputs, the old one on {before:.2%}; kept the old one "
                              f"({current}); nothing written to {out_dir}")
        current, before = new, after
    report = {"student": str(student_dir), "shards": str(shards_dir), "pool": str(pool), "config": cfg.to_dict(),
              "rounds": rounds, "teacher_calls": sum(r["teacher_calls"] for r in rounds)}
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(current, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint", ".lock"))
        atomic_write_json(tmp / "update.json", report)
    shutil.rmtree(work, ignore_errors=True)  # the rounds' students: the kept one is in out_dir now
    return report


def gate_set(shards: ShardSet, work: Path) -> list:
    """The held-out records the shards held when this update began: their ids are kept in `work`, so
    a resumed update gates on the same set, not on the held-out inputs its rounds have added."""
    path = work / "gate.json"
    held = {r.id: r for r in shards.records("val")}
    if path.is_file():
        held = {i: held[i] for i in json.loads(path.read_text()) if i in held}
    if not held:
        raise UpdateError(f"shard folder {shards.dir}: no held-out inputs to gate a new student on")
    atomic_write_json(path, sorted(held))
    return [held[i] for i in sorted(held)]


def score(student, records) -> float:
    """The share of `records` the student answers exactly as the teacher did."""
    answers = student.predict([r.text for r in records])
    return sum(a["fields"] == r.fields for a, r in zip(answers, records)) / len(records)


def corpus_of(pool: Path, work: Path, task) -> Path:
    """The pool as a corpus file: itself, or a traffic folder's texts (each once) as JSONL."""
    if not (pool / TRAFFIC).is_file():
        return pool
    texts = list(dict.fromkeys(r["text"] for r in read_traffic(pool, task)))
    if not texts:
        raise UpdateError(f"traffic folder {pool}: no answered call to learn from yet")
    path = work / "traffic.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    return path
