"""The cascade's teacher calls kept as shard records, so `update` learns from them without asking again.

    microdistill serve --student runs/x/student --teacher qwen2.5-coder-0.5b-instruct --traffic runs/x/traffic

A call the student hands to its teacher is a hard input the teacher has just labelled. When the
teacher in process is the one that labelled the student's shards (same model, same dtype) and
those shards are readable, each such answer is decoded as extraction decodes (the shards' kept
vocabulary, decision points, hidden layer) and stored as a record in
`TRAFFIC/labels-<start>-<pid>/`, a shard folder with the shards' own header. `update --input
TRAFFIC` adds those records to the shards (`merge_labels`) before it chooses anything for the
teacher, so the calls the cascade already paid for are never paid again.

Crash-safe as extraction is: the records of the shard being filled are journalled after every
batch; a kill loses at most the batch in flight, and `merge_labels` reads the journal too.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from microdistill.core.task import parse_or_none
from microdistill.data.corpus import Item, clean_inputs
from microdistill.data.shards import JOURNAL, ShardSet, ShardWriter, StoreError, decode_shard, read_manifest

log = logging.getLogger("uvicorn.error")  # the server's log, where this runs
LABELS = "labels-*"  # glob of the per-process label folders in a traffic folder
SAME = ("format", "task_fingerprint", "teacher", "vocab", "signal", "calibration_id")  # what must match the shards


class RecordedAnswers:
    """Texts -> the teacher's answers as TeacherAnswers gives them ({output, fields}), each finished
    answer also added to a shard folder with the header of the shards the student learned from."""

    def __init__(self, answers, shards: dict[str, Any], folder: Path):
        from microdistill.core.grammar import Grammar  # xgrammar and torch: loaded when a teacher answers
        from microdistill.extract.local import decode_batch, make_record
        from microdistill.teachers.decoding import Decoder

        self.answers, self.task, self.teacher = answers, answers.task, answers.teacher
        kept = shards["vocab"]["kept"]
        t = self.teacher
        grammar = Grammar(self.task, t.tokenizer, t.vocab_size, t.eos_id, allowed=kept)
        self.decoder = Decoder(t, self.task, grammar, keep_ids=kept, hidden_layer=shards.get("hidden_layer"),
                               drafter=answers.draft)
        self.kept = set(kept)
        self.writer = ShardWriter(folder, {k: shards[k] for k in (*SAME, "hidden_layer") if k in shards})
        self.writer.save_manifest()  # at once: a server killed before its first full shard leaves a readable folder
        self.name, self.make_record, self.decode_batch = answers.name, make_record, decode_batch

    def __call__(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        cleaned = clean_inputs(self.task, texts)
        if not cleaned:
            return []
        tok, eos = self.teacher.tokenizer, self.teacher.eos_id
        rows = self.decode_batch(self.decoder, self.task, [self.decoder.rest_ids(t) for t in cleaned], cleaned)
        for text, (row, output, dec) in zip(cleaned, rows):
            if output is None:
                continue  # cut at max_tokens: not a valid example (served as it stands, its fields None)
            try:
                self.writer.add(self.make_record(self.task, tok, Item(text), row, output, dec, self.kept, eos))
            except Exception as e:  # an answer that does not round-trip is served, just not kept
                log.warning("teacher answer not kept as a label: %s", str(e).splitlines()[0][:200])
        self.writer.journal()
        served = [output if output is not None else tok.decode(row.output_ids) for row, output, _ in rows]
        return [{"output": o, "fields": parse_or_none(self.task, o)} for o in served]

    def close(self) -> None:
        self.writer.close()


def recorded(answers, student, traffic: Path):
    """`answers` recording into `traffic`, or `answers` itself where the records would not be the
    shards' kind: a served teacher, another teacher or dtype than the shards', shards not readable."""
    shards_meta = (getattr(student, "meta", None) or {}).get("shards") or {}
    path = Path(shards_meta.get("path") or "")
    why = None
    if getattr(answers.teacher, "access", None) != "white":
        why = "the teacher is served: its answers are logged, not kept as shard records"
    elif not answers.same:
        why = "the teacher is not the one that labelled the student's shards"
    elif not (path / "manifest.json").is_file():
        why = f"the student's shards ({path}) are not here"
    if why:
        log.warning("--traffic: teacher calls are not kept as labels (%s); update will ask the teacher again", why)
        return answers
    folder = Path(traffic) / f"labels-{int(time.time())}-{os.getpid()}"
    return RecordedAnswers(answers, read_manifest(path), folder)


def label_records(traffic: Path) -> list:
    """Every record the label folders of `traffic` hold, journals included (one per input)."""
    records = {}
    for folder in sorted(Path(traffic).glob(LABELS)):
        if not (folder / "manifest.json").is_file():
            continue
        found = list(ShardSet(folder).records())
        journal = folder / JOURNAL
        if journal.is_file():
            found += decode_shard(journal.read_bytes(), journal)
        for r in found:
            records.setdefault(r.id, r)
    return list(records.values())


def merge_labels(traffic: Path, shards_dir: Path) -> int:
    """Add the teacher answers kept in `traffic` to the shard folder `shards_dir` (those it does not
    hold yet); returns how many. Label folders made for other shards are refused in one line."""
    target = read_manifest(Path(shards_dir))
    for folder in sorted(Path(traffic).glob(LABELS)):
        if (folder / "manifest.json").is_file():
            theirs = read_manifest(folder)
            if any(theirs.get(k) != target.get(k) for k in SAME):
                raise StoreError(f"{folder}: teacher answers kept for other shards than {shards_dir} (another "
                                 "teacher, task or vocabulary); move it out of the traffic folder")
    writer = ShardWriter(shards_dir, {k: target[k] for k in SAME if k in target})
    new = [r for r in label_records(traffic) if r.id not in writer.done_ids]
    for r in new:
        writer.add(r)
    writer.close()
    return len(new)
