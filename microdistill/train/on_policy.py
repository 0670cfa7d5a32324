"""On-policy distillation (GKD) for a decoder student: a share of the batches are the student's own
answers, scored token by token by the teacher.

    microdistill train --data shards/ --out student/ --student decoder --on-policy 0.5

Trained on the teacher's answers only, a student never sees the prefixes its own mistakes lead to
(exposure bias), and a free-text field is where it makes them: many tokens, each written after
the ones it chose. With --on-policy F, each batch is, with probability F, replaced by the
student's own greedy, schema-constrained answers to the same inputs (decided by the batch's
inputs and the seed, so a resumed run decides alike). The teacher the shards' manifest names,
loaded in process in the dtype it labelled them in, scores every token of those answers over the
kept vocabulary: the divergence pulls the student's distribution at each of its own steps onto
the teacher's, and the CE term aims at the teacher's choice there. The loss family and the
curriculum are those of off-policy batches.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np

from microdistill.core.console import say
from microdistill.data.shards import ShardSet
from microdistill.students.decoder.config import N_SPECIAL
from microdistill.students.decoder.data import Batch, Example
from microdistill.students.decoder.predict import generate
from microdistill.train.config import TrainConfig, TrainError


def load_scoring_teacher(shards: ShardSet, progress: bool):
    """The teacher that labelled `shards`, in process and in its labelling dtype; TrainError if it cannot be."""
    from microdistill.teachers import TeacherError, load_teacher, recorded_spec

    m = shards.manifest
    if "api" in m or not shards.has_logits:
        raise TrainError(f"--on-policy scores the student's answers with the teacher in process; {shards.dir} was "
                         "labelled by a served teacher, whose logits cannot be asked for")
    spec = recorded_spec(m.get("teacher"))
    try:
        teacher = load_teacher(spec, progress=progress)
    except TeacherError as e:
        raise TrainError(f"--on-policy needs the teacher of {shards.dir} ({spec}): {e}") from None
    teacher.to_dtype((m.get("teacher") or {}).get("dtype", "float32"))
    return teacher


class OnPolicy:
    """`collate` for a decoder's run: a `fraction` of the batches become the student's own answers
    with the teacher's logits along them."""

    def __init__(self, shards: ShardSet, cfg: TrainConfig, student, collate: Callable[[list[Example]], Batch],
                 progress: bool):
        from microdistill.teachers.decoding import Decoder

        self.teacher = load_scoring_teacher(shards, progress)
        self.decoder = Decoder(self.teacher, shards.task(), grammar=None)  # scores only: no decoding, no grammar
        self.student, self.collate, self.fraction, self.seed = student, collate, cfg.on_policy, cfg.seed
        self.kept = [int(t) for t in shards.kept_vocab]
        self.out_index = {t: k for k, t in enumerate(self.kept)}
        self.input_ids = np.asarray(shards.input_vocab)
        say(f"on-policy: {self.fraction:.0%} of the batches are the student's answers, scored by "
            f"{self.teacher.name}", progress)

    def chosen(self, examples: list[Example]) -> bool:
        """Whether this batch is the student's own (a hash of its inputs and the seed, uniform in [0, 1))."""
        key = hashlib.sha256(repr((self.seed, [e.inp for e in examples])).encode()).digest()
        return int.from_bytes(key[:8], "big") / 2**64 < self.fraction

    def __call__(self, examples: list[Example]) -> Batch:
        if not self.chosen(examples):
            return self.collate(examples)
        from microdistill.teachers.scoring import teacher_forced

        tok = self.teacher.tokenizer
        inputs = [[int(self.input_ids[i - N_SPECIAL]) for i in e.inp] for e in examples]
        # an answer runs to EOS, or is cut at the student's output length: only its last token is never
        # fed, so the teacher scores every position the student wrote
        limit = self.student.config.max_output
        answers = [(a + [self.teacher.eos_id])[:limit] for a in generate(self.student, inputs, constrain=True)]
        rests = [self.decoder.rest_ids(tok.decode(ids)) for ids in inputs]
        scored = teacher_forced(self.decoder, rests, answers, self.kept)
        own = [Example(e.inp, [self.out_index[t] for t in a], logits.astype(np.float16), lse, e.hidden,
                       target=logits.argmax(-1).tolist())
               for e, a, (logits, lse) in zip(examples, answers, scored)]
        return self.collate(own)
