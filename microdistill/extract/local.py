"""Extraction: label a corpus with the teacher and store its per-step logits as shards.

    microdistill extract --task reddit-comment --input comments.jsonl --out shards/
    microdistill extract ... --out shards/ --part 1/4      # one of 4 workers (parts.py)
    microdistill extract ... --teacher openai:MODEL --teacher-url URL   # a served teacher (extract_api.py)
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

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from microdistill.core.options import Options
from microdistill.core.console import progress as progress_bar
from microdistill.core.console import say
from microdistill.extract.prepare import Calibration, batches, build_vocab, calibrate, choose_dtype
from microdistill.data.corpus import Item, example_id, filter_inputs, read_corpus
from microdistill.core.errors import UserError
from microdistill.core.files import atomic_dir, atomic_write_bytes
from microdistill.extract.parts import WAIT_S, Part, check_root, open_part, root_fields, wait_for_root
from microdistill.data.shards import INPUT_EMBEDDINGS, Record, ShardSet, ShardWriter, StoreError
from microdistill.core.task import Task, load_task
from microdistill.teachers import DEFAULT_TEACHER, TeacherError, load_teacher
from microdistill.teachers.served import is_api_spec
from microdistill.teachers.hf import HFTeacher, hidden_layer_of, hidden_layer_spec, states_after


if TYPE_CHECKING:
    from microdistill.teachers.decoding import Decoder

# constrain (xgrammar) and generation are imported where used: importing this module for its
# options should stay cheap.


class ExtractError(UserError):
    """An extraction argument that cannot be used; the message is one line for the user."""


class RoundTripError(RuntimeError):
    """A stored example would not read back as what the teacher said (a bug, never expected)."""


def reuse_calibration(teacher: HFTeacher, task: Task, calib: Calibration, wanted: set[str], writer: ShardWriter) -> int:
    """Add the calibration answers that only use kept tokens as examples; returns how many.

    Greedy decoding limited to the kept set takes the same path whenever the unlimited argmax
    is kept, so these answers are exactly what decoding them again would give; their kept
    logits are computed from the stored output-head inputs.
    """
    from microdistill.teachers.decoding import head_logits

    if teacher.dtype != "float32":  # calibration decoded in float32; the folder is labelled in another dtype
        return 0
    kept = writer.manifest["vocab"]["kept"]
    kept_set = set(kept)
    usable = [a for a in calib.answers if example_id(a[0].text) in wanted and set(a[1].output_ids) <= kept_set]
    if not usable:
        return 0
    # a head that post-processes its logits (soft-capping, ...) breaks this shortcut: check one row
    probe = usable[0][1]
    full = head_logits(teacher.model, probe.hidden[0][None].to(teacher.model.device), range(teacher.vocab_size))
    if abs(float(torch.logsumexp(full, -1)[0]) - probe.lse[0]) > 1e-3:
        return 0
    for item, row, text, decisions in usable:
        hidden = torch.stack(row.hidden).to(teacher.model.device)
        row.logits = list(head_logits(teacher.model, hidden, kept).half().cpu().numpy())
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
    bar, job = progress_bar(progress, "extracting", len(items))
    with bar:
        for chunk, rests in batches(decoder, items, batch_size):
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
    with atomic_dir(dest) as tmp:
        tokenizer.save_pretrained(str(tmp))


def _save_input_embeddings(teacher: HFTeacher, input_ids: Sequence[int], texts: Sequence[str], out_dir: Path,
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
    bar, job = progress_bar(progress, "reading inputs in context", len(seqs))
    with bar, torch.inference_mode():
        for k in range(0, len(seqs), 32):
            chunk = seqs[k:k + 32]
            width = max(len(q) for q in chunk)
            batch = torch.full((len(chunk), width), teacher.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, q in enumerate(chunk):  # right padding: causal attention keeps real tokens exact
                batch[b, :len(q)], mask[b, :len(q)] = torch.tensor(q), 1
            states = states_after(teacher.model, layer, input_ids=batch.to(weight.device), attention_mask=mask.to(weight.device))
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


@dataclass(frozen=True)
class ExtractConfig(Options):
    """What an extraction asks of which teacher; recorded in the run that made the shards."""

    task: str = "reddit-comment"  # a preset name or a task YAML file
    teacher: str = DEFAULT_TEACHER  # a preset, a Hugging Face model folder, a .gguf file or openai:MODEL
    field: str = "text"  # the corpus' text field or column
    labels: dict[str, str] | None = None  # task field -> corpus column of human labels
    limit: int | None = None  # only the first N inputs that pass the filters (a later run continues)
    batch_size: int = 16  # inputs the teacher decodes together
    vocab_size: int = 512  # size of the kept output vocabulary
    calibration: int = 64  # inputs decoded to choose the kept vocabulary (first run only)
    # the teacher layer whose hidden state of each input is stored (first run only): last,
    # middle, a layer number, or none
    hidden_layer: str | int | None = "last"
    # the teacher's dtype (first run only): float32, bfloat16, or auto (bfloat16 where the CPU runs
    # it natively and it answers the calibration inputs as float32 does; see choose_dtype)
    dtype: str = "float32"
    teacher_url: str | None = None  # the OpenAI base URL of an `openai:MODEL` teacher (extract_api.py)
    teacher_tokenizer: str | None = None  # the API model's tokenizer: a preset, model folder or .gguf
    concurrency: int = 8  # calls in flight to an API teacher

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ExtractError(f"--limit must be at least 1 (got {self.limit})")
        if self.batch_size < 1:
            raise ExtractError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.vocab_size < 2:
            raise ExtractError(f"--vocab-size must be at least 2 (got {self.vocab_size})")
        if self.calibration < 0:
            raise ExtractError(f"--calibration must not be negative (got {self.calibration})")
        if self.concurrency < 1:
            raise ExtractError(f"--concurrency must be at least 1 (got {self.concurrency})")
        if (self.teacher_url is not None or self.teacher_tokenizer is not None) and not is_api_spec(self.teacher):
            raise ExtractError(f"--teacher-url and --teacher-tokenizer are for an API teacher (openai:MODEL), not {self.teacher!r}")
        if self.dtype not in ("float32", "bfloat16", "auto"):
            raise ExtractError(f"--dtype {self.dtype!r}: choose float32, bfloat16 or auto")
        try:
            hidden_layer_spec(self.hidden_layer)  # a typo fails before the teacher loads
        except TeacherError as e:
            raise ExtractError(str(e)) from None


def extract(input_path: str | Path, out_dir: str | Path, config: ExtractConfig | None = None, *,
            task: Task | None = None, teacher: HFTeacher | None = None, progress: bool = True,
            part: Part | None = None, wait_s: float = WAIT_S) -> Path:
    """Label the corpus at `input_path` with the teacher and write shards to `out_dir`.

    `task` and `teacher`, when given, are used instead of loading `config.task` / `config.teacher`
    (a caller that already holds them). With `part`, this process is one worker of several
    (parts.py): worker 0 calibrates, the others wait for it up to `wait_s` seconds, and each
    labels only its own inputs. Returns `out_dir`.
    """
    from microdistill.core.grammar import Grammar
    from microdistill.teachers.decoding import Decoder

    cfg = config or ExtractConfig()
    if is_api_spec(cfg.teacher):
        if part is not None:
            raise ExtractError("--part splits a local teacher's work; an API teacher scales with --concurrency")
        from microdistill.extract.served import extract_api

        return extract_api(input_path, out_dir, cfg, task=task, progress=progress)
    t_start = time.perf_counter()
    task = task or load_task(cfg.task)
    out_dir = Path(out_dir)
    raw_items = read_corpus(input_path, field=cfg.field, labels=cfg.labels)
    teacher = teacher or load_teacher(cfg.teacher)
    items, report = filter_inputs(raw_items, task, teacher.tokenizer, source=str(input_path))
    say(f"{input_path}: {report.summary()}", progress)
    try:
        layer = hidden_layer_of(teacher, cfg.hidden_layer)
    except TeacherError as e:  # a layer the teacher does not have: an extraction option
        raise ExtractError(str(e)) from None
    check_root(out_dir, part)  # a folder that does not fit this worker fails before any work
    if part is not None and part.index:
        wait_for_root(out_dir, part, wait_s, progress)
    writer, calib = _open_folder(out_dir, task, teacher, items, cfg, layer, progress,
                                 root_fields(part) if part is not None else {})
    layer = writer.manifest.get("hidden_layer")
    _save_tokenizer(teacher.tokenizer, out_dir)
    wanted = items[:cfg.limit]
    if calib is not None:
        reused = reuse_calibration(teacher, task, calib, {example_id(it.text) for it in wanted}, writer)
        say(f"{reused} calibration answers used only kept tokens: stored without decoding again", progress)
    filters = {**report.as_dict(), "corpus": str(input_path)}
    if part is not None:  # the root holds the calibration answers; this worker labels its own inputs beside them
        if not writer.manifest["complete"]:
            writer.close(filters=filters)
        done = writer.done_ids
        writer = open_part(out_dir, writer.manifest, part)
        wanted = [it for it in wanted if part.owns(example_id(it.text)) and example_id(it.text) not in done]
    todo = [it for it in wanted if example_id(it.text) not in writer.done_ids]
    timings = dict(writer.manifest.get("timings", {}))
    if todo:
        kept = writer.manifest["vocab"]["kept"]
        grammar = Grammar(task, teacher.tokenizer, teacher.vocab_size, teacher.eos_id, allowed=kept)
        decoder = Decoder(teacher, task, grammar, keep_ids=kept, hidden_layer=layer)
        stats = decode_into(writer, decoder, task, todo, cfg.batch_size, progress)
        seconds = max(stats["seconds"], 1e-9)
        timings.update(extract_s=round(time.perf_counter() - t_start, 3),
                       examples_per_s=round(stats["written"] / seconds, 4),
                       tokens_per_s=round(stats["tokens"] / seconds, 2))
        filters["cut_at_max_tokens"] = int(stats["cut"])
        say(f"{stats['written']} new examples ({stats['cut']} cut at {task.output.max_tokens} tokens), "
            f"{timings['examples_per_s']:.2f} examples/s", progress)
    writer.close(timings=timings, filters=filters)
    say(f"{out_dir}: {writer.n_done} examples", progress)
    return out_dir


def _open_folder(out_dir: Path, task: Task, teacher: HFTeacher, items: Sequence[Item], cfg: ExtractConfig,
                 hidden_layer: int | None, progress: bool, new_fields: dict[str, Any]) -> tuple[ShardWriter, Calibration | None]:
    """A writer on `out_dir`; a new folder gets its vocabulary from a calibration run first, and
    `new_fields` in its manifest.

    An existing folder keeps its vocabulary and hidden layer (resuming never changes what its
    examples hold) and must have been made with the same task, teacher and vocabulary size.
    """
    existing = ShardSet(out_dir).manifest if (out_dir / "manifest.json").exists() else None
    dtype = (existing.get("teacher") or {}).get("dtype", "float32") if existing else "float32"
    header: dict[str, Any] = {"task": task.model_dump(mode="json"), "task_fingerprint": task.fingerprint(),
                              "teacher": {**teacher.describe(), **({"dtype": dtype} if dtype != "float32" else {})},
                              "signal": "logits", "input_embeddings": INPUT_EMBEDDINGS}
    if existing:
        for key in ("task_fingerprint", "teacher", "signal"):  # fail before calibrating, not after
            if existing.get(key) != header[key]:
                raise StoreError(f"{out_dir} holds shards made with a different {key.replace('_', ' ')}; "
                                 "use another --out folder or delete this one")
    if existing and "vocab" in existing:
        if existing["vocab"].get("size") != cfg.vocab_size:
            raise StoreError(f"{out_dir} holds shards made with --vocab-size {existing['vocab'].get('size')}; "
                             "use another --out folder or delete this one")
        _save_input_embeddings(teacher, existing["vocab"]["input"], [it.text for it in items], out_dir,
                               replace=False, progress=progress)  # if missing
        teacher.to_dtype(dtype)  # the rest is labelled as the folder's first examples were
        kept = {k: existing[k] for k in ("vocab", "hidden_layer", "dtype_check", "parts", "calibration_id") if k in existing}
        return ShardWriter(out_dir, {**header, **kept}), None
    header.update(new_fields)
    if hidden_layer is not None:
        header["hidden_layer"] = hidden_layer
    t0 = time.perf_counter()
    calib = calibrate(teacher, task, items[:cfg.calibration], cfg.batch_size, progress, hidden_layer) if cfg.calibration else None
    header["vocab"] = build_vocab(teacher, task, items, cfg.vocab_size, calib, progress)
    _save_input_embeddings(teacher, header["vocab"]["input"], [it.text for it in items], out_dir, replace=True,
                           progress=progress)
    header["dtype_check"] = choose_dtype(teacher, task, cfg.dtype, cfg.batch_size, calib, progress)
    header["teacher"] = teacher.describe()
    writer = ShardWriter(out_dir, header)
    writer.update(timings={"calibrate_s": round(time.perf_counter() - t0, 3)})
    return writer, calib
