"""Extraction through an OpenAI-compatible server (teachers/api.py): many calls in flight, the same shards.

    microdistill extract --teacher openai:MODEL --teacher-url URL --concurrency 8 --input corpus.jsonl --out shards/

extract.extract() hands an `openai:` teacher here. The first call goes alone (it learns what
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
shards are written atomically as in extract.py (a crash loses at most the unflushed shard).
The manifest's `api_usage` sums the calls, tokens, retries and seconds of every run, which the
cost verb reads as the teacher's tokens per call.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from itertools import chain, islice
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from microdistill.extract.prepare import Calibration, build_vocab
from microdistill.core.console import progress as progress_bar
from microdistill.core.console import say
from microdistill.data.corpus import Item, example_id, filter_inputs, read_corpus
from microdistill.core.files import atomic_dir
from microdistill.teachers.decoding import value_starts
from microdistill.data.shards import Record, ShardSet, ShardWriter, StoreError, read_manifest
from microdistill.core.task import Task, load_task
from microdistill.teachers import TeacherError
from microdistill.teachers.served import TOP_K, Answer, ApiTeacher, Usage, floor_logprob, load_api_teacher

MISSING = -1e4  # the stored logit of a kept id outside a step's top-k: exp() of it is 0 in float32


def in_flight(teacher: ApiTeacher, task: Task, items: Iterable[Item], concurrency: int) -> Iterator[tuple[Item, Answer]]:
    """(item, answer) as answers arrive, with at most `concurrency` calls in flight (and as many
    queued), so a million-input corpus never becomes a million pending futures."""
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="teacher")
    pending: dict[Any, Item] = {}
    it = iter(items)
    try:
        while True:
            for item in islice(it, 2 * concurrency - len(pending)):
                pending[pool.submit(teacher.ask, task, item.text)] = item
            if not pending:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                yield pending.pop(f), f.result()
    finally:  # an error (or a consumer that stops): drop the queued calls, let the running ones end
        pool.shutdown(wait=True, cancel_futures=True)


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


def api_record(task: Task, teacher: ApiTeacher, item: Item, answer: Answer, kept: dict[int, int], eos: int,
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


def api_vocab(teacher: ApiTeacher, task: Task, items: list[Item], answers: list[tuple[Item, Answer]], size: int,
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


def _header(task: Task, teacher: ApiTeacher) -> dict[str, Any]:
    return {"task": task.model_dump(mode="json"), "task_fingerprint": task.fingerprint(), "teacher": teacher.describe()}


def _existing(out_dir: Path, header: dict[str, Any]) -> dict[str, Any] | None:
    if not (out_dir / "manifest.json").exists():
        return None
    manifest = read_manifest(out_dir)
    for key in ("task_fingerprint", "teacher"):
        if manifest.get(key) != header[key]:
            raise StoreError(f"{out_dir} holds shards made with a different {key.replace('_', ' ')}; "
                             "use another --out folder or delete this one")
    return manifest


def extract_api(input_path: str | Path, out_dir: str | Path, cfg: Any, task: Task | None = None,
                progress: bool = True) -> Path:
    """Label the corpus at `input_path` through the API teacher `cfg.teacher` and write shards to
    `out_dir` (`cfg` is an extract.ExtractConfig). Returns `out_dir`."""
    t_start = time.perf_counter()
    task = task or load_task(cfg.task)
    out_dir = Path(out_dir)
    raw = read_corpus(input_path, field=cfg.field, labels=cfg.labels)
    teacher = load_api_teacher(cfg.teacher, cfg.teacher_url, cfg.teacher_tokenizer, progress)
    items, report = filter_inputs(raw, task, teacher.tokenizer, source=str(input_path))
    say(f"{input_path}: {report.summary()}", progress)
    header = _header(task, teacher)
    existing = _existing(out_dir, header)
    done = ShardSet.ids_in(out_dir, existing) if existing else set()
    # one call per input: the corpus may repeat a text when the task does not de-duplicate
    todo = list({example_id(it.text): it for it in items[:cfg.limit] if example_id(it.text) not in done}.values())
    usage = Usage.from_dict(existing.get("api_usage") if existing else None)
    if not todo:
        if existing:
            ShardWriter(out_dir, {**header, **{k: existing[k] for k in ("signal", "vocab")}}).close()
        say(f"{out_dir}: nothing to label ({len(done)} examples already there)", progress)
        return out_dir
    first = (todo[0], teacher.probe(task, todo[0].text))
    if existing and existing.get("signal") != teacher.signal:
        raise StoreError(f"{out_dir} holds {existing.get('signal')} shards but this server now gives "
                         f"{teacher.signal} ones ({'; '.join(teacher.notes)}); use another --out folder")
    header.update(signal=teacher.signal, api={"url": teacher.url, "top_logprobs": TOP_K if teacher.logprobs else 0,
                                              "json_schema": teacher.structured, "notes": teacher.notes})
    stream = chain([first], in_flight(teacher, task, todo[1:], cfg.concurrency))
    t0 = time.perf_counter()
    if existing and "vocab" in existing:
        header["vocab"] = existing["vocab"]
    else:
        calib = list(islice(stream, max(cfg.calibration, 1)))
        header["vocab"] = api_vocab(teacher, task, items, calib, cfg.vocab_size, progress)
        stream = chain(calib, stream)
    writer = ShardWriter(out_dir, header)
    if not (out_dir / "tokenizer").is_dir():
        with atomic_dir(out_dir / "tokenizer") as tmp:
            teacher.tokenizer.save_pretrained(str(tmp))
    stats = _label(writer, stream, task, teacher, usage, len(todo), progress, t0)
    if writer.n_done == 0 and stats["skipped"]:
        raise TeacherError(f"teacher {teacher.source} at {teacher.url}: no answer could be stored; the last: {stats['last']}")
    seconds = max(time.perf_counter() - t0, 1e-9)
    timings = {**writer.manifest.get("timings", {}), "extract_s": round(time.perf_counter() - t_start, 3),
               "examples_per_s": round(stats["written"] / seconds, 4),
               "tokens_per_s": round(stats["tokens"] / seconds, 2), "concurrency": cfg.concurrency}
    filters = {**report.as_dict(), "corpus": str(input_path), "cut_at_max_tokens": stats["cut"], "skipped": stats["skipped"]}
    writer.close(timings=timings, filters=filters, api_usage=usage.as_dict())
    say(f"{stats['written']} new examples ({stats['cut']} cut at {task.output.max_tokens} tokens, {stats['skipped']} "
        f"skipped), {timings['examples_per_s']:.2f} examples/s, {usage.retries} retried calls in all", progress)
    say(f"{out_dir}: {writer.n_done} examples", progress)
    return out_dir


def _label(writer: ShardWriter, stream: Iterator[tuple[Item, Answer]], task: Task, teacher: ApiTeacher, usage: Usage,
           total: int, progress: bool, t0: float) -> dict[str, Any]:
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
