"""The cascade's teacher calls kept as shard records, so `update` learns from them without asking again.

    microdistill serve --student runs/x/student --teacher qwen2.5-coder-0.5b-instruct --traffic runs/x/traffic

A call the student hands to its teacher is a hard input the teacher has just labelled. When the
teacher is the one that labelled the student's shards (same model, same dtype) and those shards
are readable, each such answer is stored as extraction stores it: decoded in process over the
shards' kept vocabulary with decision points and hidden layer, or, from a served teacher, its
top-k log-probabilities at the kept ids (text alone for text-only shards); a record in
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
from microdistill.data.shards import JOURNAL, Record, ShardSet, ShardWriter, StoreError, decode_shard, read_manifest

log = logging.getLogger("uvicorn.error")  # the server's log, where this runs
LABELS = "labels-*"  # glob of the per-process label folders in a traffic folder
SAME = ("format", "task_fingerprint", "teacher", "vocab", "signal", "calibration_id")  # what must match the shards


class RecordedAnswers:
    """Texts -> the teacher's answers as TeacherAnswers gives them ({output, fields}), each usable
    answer also added to a shard folder with the header of the shards the student learned from:
    decoded as local extraction decodes (extract/local.py), or, from a served teacher, stored from
    its top-k log-probabilities as served extraction stores them (extract/served.py)."""

    def __init__(self, answers, shards: dict[str, Any], folder: Path):
        self.answers, self.task, self.teacher, self.name = answers, answers.task, answers.teacher, answers.name
        kept = shards["vocab"]["kept"]
        if self.teacher.access == "white":
            from microdistill.core.grammar import Grammar  # xgrammar and torch: loaded when a teacher answers
            from microdistill.teachers.decoding import Decoder

            t = self.teacher
            grammar = Grammar(self.task, t.tokenizer, t.vocab_size, t.eos_id, allowed=kept)
            self.decoder = Decoder(t, self.task, grammar, keep_ids=kept, hidden_layer=shards.get("hidden_layer"),
                                   drafter=answers.draft)
        self.kept = {int(tid): k for k, tid in enumerate(kept)}
        self.eos, self.signal = int(shards["vocab"].get("eos", self.teacher.eos_id)), shards.get("signal", "logits")
        self.writer = ShardWriter(folder, {k: shards[k] for k in (*SAME, "hidden_layer") if k in shards})
        self.writer.save_manifest()  # at once: a server killed before its first full shard leaves a readable folder

    def __call__(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        cleaned = clean_inputs(self.task, texts)
        if not cleaned:
            return []
        pairs = self.decoded(cleaned) if self.teacher.access == "white" else self.served(cleaned)
        for text, (_, record) in zip(cleaned, pairs):
            if isinstance(record, Record):
                self.writer.add(record)
            elif not record.startswith("cut at"):  # a cut answer is no example, as in extraction
                log.warning("teacher answer to %r not kept as a label: %s", text[:40], record)
        self.writer.journal()
        return [{"output": o, "fields": parse_or_none(self.task, o)} for o, _ in pairs]

    def decoded(self, cleaned: list[str]) -> list[tuple[str, Record | str]]:
        """(the answer served, its record or why there is none) per text, from the teacher in process."""
        from microdistill.extract.local import decode_batch, make_record

        tok, out = self.teacher.tokenizer, []
        for text, (row, answer, dec) in zip(cleaned, decode_batch(self.decoder, self.task,
                                                                  [self.decoder.rest_ids(t) for t in cleaned], cleaned)):
            if answer is None:
                out.append((tok.decode(row.output_ids), f"cut at {self.task.output.max_tokens} tokens"))
                continue
            try:
                out.append((answer, make_record(self.task, tok, Item(text), row, answer, dec, self.kept.keys(),
                                                self.teacher.eos_id)))
            except Exception as e:  # an answer that does not round-trip is served, just not kept
                out.append((answer, str(e).splitlines()[0][:200]))
        return out

    def served(self, cleaned: list[str]) -> list[tuple[str, Record | str]]:
        """The same, from a served teacher's replies."""
        from microdistill.extract.served import api_record

        out = []
        for text, a in zip(cleaned, self.teacher.answers(self.task, cleaned)):
            if a.fields is None:
                out.append(("", a.problem))
            else:
                out.append((self.task.serialize(a.fields),
                            api_record(self.task, self.teacher, Item(text), a, self.kept, self.eos, self.signal)))
        return out

    def close(self) -> None:
        self.writer.close()


def recorded(answers, student, traffic: Path):
    """`answers` recording into `traffic`, or `answers` itself where the records would not be the
    shards' kind: another teacher or dtype than the shards', shards not readable."""
    shards_meta = (getattr(student, "meta", None) or {}).get("shards") or {}
    path = Path(shards_meta.get("path") or "")
    why = None
    if not answers.same:
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
