"""Extraction with a local teacher (a white box): decoding every input under the grammar, keeping
the raw logits at the kept ids, the full-vocabulary log-sum-exp and the enum decision points.

A new folder is prepared first (prepare.py: the kept vocabulary from a calibration sample, the
dtype check; embeddings.py: the input embeddings, when asked); an existing one keeps its vocabulary and
hidden layer, and the rest is labelled as its first examples were. The calibration answers that
used only kept tokens are stored without decoding them again. With `--part I/N` this process is
one worker of several (parts.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, AbstractSet, Any, Sequence

import numpy as np
import torch

from microdistill.core.console import progress as progress_bar
from microdistill.core.console import say
from microdistill.core.task import Task
from microdistill.data.corpus import Item, example_id
from microdistill.data.shards import INPUT_EMBEDDINGS, Record, ShardWriter, StoreError
from microdistill.extract import folder
from microdistill.extract.config import ExtractConfig, ExtractError
from microdistill.extract.embeddings import save_input_embeddings
from microdistill.extract.parts import Part, check_root, open_part, root_fields, wait_for_root
from microdistill.extract.prepare import Calibration, batches, build_vocab, calibrate, choose_dtype
from microdistill.teachers import TeacherError
from microdistill.teachers.hf import HFTeacher, hidden_layer_of

if TYPE_CHECKING:
    from microdistill.teachers.decoding import Decoder


class RoundTripError(RuntimeError):
    """A stored example would not read back as what the teacher said (a bug, never expected)."""


class LocalLabelling:
    """One extraction run with a local teacher (see extract.extract for the steps around it)."""

    parts = True  # its work splits across --part workers

    def __init__(self, teacher: HFTeacher, task: Task, cfg: ExtractConfig, out_dir: Path, progress: bool,
                 drafter_for=None):
        self.teacher, self.task, self.cfg, self.out_dir, self.progress = teacher, task, cfg, out_dir, progress
        self.writer: ShardWriter | None = None
        self.timings: dict[str, Any] = {}  # extra timings this way records
        self.closing: dict[str, Any] = {}  # extra manifest entries at the end
        # a student that cannot draft is refused before the folder is touched
        self.drafter = drafter_for(teacher, task) if drafter_for is not None else None

    def open(self, items: list[Item], filters: dict[str, Any], part: Part | None, wait_s: float) -> list[Item]:
        """Open (or prepare) the folder; returns the inputs still to label."""
        try:
            layer = hidden_layer_of(self.teacher, self.cfg.hidden_layer)
        except TeacherError as e:  # a layer the teacher does not have: an extraction option
            raise ExtractError(str(e)) from None
        check_root(self.out_dir, part)  # a folder that does not fit this worker fails before any work
        if part is not None and part.index:
            wait_for_root(self.out_dir, part, wait_s, self.progress)
        writer, calib = open_folder(self.out_dir, self.task, self.teacher, items, self.cfg, layer, self.progress,
                                    root_fields(part) if part is not None else {})
        folder.save_tokenizer(self.teacher.tokenizer, self.out_dir)
        wanted = items[:self.cfg.limit]
        if calib is not None:
            reused = reuse_calibration(self.teacher, self.task, calib, {example_id(it.text) for it in wanted}, writer)
            say(f"{reused} calibration answers used only kept tokens: stored without decoding again", self.progress)
        if part is not None:  # the root holds the calibration answers; this worker labels its own inputs beside them
            if not writer.manifest["complete"]:
                writer.close(filters=filters)
            done = writer.done_ids
            writer = open_part(self.out_dir, writer.manifest, part)
            wanted = [it for it in wanted if part.owns(example_id(it.text)) and example_id(it.text) not in done]
        self.writer = writer
        return [it for it in wanted if example_id(it.text) not in writer.done_ids]

    def label(self, todo: list[Item]) -> dict[str, Any]:
        """Decode `todo` into the folder: {written, tokens, cut, seconds}."""
        from microdistill.core.grammar import Grammar
        from microdistill.teachers.decoding import Decoder

        kept = self.writer.manifest["vocab"]["kept"]
        t = self.teacher
        grammar = Grammar(self.task, t.tokenizer, t.vocab_size, t.eos_id, allowed=kept)
        drafter = self.drafter
        decoder = Decoder(t, self.task, grammar, keep_ids=kept, hidden_layer=self.writer.manifest.get("hidden_layer"),
                          drafter=drafter)
        stats = decode_into(self.writer, decoder, self.task, todo, self.cfg.batch_size, self.progress)
        self.timings["teacher_passes"] = decoder.passes
        if drafter is not None:
            # answer tokens per teacher pass: 1 without any draft, more the more drafted tokens it kept
            self.closing["draft"] = {**drafter.report(), "teacher_passes": decoder.passes, "answer_tokens": stats["tokens"]}
        return stats

    def summary(self, stats: dict[str, Any], timings: dict[str, Any]) -> str:
        return (f"{stats['written']} new examples ({stats['cut']} cut at {self.task.output.max_tokens} tokens), "
                f"{timings['examples_per_s']:.2f} examples/s")


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
    # on disk at once: a run killed before its first batch would otherwise decode these again, in
    # batches of other inputs, and every later batch would then hold other inputs than a run never killed
    writer.journal()
    return len(usable)



def make_record(task: Task, tokenizer, item: Item, row, text: str, decisions: dict[str, np.ndarray],
                kept: AbstractSet[int], eos_id: int) -> Record:
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


def decode_batch(decoder: "Decoder", task: Task, rests: Sequence, texts: Sequence[str]) -> list[tuple]:
    """One batch through the teacher: [(row, its answer's text or None where max_tokens cut it,
    its decision points)], row by row."""
    batch = decoder.generate(rests, task.output.max_tokens, texts=texts)
    tok = decoder.teacher.tokenizer
    answers = [tok.decode(r.output_ids[:-1]) if r.finished else None for r in batch.rows]
    return list(zip(batch.rows, answers, decoder.decisions(batch, answers)))


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
            for item, (row, text, dec) in zip(chunk, decode_batch(decoder, task, rests, [it.text for it in chunk])):
                stats["tokens"] += len(row.output_ids)
                if text is None:  # hit max_tokens: an answer cut short is not a valid example
                    stats["cut"] += 1
                    continue
                writer.add(make_record(task, tok, item, row, text, dec, kept, eos))
                stats["written"] += 1
            writer.journal()
            elapsed = time.perf_counter() - t0
            bar.update(job, advance=len(chunk), rate=f"{stats['written'] / elapsed:.2f} ex/s")
    stats["seconds"] = time.perf_counter() - t0
    return stats


def open_folder(out_dir: Path, task: Task, teacher: HFTeacher, items: Sequence[Item], cfg: ExtractConfig,
                hidden_layer: int | None, progress: bool, new_fields: dict[str, Any]) -> tuple[ShardWriter, Calibration | None]:
    """A writer on `out_dir`; a new folder gets its vocabulary from a calibration run first, and
    `new_fields` in its manifest.

    An existing folder keeps its vocabulary and hidden layer (resuming never changes what its
    examples hold) and must have been made with the same task, teacher and vocabulary size. The
    input embeddings are written when `cfg.embeddings` asks for them (and kept when there).
    """
    existing = folder.existing(out_dir)
    dtype = (existing.get("teacher") or {}).get("dtype", "float32") if existing else "float32"
    header = folder.header(task, {**teacher.describe(), **({"dtype": dtype} if dtype != "float32" else {})},
                           signal="logits")
    folder.check_same(out_dir, existing, header, ("task_fingerprint", "teacher", "signal"))  # before calibrating
    texts = [it.text for it in items]
    if existing and "vocab" in existing:
        if existing["vocab"].get("size") != cfg.vocab_size:
            raise StoreError(f"{out_dir} holds shards made with --vocab-size {existing['vocab'].get('size')}; "
                             "use another --out folder or delete this one")
        if cfg.embeddings:
            save_input_embeddings(teacher, existing["vocab"]["input"], texts, out_dir, replace=False,
                                  progress=progress)  # if missing
            header["input_embeddings"] = INPUT_EMBEDDINGS
        teacher.to_dtype(dtype)  # the rest is labelled as the folder's first examples were
        kept = {k: existing[k] for k in ("vocab", "hidden_layer", "dtype_check", "parts", "calibration_id",
                                          "input_embeddings") if k in existing}
        return ShardWriter(out_dir, {**header, **kept}), None
    header.update(new_fields)
    if hidden_layer is not None:
        header["hidden_layer"] = hidden_layer
    t0 = time.perf_counter()
    calib = calibrate(teacher, task, items[:cfg.calibration], cfg.batch_size, progress, hidden_layer) if cfg.calibration else None
    header["vocab"] = build_vocab(teacher, task, items, cfg.vocab_size, calib, progress)
    if cfg.embeddings:
        save_input_embeddings(teacher, header["vocab"]["input"], texts, out_dir, replace=True, progress=progress)
        header["input_embeddings"] = INPUT_EMBEDDINGS
    header["dtype_check"] = choose_dtype(teacher, task, cfg.dtype, cfg.batch_size, calib, progress)
    header["teacher"] = teacher.describe()
    writer = ShardWriter(out_dir, header)
    writer.update(timings={"calibrate_s": round(time.perf_counter() - t0, 3)})
    return writer, calib
