"""Extraction: label a corpus with the teacher and store its per-step logits as shards.

    microdistill extract --task reddit-comment --input comments.jsonl --out shards/
    microdistill inspect shards/

Stages: read and filter the corpus; load the teacher; calibrate the kept output vocabulary on
a sample (grammar-only decoding, mean teacher probability per token); decode every input
greedily under the grammar limited to the kept vocabulary, keeping the raw logits at the kept
ids, the full-vocabulary log-sum-exp and the enum decision points; write shards, and one
teacher vector per input token (its middle-layer state in context; a student's starting
point). Re-running the same command continues where it stopped; the kept vocabulary of an
existing folder is reused, never recomputed.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from microdistill.corpus import Item, filter_inputs, read_corpus
from microdistill.store import INPUT_EMBEDDINGS, Record, ShardSet, ShardWriter, StoreError, atomic_write_bytes, example_id
from microdistill.task import EnumField, Task, load_task
from microdistill.teacher import Teacher, load_teacher
from microdistill.vocab import build_input_vocab, coverage, kept_token_strings, required_tokens, select_kept


if TYPE_CHECKING:
    from microdistill.generation import Decoder

# constrain (xgrammar) and generation are imported where used: the CLI imports this module
# for its error class, and should start in a blink.


class ExtractError(ValueError):
    """An extraction argument that cannot be used; the message is one line for the user."""


class RoundTripError(RuntimeError):
    """A stored example would not read back as what the teacher said (a bug, never expected)."""


def _say(progress: bool, message: str) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True, highlight=False).print(message)


def _progress(enabled: bool, what: str, total: int):
    """A rich progress bar with examples/s and ETA (a disabled one when `enabled` is False)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn(f"[bold]{what}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )
    return bar, bar.add_task(what, total=total, rate="")


def _batches(decoder: "Decoder", items: Sequence[Item], size: int) -> Iterator[tuple[list[Item], list[list[int]]]]:
    """Items in batches of neighbours by prompt length, so rows in a batch need little padding."""
    rests = [decoder.rest_ids(it.text) for it in items]
    order = sorted(range(len(items)), key=lambda i: len(rests[i]))
    for k in range(0, len(order), size):
        chunk = order[k : k + size]
        yield [items[i] for i in chunk], [rests[i] for i in chunk]


# ---- calibration ---------------------------------------------------------------------------
@dataclass
class Calibration:
    """What grammar-only decoding of the calibration sample found.

    mass: float64 [V] mean teacher probability of each token over all output steps.
    answers: (item, decoded row with its head inputs, answer text, decisions) of each finished
        answer; those that only use kept tokens become examples without decoding them again.
    """

    mass: np.ndarray
    answers: list[tuple[Item, Any, str, dict[str, np.ndarray]]]


def calibrate(teacher: Teacher, task: Task, items: Sequence[Item], batch_size: int = 16, progress: bool = True,
              hidden_layer: int | None = None) -> Calibration:
    """Decode `items` under the grammar alone, measuring where the teacher's probability goes."""
    from microdistill.constrain import Grammar
    from microdistill.generation import Decoder

    grammar = Grammar(task, teacher.tokenizer, teacher.vocab_size, teacher.eos_id, allowed=None)
    decoder = Decoder(teacher, task, grammar, keep_hidden=True, hidden_layer=hidden_layer)
    mass = torch.zeros(teacher.vocab_size, dtype=torch.float64)
    steps, answers = 0, []
    bar, job = _progress(progress, "calibrating", len(items))
    with bar:
        for chunk, rests in _batches(decoder, items, batch_size):
            batch = decoder.generate(rests, task.output.max_tokens, mass=mass)
            steps += sum(len(r.lse) for r in batch.rows)
            texts = [teacher.tokenizer.decode(r.output_ids[:-1]) if r.finished else None for r in batch.rows]
            decisions = decoder.decisions(batch, texts)
            answers += [(it, r, t, d) for it, r, t, d in zip(chunk, batch.rows, texts, decisions) if t is not None]
            bar.advance(job, len(rests))
    return Calibration((mass / max(steps, 1)).numpy(), answers)


def build_vocab(teacher: Teacher, task: Task, items: Sequence[Item], vocab_size: int, calib: Calibration | None,
                progress: bool) -> dict[str, Any]:
    """The manifest's `vocab` entry: kept output ids (required + highest mass) and input ids."""
    tok = teacher.tokenizer
    required = required_tokens(task, tok, teacher.eos_id)
    mass = calib.mass if calib else np.zeros(teacher.vocab_size)
    kept = select_kept(required, mass, vocab_size)
    input_vocab = build_input_vocab(tok, tok([it.text for it in items], add_special_tokens=False).input_ids)
    cov = coverage(kept, mass)
    if len(required) > vocab_size:
        _say(progress, f"note: the task needs {len(required)} required tokens, more than --vocab-size {vocab_size}; kept all of them")
    _say(progress, f"kept vocabulary: {len(kept)} tokens ({len(required)} required), {cov:.2%} of the teacher's "
                   f"output mass on {len(calib.answers) if calib else 0} calibration answers")
    return {
        "kept": kept,
        "kept_tokens": kept_token_strings(tok, kept),
        "n_required": len(required),
        "eos": int(teacher.eos_id),
        "input": input_vocab,
        "coverage": cov,
        "size": vocab_size,
    }


def reuse_calibration(teacher: Teacher, task: Task, calib: Calibration, wanted: set[str], writer: ShardWriter) -> int:
    """Add the calibration answers that only use kept tokens as examples; returns how many.

    Greedy decoding limited to the kept set takes the same path whenever the unlimited argmax
    is kept, so these answers are exactly what decoding them again would give; their kept
    logits are computed from the stored output-head inputs.
    """
    from microdistill.generation import head_logits

    kept = writer.manifest["vocab"]["kept"]
    kept_set = set(kept)
    usable = [a for a in calib.answers if example_id(a[0].text) in wanted and set(a[1].output_ids) <= kept_set]
    if not usable:
        return 0
    # a head that post-processes its logits (soft-capping, ...) breaks this shortcut: check one row
    probe = usable[0][1]
    full = head_logits(teacher.model, probe.hidden[0][None], range(teacher.vocab_size))
    if abs(float(torch.logsumexp(full, -1)[0]) - probe.lse[0]) > 1e-3:
        return 0
    for item, row, text, decisions in usable:
        row.logits = list(head_logits(teacher.model, torch.stack(row.hidden), kept).half().numpy())
        writer.add(make_record(task, teacher.tokenizer, item, row, text, decisions, kept_set, teacher.eos_id))
    return len(usable)


# ---- records -------------------------------------------------------------------------------
def make_record(task: Task, tokenizer, item: Item, row, text: str, decisions: dict[str, np.ndarray],
                kept: set[int], eos_id: int) -> Record:
    """A checked Record for one decoded row; any broken round trip is a hard failure."""
    input_ids = tokenizer(item.text, add_special_tokens=False).input_ids
    where = f"example {example_id(item.text)} ({item.text[:40]!r})"
    if tokenizer.decode(input_ids) != item.text:
        raise RoundTripError(f"{where}: the input does not decode back to its text")
    if row.output_ids[-1] != eos_id or tokenizer.decode(row.output_ids[:-1]) != text:
        raise RoundTripError(f"{where}: the answer tokens do not decode back to {text!r} + EOS")
    outside = [i for i in row.output_ids if i not in kept]
    if outside:
        raise RoundTripError(f"{where}: answer token(s) {outside} are outside the kept vocabulary")
    fields = task.parse(text)
    if task.serialize(fields) != text:
        raise RoundTripError(f"{where}: the answer {text!r} is not in canonical form")
    return Record(
        text=item.text,
        input_ids=np.asarray(input_ids),
        output_ids=np.asarray(row.output_ids),
        output_text=text,
        fields=fields,
        logits=np.stack(row.logits),
        lse=np.asarray(row.lse, dtype=np.float32),
        decisions=decisions,
        labels=item.labels,
        hidden=row.input_hidden,
    )


def decode_into(writer: ShardWriter, decoder: "Decoder", task: Task, items: Sequence[Item], batch_size: int = 16,
                progress: bool = True) -> dict[str, float]:
    """Decode `items` and add their records to `writer`.

    Returns {written, tokens, cut (answers that hit max_tokens), seconds}.
    """
    tok = decoder.teacher.tokenizer
    kept = set(writer.manifest["vocab"]["kept"])
    eos = decoder.teacher.eos_id
    stats = {"written": 0, "tokens": 0, "cut": 0}
    t0 = time.perf_counter()
    bar, job = _progress(progress, "extracting", len(items))
    with bar:
        for chunk, rests in _batches(decoder, items, batch_size):
            batch = decoder.generate(rests, task.output.max_tokens)
            texts = [tok.decode(r.output_ids[:-1]) if r.finished else None for r in batch.rows]
            decisions = decoder.decisions(batch, texts)
            for item, row, text, dec in zip(chunk, batch.rows, texts, decisions):
                stats["tokens"] += len(row.output_ids)
                if text is None:  # hit max_tokens: an answer cut short is not a valid example
                    stats["cut"] += 1
                    continue
                writer.add(make_record(task, tok, item, row, text, dec, kept, eos))
                stats["written"] += 1
            elapsed = time.perf_counter() - t0
            bar.update(job, advance=len(chunk), rate=f"{stats['written'] / elapsed:.2f} ex/s")
    stats["seconds"] = time.perf_counter() - t0
    return stats


# ---- the stage -----------------------------------------------------------------------------
def _save_tokenizer(tokenizer, out_dir: Path) -> None:
    dest = out_dir / "tokenizer"
    if dest.is_dir():
        return
    tmp = tempfile.mkdtemp(prefix=".tokenizer.", dir=out_dir)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, dest)


def _save_input_embeddings(teacher: Teacher, input_ids: Sequence[int], texts: Sequence[str], out_dir: Path,
                           replace: bool, progress: bool = False) -> None:
    """out_dir/input_embeddings.safetensors: one teacher vector per input-vocabulary id (float16),
    a student's starting point; written atomically, and when the file is already there only if
    `replace` (a new vocabulary: the file may be a leftover).

    A token the corpus uses gets its meaning in context: the teacher's hidden state after its
    middle layer, averaged over the token's occurrences in `texts` (each text read alone). A
    static embedding row knows little more than spelling (a student started from it learned no
    faster than from random rows); the middle layer knows that "crashes" or "peeling" is a
    complaint. Other ids (byte fallbacks, specials) keep their static rows, and the contextual
    rows are rescaled per dimension to the static rows' mean and spread so both mix.
    """
    from safetensors.torch import save

    dest = out_dir / INPUT_EMBEDDINGS
    if dest.is_file() and not replace:
        return
    ids = [int(i) for i in input_ids]
    weight = teacher.model.get_input_embeddings().weight
    with torch.no_grad():
        rows = weight[torch.as_tensor(ids, dtype=torch.long, device=weight.device)].double().cpu()
    row_of = {t: k for k, t in enumerate(ids)}
    total = torch.zeros_like(rows)
    count = torch.zeros(len(ids), dtype=torch.float64)
    layer = hidden_layer_of(teacher, "middle")
    seqs = sorted((s for s in teacher.tokenizer(list(texts), add_special_tokens=False).input_ids if s), key=len)
    bar, job = _progress(progress, "reading inputs in context", len(seqs))
    with bar, torch.inference_mode():
        for k in range(0, len(seqs), 32):
            chunk = seqs[k:k + 32]
            width = max(len(q) for q in chunk)
            batch = torch.full((len(chunk), width), teacher.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, q in enumerate(chunk):  # right padding: causal attention keeps real tokens exact
                batch[b, :len(q)], mask[b, :len(q)] = torch.tensor(q), 1
            states = _states_after(teacher.model, layer, input_ids=batch, attention_mask=mask)
            for b, q in enumerate(chunk):
                at = torch.tensor([row_of[t] for t in q])
                total.index_add_(0, at, states[b, :len(q)].double().cpu())
                count.index_add_(0, at, torch.ones(len(q), dtype=torch.float64))
            bar.advance(job, len(chunk))
    seen = count > 0
    if seen.sum() > 1:
        ctx = total[seen] / count[seen, None]
        ctx = (ctx - ctx.mean(0)) / ctx.std(0).clamp_min(1e-6)
        rows[seen] = ctx * rows[seen].std(0) + rows[seen].mean(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest, save({"rows": rows.half().contiguous()}))


class _Stop(Exception):
    def __init__(self, states: torch.Tensor):
        self.states = states


def _states_after(model, layer: int, **inputs) -> torch.Tensor:
    """The hidden states after decoder layer `layer` (1-based; as `hidden_states[layer]`), without
    running the layers above it: half the compute for the middle layer."""
    n = int(model.config.get_text_config().num_hidden_layers)
    blocks = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n), None)
    if blocks is None or not 1 <= layer < n:  # no layer list to stop at: run the whole model
        return model(**inputs, output_hidden_states=True).hidden_states[layer]

    def stop(module, args, out):
        raise _Stop(out[0] if isinstance(out, tuple) else out)

    hook = blocks[layer - 1].register_forward_hook(stop)
    try:
        model(**inputs)
    except _Stop as s:
        return s.states
    finally:
        hook.remove()
    raise RuntimeError(f"layer {layer} of the teacher never ran")


def _hidden_layer_spec(spec: int | str | None) -> int | str | None:
    """A --hidden-layer as given, checked before the teacher loads: None ("none"), "middle",
    "last" or a layer number (its range needs the teacher: hidden_layer_of)."""
    if spec is None or spec == "none":
        return None
    if spec in ("middle", "last"):
        return spec
    try:
        return int(spec)
    except (TypeError, ValueError):
        raise ExtractError(f"--hidden-layer {spec!r}: expected middle, last, none or a layer from 0 to the "
                           "teacher's number of layers") from None


def hidden_layer_of(teacher: Teacher, spec: int | str | None) -> int | None:
    """The teacher layer to store input hidden states from: "middle", "last", a number from 0
    (the embeddings) to the number of layers, or None / "none" for no hidden states."""
    given = _hidden_layer_spec(spec)
    if given is None:
        return None
    n = int(teacher.model.config.get_text_config().num_hidden_layers)
    layer = {"middle": n // 2, "last": n}.get(given, given)
    if not 0 <= layer <= n:
        raise ExtractError(f"--hidden-layer {spec!r}: expected middle, last, none or a layer from 0 to {n} "
                           f"(teacher {teacher.name} has {n} layers)")
    return layer


def _check_args(limit: int | None, batch_size: int, vocab_size: int, calibration: int) -> None:
    if limit is not None and limit < 1:
        raise ExtractError(f"--limit must be at least 1 (got {limit})")
    if batch_size < 1:
        raise ExtractError(f"--batch-size must be at least 1 (got {batch_size})")
    if vocab_size < 2:
        raise ExtractError(f"--vocab-size must be at least 2 (got {vocab_size})")
    if calibration < 0:
        raise ExtractError(f"--calibration must not be negative (got {calibration})")


def extract(
    task: Task | str | Path,
    input_path: str | Path,
    teacher_spec: Teacher | str | Path,
    out_dir: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    vocab_size: int = 512,
    calibration: int = 64,
    field: str = "text",
    labels: dict[str, str] | None = None,
    hidden_layer: int | str | None = "last",
    progress: bool = True,
) -> Path:
    """Label the corpus at `input_path` with the teacher and write shards to `out_dir`.

    Args:
        limit: extract only the first `limit` inputs that pass the filters (a later run
            with a larger limit, or none, continues).
        calibration: inputs decoded to choose the auxiliary kept tokens (first run only).
        labels: task field -> corpus column of human labels, stored with each example.
        hidden_layer: store each input's averaged hidden state from this teacher layer
            (see hidden_layer_of; a folder keeps the choice it was created with).
    Returns `out_dir`.
    """
    from microdistill.constrain import Grammar
    from microdistill.generation import Decoder

    _check_args(limit, batch_size, vocab_size, calibration)
    _hidden_layer_spec(hidden_layer)  # a typo fails before the teacher loads
    t_start = time.perf_counter()
    task = task if isinstance(task, Task) else load_task(task)
    out_dir = Path(out_dir)
    raw_items = read_corpus(input_path, field=field, labels=labels)
    teacher = teacher_spec if isinstance(teacher_spec, Teacher) else load_teacher(teacher_spec)
    items, report = filter_inputs(raw_items, task, teacher.tokenizer, source=str(input_path))
    _say(progress, f"{input_path}: {report.summary()}")
    writer, calib = _open_folder(out_dir, task, teacher, items, vocab_size, calibration, batch_size,
                                 hidden_layer_of(teacher, hidden_layer), progress)
    layer = writer.manifest.get("hidden_layer")
    _save_tokenizer(teacher.tokenizer, out_dir)
    wanted = items[:limit]
    if calib is not None:
        reused = reuse_calibration(teacher, task, calib, {example_id(it.text) for it in wanted}, writer)
        _say(progress, f"{reused} calibration answers used only kept tokens: stored without decoding again")
    todo = [it for it in wanted if example_id(it.text) not in writer.done_ids]
    timings = dict(writer.manifest.get("timings", {}))
    filters = {**report.as_dict(), "corpus": str(input_path)}
    if todo:
        kept = writer.manifest["vocab"]["kept"]
        grammar = Grammar(task, teacher.tokenizer, teacher.vocab_size, teacher.eos_id, allowed=kept)
        decoder = Decoder(teacher, task, grammar, keep_ids=kept, hidden_layer=layer)
        stats = decode_into(writer, decoder, task, todo, batch_size, progress)
        seconds = max(stats["seconds"], 1e-9)
        timings.update(extract_s=round(time.perf_counter() - t_start, 3),
                       examples_per_s=round(stats["written"] / seconds, 4),
                       tokens_per_s=round(stats["tokens"] / seconds, 2))
        filters["cut_at_max_tokens"] = int(stats["cut"])
        _say(progress, f"{stats['written']} new examples ({stats['cut']} cut at {task.output.max_tokens} tokens), "
                       f"{timings['examples_per_s']:.2f} examples/s")
    writer.close(timings=timings, filters=filters)
    _say(progress, f"{out_dir}: {writer.n_done} examples")
    return out_dir


def _open_folder(out_dir: Path, task: Task, teacher: Teacher, items: Sequence[Item], vocab_size: int, calibration: int,
                 batch_size: int, hidden_layer: int | None, progress: bool) -> tuple[ShardWriter, Calibration | None]:
    """A writer on `out_dir`; a new folder gets its vocabulary from a calibration run first.

    An existing folder keeps its vocabulary and hidden layer (resuming never changes what its
    examples hold) and must have been made with the same task, teacher and vocabulary size.
    """
    header: dict[str, Any] = {"task": task.model_dump(mode="json"), "task_fingerprint": task.fingerprint(),
                              "teacher": teacher.describe(), "signal": "logits", "input_embeddings": INPUT_EMBEDDINGS}
    existing = ShardSet(out_dir).manifest if (out_dir / "manifest.json").exists() else None
    if existing:
        for key in ("task_fingerprint", "teacher", "signal"):  # fail before calibrating, not after
            if existing.get(key) != header[key]:
                raise StoreError(f"{out_dir} holds shards made with a different {key.replace('_', ' ')}; "
                                 "use another --out folder or delete this one")
    if existing and "vocab" in existing:
        if existing["vocab"].get("size") != vocab_size:
            raise StoreError(f"{out_dir} holds shards made with --vocab-size {existing['vocab'].get('size')}; "
                             "use another --out folder or delete this one")
        _save_input_embeddings(teacher, existing["vocab"]["input"], [it.text for it in items], out_dir,
                               replace=False, progress=progress)  # if missing
        kept = {k: existing[k] for k in ("vocab", "hidden_layer") if k in existing}
        return ShardWriter(out_dir, {**header, **kept}), None
    if hidden_layer is not None:
        header["hidden_layer"] = hidden_layer
    t0 = time.perf_counter()
    calib = calibrate(teacher, task, items[:calibration], batch_size, progress, hidden_layer) if calibration else None
    header["vocab"] = build_vocab(teacher, task, items, vocab_size, calib, progress)
    _save_input_embeddings(teacher, header["vocab"]["input"], [it.text for it in items], out_dir, replace=True,
                           progress=progress)
    writer = ShardWriter(out_dir, header)
    writer.update(timings={"calibrate_s": round(time.perf_counter() - t0, 3)})
    return writer, calib


# ---- inspection ----------------------------------------------------------------------------
def inspect(path: str | Path) -> dict[str, Any]:
    """Summary of a shard folder, after checking every shard against its manifest checksum."""
    shards = ShardSet(Path(path), verify=True)
    m = shards.manifest
    for key in ("task", "teacher", "vocab"):
        if key not in m:
            raise StoreError(f"{shards.dir / 'manifest.json'}: no {key!r} entry (not written by microdistill extract)")
    task = shards.task()
    records = list(shards.records())
    per_field: dict[str, Counter] = {f.name: Counter() for f in task.output.fields if isinstance(f, EnumField)}
    agree: Counter = Counter()
    for r in records:
        for name, counts in per_field.items():
            counts[r.fields[name]] += 1
        for name, value in (r.labels or {}).items():
            if name in r.fields:
                agree[name, str(r.fields[name]) == value] += 1
    n = len(records)
    total_bytes = sum(s["bytes"] for s in m["shards"])
    return {
        "path": str(shards.dir),
        "task": task.name,
        "teacher": m["teacher"],
        "complete": bool(m.get("complete")),
        "counts": {"examples": n, "train": sum(r.split == "train" for r in records),
                   "val": sum(r.split == "val" for r in records), "shards": len(m["shards"])},
        "labels": {name: dict(c.most_common()) for name, c in per_field.items()},
        "human_agreement": {name: agree[name, True] / (agree[name, True] + agree[name, False])
                            for name in sorted({k for k, _ in agree})},
        "vocab": {"kept": len(m["vocab"]["kept"]), "required": m["vocab"]["n_required"],
                  "input": len(m["vocab"]["input"]), "coverage": m["vocab"]["coverage"]},
        "output_tokens_mean": float(np.mean([len(r.output_ids) for r in records])) if n else 0.0,
        "bytes_per_example": total_bytes / n if n else 0.0,
        "bytes": total_bytes,
        "timings": m.get("timings", {}),
        "filters": m.get("filters", {}),
    }
