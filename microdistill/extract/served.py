"""Extraction through an OpenAI-compatible server (teachers/api.py): many calls in flight, the same shards.

    microdistill extract --teacher openai:MODEL --teacher-url URL --concurrency 8 --input corpus.jsonl --out shards/

extract.extract() runs a black-box teacher (teachers/served.py) through this module. The first call goes alone (it learns what
the server takes and whether the shards can hold log-probabilities); then up to
`--concurrency` calls are in flight on a thread pool. The first `--calibration` answers choose
the kept vocabulary (the task's required tokens, then the ids that carry the most top-k mass)
and are stored like every later answer, so no call is wasted.

Per generated step a logits shard stores the top-k log-probabilities at the kept ids, MISSING
(probability ~0) at the other kept ids, and `lse` 0: log-probabilities are already normalised
over the full vocabulary, so the mass outside the kept top-k is the tail. Decision points come
from the step where each enum value starts (`decisions_from_steps`). Text-only shards store the
canonical answer's tokens alone.

Resuming skips every input already in the folder; each input is asked once per run, and the
shards are written atomically as every extraction writes them (a crash loses at most the unflushed shard).
The manifest's `api_usage` sums the calls, tokens, retries and seconds of every run, which the
cost verb reads as the teacher's tokens per call.
"""

from __future__ import annotations

import math
import time
from itertools import chain, islice
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from microdistill.core.console import progress as progress_bar
from microdistill.core.console import say
from microdistill.core.task import Task
from microdistill.data.corpus import Item, example_id
from microdistill.data.shards import Record, ShardSet, ShardWriter, StoreError
from microdistill.extract import folder
from microdistill.extract.config import ExtractConfig
from microdistill.extract.parts import Part
from microdistill.extract.prepare import Calibration, build_vocab
from microdistill.teachers import TeacherError
from microdistill.teachers.decoding import value_starts
from microdistill.teachers.served import TOP_K, Answer, ServedTeacher, Usage, floor_logprob, in_flight

MISSING = -1e4  # the stored logit of a kept id outside a step's top-k: exp() of it is 0 in float32


class ServedLabelling:
    """One extraction run through a served teacher (see extract.extract for the steps around it)."""

    parts = False  # a served teacher scales with calls in flight (--concurrency), not with workers

    def __init__(self, teacher: ServedTeacher, task: Task, cfg: ExtractConfig, out_dir: Path, progress: bool):
        self.teacher, self.task, self.cfg, self.out_dir, self.progress = teacher, task, cfg, out_dir, progress
        self.writer: ShardWriter | None = None
        self.timings = {"concurrency": cfg.concurrency}
        self.closing: dict[str, Any] = {}

    def open(self, items: list[Item], filters: dict[str, Any], part: Part | None, wait_s: float) -> list[Item]:
        """Check the folder, ask the first input alone (what the server takes), and prepare the
        vocabulary from the first answers when the folder is new; returns the inputs to label."""
        task, teacher = self.task, self.teacher
        header = folder.header(task, teacher.describe())
        existing = folder.existing(self.out_dir)
        folder.check_same(self.out_dir, existing, header, ("task_fingerprint", "teacher"))
        done = ShardSet.ids_in(self.out_dir, existing) if existing else set()
        # one call per input: the corpus may repeat a text when the task does not de-duplicate
        todo = list({example_id(it.text): it for it in items[:self.cfg.limit] if example_id(it.text) not in done}.values())
        self.usage = Usage.from_dict(existing.get("api_usage") if existing else None)
        if not todo:
            if existing:
                self.writer = ShardWriter(self.out_dir, {**header, **{k: existing[k] for k in ("signal", "vocab")}})
            say(f"{self.out_dir}: nothing to label ({len(done)} examples already there)", self.progress)
            return []
        first = (todo[0], teacher.probe(task, todo[0].text))
        if existing and existing.get("signal") != teacher.signal:
            raise StoreError(f"{self.out_dir} holds {existing.get('signal')} shards but this server now gives "
                             f"{teacher.signal} ones ({'; '.join(teacher.notes)}); use another --out folder")
        header.update(signal=teacher.signal, api={"url": teacher.url, "top_logprobs": TOP_K if teacher.logprobs else 0,
                                                  "json_schema": teacher.structured, "notes": teacher.notes})
        rest = in_flight(teacher, task, ((it, it.text) for it in todo[1:]), self.cfg.concurrency)
        self.stream = chain([first], ((it, answer) for (it, _), answer in rest))
        self.t0 = time.perf_counter()
        if existing and "vocab" in existing:
            header["vocab"] = existing["vocab"]
        else:
            calib = list(islice(self.stream, max(self.cfg.calibration, 1)))
            header["vocab"] = api_vocab(teacher, task, items, calib, self.cfg.vocab_size, self.progress)
            self.stream = chain(calib, self.stream)
        self.writer = ShardWriter(self.out_dir, header)
        folder.save_tokenizer(teacher.tokenizer, self.out_dir)
        return todo

    def label(self, todo: list[Item]) -> dict[str, Any]:
        """Store every answer: {written, tokens, cut, skipped, seconds}."""
        stats = store_answers(self.writer, self.stream, self.task, self.teacher, self.usage, len(todo), self.progress,
                              self.t0)
        if self.writer.n_done == 0 and stats["skipped"]:
            raise TeacherError(f"teacher {self.teacher.source} at {self.teacher.url}: no answer could be stored; "
                               f"the last: {stats['last']}")
        self.closing = {"api_usage": self.usage.as_dict()}
        return {**stats, "seconds": time.perf_counter() - self.t0}

    def summary(self, stats: dict[str, Any], timings: dict[str, Any]) -> str:
        return (f"{stats['written']} new examples ({stats['cut']} cut at {self.task.output.max_tokens} tokens, "
                f"{stats['skipped']} skipped), {timings['examples_per_s']:.2f} examples/s, {self.usage.retries} "
                "retried calls in all")


def decisions_from_steps(task: Task, tokenizer, text: str, steps: list[tuple[int, float, dict[int, float]]]
                         ) -> dict[str, np.ndarray]:
    """P(value) of each enum field, normalised over its values, from one generation's top-k.

    As with a local teacher, a value's score is the product of its tokens' probabilities after
    the answer up to the field. The chosen value's tokens are all in the generation. Another
    value shares the chosen path up to its first differing token, whose log-probability is read
    from the top-k at that step (`floor_logprob`, an upper bound, when it is not among them);
    its later tokens are never seen and count as certain. So the score is exact whenever a
    value differs from the chosen one by its last token, as enum values that differ from their
    first token do.
    """
    ids = [s[0] for s in steps]
    offsets = [len(tokenizer.decode(ids[:t])) for t in range(len(ids))]
    out = {}
    for f, start in zip(task.enum_fields, value_starts(task, text)):
        j = max(t for t, off in enumerate(offsets) if off <= start)  # the step the value starts in
        head = text[offsets[j]:start]  # usually "": values start on a token boundary
        scores = []
        for value in f.values:
            cont = tokenizer(head + value, add_special_tokens=False).input_ids
            logp, d = 0.0, 0
            while d < len(cont) and j + d < len(steps) and ids[j + d] == cont[d]:
                logp += steps[j + d][1]
                d += 1
            if d < len(cont) and j + d < len(steps):
                top = steps[j + d][2]
                logp += top.get(cont[d], floor_logprob(top))
            scores.append(logp)
        peak = max(scores)
        p = np.exp(np.asarray(scores, dtype=np.float64) - peak)
        out[f.name] = (p / p.sum()).astype(np.float32)
    return out


def api_record(task: Task, teacher: ServedTeacher, item: Item, answer: Answer, kept: dict[int, int], eos: int,
               signal: str) -> Record | str:
    """The Record of one answer, or why it cannot be stored (one short phrase)."""
    tok = teacher.tokenizer
    text = task.serialize(answer.fields)
    input_ids = tok(item.text, add_special_tokens=False).input_ids
    if tok.decode(input_ids) != item.text:
        return "the input does not decode back to its text"
    common = dict(text=item.text, input_ids=input_ids, output_text=text, fields=answer.fields, labels=item.labels)
    if signal == "text":
        out = tok(text, add_special_tokens=False).input_ids + [eos]
        if any(i not in kept for i in out):
            return "its tokens are outside the kept vocabulary"
        return Record(output_ids=out, **common)
    if answer.steps is None:
        return "the reply has no log-probabilities (or tokens this tokenizer lacks)"
    if answer.text != text:
        return "the answer is not in canonical form, so its tokens are not the stored answer's"
    steps = answer.steps if answer.steps[-1][0] == eos else answer.steps + [(eos, 0.0, {eos: 0.0})]
    ids = [s[0] for s in steps]
    if tok.decode(ids[:-1]) != text:
        return "the returned tokens do not spell the answer"
    if any(i not in kept for i in ids):
        return "an answer token is outside the kept vocabulary"
    logits = np.full((len(steps), len(kept)), MISSING, dtype=np.float32)
    for t, (_, _, top) in enumerate(steps):
        for tid, lp in top.items():
            if tid in kept:
                logits[t, kept[tid]] = lp
    return Record(output_ids=ids, logits=logits, lse=np.zeros(len(steps), np.float32),
                  decisions=decisions_from_steps(task, tok, text, steps[:-1]), **common)


def api_vocab(teacher: ServedTeacher, task: Task, items: list[Item], answers: list[tuple[Item, Answer]], size: int,
              progress: bool) -> dict[str, Any]:
    """The manifest's `vocab` from the calibration answers: mean top-k probability per id (text-
    only: how often each id spells the canonical answers)."""
    mass = np.zeros(teacher.vocab_size, dtype=np.float64)
    n = 0
    for _, a in answers:
        if a.fields is None:
            continue
        if teacher.signal == "logits" and a.steps is not None:
            for _, _, top in a.steps:
                for tid, lp in top.items():
                    mass[tid] += math.exp(lp)
            n += len(a.steps)
        else:
            ids = teacher.tokenizer(task.serialize(a.fields), add_special_tokens=False).input_ids
            np.add.at(mass, ids, 1.0)
            n += len(ids)
    return build_vocab(teacher, task, items, size, Calibration(mass / max(n, 1), answers), progress)  # type: ignore[arg-type]


def store_answers(writer: ShardWriter, stream: Iterator[tuple[Item, Answer]], task: Task, teacher: ServedTeacher,
                  usage: Usage, total: int, progress: bool, t0: float) -> dict[str, Any]:
    """Store every answer of `stream`; on any error the finished records are flushed first."""
    kept = {tid: k for k, tid in enumerate(writer.manifest["vocab"]["kept"])}
    eos = int(writer.manifest["vocab"]["eos"])
    stats: dict[str, Any] = {"written": 0, "tokens": 0, "cut": 0, "skipped": 0, "last": ""}
    bar, job = progress_bar(progress, "extracting", total)
    try:
        with bar:
            for item, answer in stream:
                usage.add(answer)
                stats["tokens"] += answer.completion_tokens
                record = api_record(task, teacher, item, answer, kept, eos, writer.manifest["signal"]) \
                    if answer.fields is not None else answer.problem
                if isinstance(record, Record):
                    writer.add(record)
                    stats["written"] += 1
                    if stats["written"] % teacher.concurrency == 0:  # about the calls that were in flight
                        writer.journal()
                else:
                    stats["cut" if record.startswith("cut at") else "skipped"] += 1
                    stats["last"] = record
                    say(f"example {example_id(item.text)} ({item.text[:40]!r}): {record}; skipped", True)
                elapsed = time.perf_counter() - t0
                bar.update(job, advance=1, rate=f"{stats['written'] / elapsed:.2f} ex/s")
    finally:
        usage.seconds += time.perf_counter() - t0
        writer.flush()  # whole records only: the shard being filled, never half of one
        writer.update(api_usage=usage.as_dict())
    return stats
