"""Calibration: a first look at the teacher on a sample, before any shard is written.

Grammar-only decoding of the calibration inputs measures where the teacher's probability mass
goes (the kept output vocabulary takes the required tokens plus the heaviest others), and, where
asked, whether a bfloat16 teacher answers them as float32 does (choose_dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from microdistill.core.console import progress as progress_bar
from microdistill.core.console import say
from microdistill.data.corpus import Item, by_length
from microdistill.core.task import Task
from microdistill.teachers.hf import HFTeacher, bfloat16_is_fast
from microdistill.data.vocab import build_input_vocab, coverage, kept_token_strings, required_tokens, select_kept

if TYPE_CHECKING:
    from microdistill.teachers.decoding import Decoder

MIN_SAME = 0.98  # bfloat16 must answer as float32 does on this share of the calibration inputs


def batches(decoder: "Decoder", items: Sequence[Item], size: int) -> Iterator[tuple[list[Item], list[list[int]]]]:
    """Items in batches of neighbours by prompt length, so rows in a batch need little padding."""
    rests = [decoder.rest_ids(it.text) for it in items]
    for chunk in by_length([len(r) for r in rests], size):
        yield [items[i] for i in chunk], [rests[i] for i in chunk]


@dataclass
class Calibration:
    """What grammar-only decoding of the calibration sample found.

    mass: float64 [V] mean teacher probability of each token over all output steps.
    answers: (item, decoded row with its head inputs, answer text, decisions) of each finished
        answer; those that only use kept tokens become examples without decoding them again.
    """

    mass: np.ndarray
    answers: list[tuple[Item, Any, str, dict[str, np.ndarray]]]


def calibrate(teacher: HFTeacher, task: Task, items: Sequence[Item], batch_size: int = 16, progress: bool = True,
              hidden_layer: int | None = None) -> Calibration:
    """Decode `items` under the grammar alone, measuring where the teacher's probability goes."""
    from microdistill.core.grammar import Grammar
    from microdistill.teachers.decoding import Decoder

    grammar = Grammar(task, teacher.tokenizer, teacher.vocab_size, teacher.eos_id, allowed=None)
    decoder = Decoder(teacher, task, grammar, keep_hidden=True, hidden_layer=hidden_layer)
    mass = torch.zeros(teacher.vocab_size, dtype=torch.float64)
    steps, answers = 0, []
    bar, job = progress_bar(progress, "calibrating", len(items))
    with bar:
        for chunk, rests in batches(decoder, items, batch_size):
            batch = decoder.generate(rests, task.output.max_tokens, mass=mass)
            steps += sum(len(r.lse) for r in batch.rows)
            texts = [teacher.tokenizer.decode(r.output_ids[:-1]) if r.finished else None for r in batch.rows]
            decisions = decoder.decisions(batch, texts)
            answers += [(it, r, t, d) for it, r, t, d in zip(chunk, batch.rows, texts, decisions) if t is not None]
            bar.advance(job, len(rests))
    return Calibration((mass / max(steps, 1)).numpy(), answers)


def build_vocab(teacher: HFTeacher, task: Task, items: Sequence[Item], vocab_size: int, calib: Calibration | None,
                progress: bool) -> dict[str, Any]:
    """The manifest's `vocab` entry: kept output ids (required + highest mass) and input ids."""
    tok = teacher.tokenizer
    required = required_tokens(task, tok, teacher.eos_id)
    mass = calib.mass if calib else np.zeros(teacher.vocab_size)
    kept = select_kept(required, mass, vocab_size)
    input_vocab = build_input_vocab(tok, tok([it.text for it in items], add_special_tokens=False).input_ids)
    cov = coverage(kept, mass)
    if len(required) > vocab_size:
        say(f"note: the task needs {len(required)} required tokens, more than --vocab-size {vocab_size}; kept all of them", progress)
    say(f"kept vocabulary: {len(kept)} tokens ({len(required)} required), {cov:.2%} of the teacher's "
                   f"output mass on {len(calib.answers) if calib else 0} calibration answers", progress)
    return {
        "kept": kept,
        "kept_tokens": kept_token_strings(tok, kept),
        "n_required": len(required),
        "eos": int(teacher.eos_id),
        "input": input_vocab,
        "coverage": cov,
        "size": vocab_size,
    }


def choose_dtype(teacher: HFTeacher, task: Task, dtype: str, batch_size: int, calib: Calibration | None,
                 progress: bool) -> dict[str, Any]:
    """Cast the teacher to the dtype the folder is labelled in, and say why (the manifest's
    `dtype_check`). "auto" takes bfloat16 where this CPU runs it natively and, on the
    calibration inputs, it gives the same answer as float32 on at least MIN_SAME of them."""
    if dtype == "float32" or (dtype == "auto" and not bfloat16_is_fast()):
        return {"dtype": "float32", "why": "asked" if dtype == "float32" else "no native bfloat16 on this CPU"}
    if dtype == "bfloat16" or calib is None or not calib.answers:
        teacher.to_dtype("bfloat16")
        return {"dtype": "bfloat16", "why": "asked" if dtype == "bfloat16" else "nothing to compare on"}
    from microdistill.core.grammar import Grammar
    from microdistill.teachers.decoding import Decoder

    # float32 -> bfloat16 -> float32 would round the weights: keep the originals to go back to
    original = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    teacher.to_dtype("bfloat16")
    grammar = Grammar(task, teacher.tokenizer, teacher.vocab_size, teacher.eos_id, allowed=None)
    decoder = Decoder(teacher, task, grammar)
    items = [a[0] for a in calib.answers]
    want = {it.text: text for it, _, text, _ in calib.answers}
    same = 0
    for chunk, rests in batches(decoder, items, batch_size):
        rows = decoder.generate(rests, task.output.max_tokens).rows
        same += sum(teacher.tokenizer.decode(r.output_ids[:-1]) == want[it.text] for it, r in zip(chunk, rows))
    share = same / len(items)
    if share < MIN_SAME:
        teacher.to_dtype("float32")
        teacher.model.load_state_dict(original)
    chosen = teacher.dtype
    say(f"teacher in bfloat16 gives float32's answer on {same} of {len(items)} calibration inputs ({share:.1%}): "
        f"labelling in {chosen}", progress)
    return {"dtype": chosen, "n": len(items), "same": same, "min_same": MIN_SAME}
