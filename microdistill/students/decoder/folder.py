"""A decoder student's folder: save it, load it, and the loaded student every verb uses.

    from microdistill.students import load_student
    student = load_student("runs/demo/student")     # a LoadedDecoder for a decoder folder
    student.predict(["some text"])

Beside what every student folder holds (students/folder.py), a decoder's config.json has
`student` (its StudentConfig) and `vocab` (the teacher id of each output and input index, the
teacher's EOS id and logit width, whether a tail class was trained), and `tokenizer/` holds the
teacher's tokenizer files, copied from the shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from microdistill.core.files import copy_tree_atomic
from microdistill.core.task import Task, TaskError, task_from_dict
from microdistill.data.shards import Record, ShardSet, StoreError
from microdistill.students.decoder.config import N_SPECIAL, StudentConfig
from microdistill.students.decoder.model import Student
from microdistill.students.folder import StudentFolderError, check_files, save_folder, shards_summary

KIND = "decoder"  # config.json's "kind"; folders written before kinds existed are decoders
FILES = ("config.json", "model.safetensors", "tokenizer", "task.yaml")


@dataclass
class LoadedDecoder:
    """A decoder student ready to predict: the model plus the maps between its indices and teacher ids.

    kept[k] is the teacher id of output index k; input_vocab[p] the teacher id of input index
    N_SPECIAL + p. `teacher_vocab_size` is the logit width the grammar works in (covers every id).
    """

    model: Student
    config: StudentConfig
    task: Task
    tokenizer: Any
    kept: np.ndarray
    input_vocab: np.ndarray
    eos_id: int
    teacher_vocab_size: int
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    kind: str = KIND

    @classmethod
    def from_shards(cls, model: Student, shards: ShardSet, tokenizer=None) -> LoadedDecoder:
        """The in-memory student of a training run on `shards` (no folder involved)."""
        tokenizer = tokenizer if tokenizer is not None else shards.tokenizer()
        kept = shards.kept_vocab
        return cls(
            model=model, config=model.config, task=shards.task(), tokenizer=tokenizer, kept=kept,
            input_vocab=shards.input_vocab, eos_id=shards.eos_id,
            teacher_vocab_size=logit_width(shards.manifest.get("teacher", {}).get("vocab_size"), tokenizer, kept),
        )

    @cached_property
    def input_index(self) -> dict[int, int]:
        """Teacher id -> student input index."""
        return {int(t): N_SPECIAL + p for p, t in enumerate(self.input_vocab)}

    @cached_property
    def encoder(self):
        """Tokenizes new text into teacher ids inside the input vocabulary (byte fallback)."""
        from microdistill.data.vocab import InputEncoder

        return InputEncoder(self.tokenizer, [int(i) for i in self.input_vocab])

    @cached_property
    def grammar(self):
        """The task's output grammar for the teacher tokenizer, limited to the kept ids (built once)."""
        from microdistill.core.grammar import Grammar

        return Grammar(self.task, self.tokenizer, vocab_size=self.teacher_vocab_size, eos_id=self.eos_id,
                       allowed=[int(i) for i in self.kept])

    def predict(self, texts: Sequence[str], batch_size: int = 64, *, constrain: bool = True,
                drafts: bool = True) -> list[dict[str, Any]]:
        """Greedy answers, schema-constrained unless `constrain` is False (predict.py)."""
        from microdistill.students.decoder.predict import predict

        return predict(self, texts, constrain=constrain, batch_size=batch_size, drafts=drafts)

    def held_out(self, records: Sequence[Record], batch_size: int = 64) -> dict[str, Any]:
        """The trainer's held-out metrics on `records` (predict.held_out)."""
        from microdistill.students.decoder.data import examples_of
        from microdistill.students.decoder.predict import held_out

        examples = examples_of(records, self.input_vocab, self.kept, False, where=f"student {self.path}")
        return held_out(self, examples, list(records), batch_size)

    def check_shards(self, shards: ShardSet) -> None:
        """The shards must share this student's vocabularies (it reads their teacher ids)."""
        if not (np.array_equal(self.kept, shards.kept_vocab) and np.array_equal(self.input_vocab, shards.input_vocab)):
            raise StudentFolderError(f"student {self.path} and shard folder {shards.dir} use different vocabularies "
                                     "(shards from another extraction); evaluate on the shards the student was trained on")

    def describe(self) -> dict[str, Any]:
        return self.config.to_dict()


def logit_width(declared: int | None, tokenizer, kept: np.ndarray) -> int:
    """A vocabulary size that covers the tokenizer, the declared model width and every kept id."""
    return max(int(declared or 0), len(tokenizer), int(np.max(kept)) + 1)


def save_student(model: Student, config: StudentConfig, shards: ShardSet, path: Path,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write the decoder student folder `path` (created if needed; other files in it are left alone).

    `extra` is merged into config.json (the trainer stores its configuration there).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    src_tok = shards.dir / "tokenizer"
    if not src_tok.is_dir():
        raise StoreError(f"shard folder {shards.dir}: tokenizer/ is missing")
    kept = shards.kept_vocab
    m = shards.manifest
    copy_tree_atomic(src_tok, path / "tokenizer")
    vocab = {"kept": [int(i) for i in kept], "input": [int(i) for i in shards.input_vocab], "eos": shards.eos_id,
             "teacher_vocab_size": m.get("teacher", {}).get("vocab_size"), "tail": config.output_vocab == len(kept) + 1}
    return save_folder(path, KIND, model, shards.task(), {"student": config.to_dict(), "vocab": vocab},
                       shards_summary(shards, coverage=m.get("vocab", {}).get("coverage")), extra)


def load_decoder(path: Path, cfg: dict[str, Any]) -> LoadedDecoder:
    """A decoder folder whose config.json (`cfg`) students.load_student has read."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    weights = check_files(path, FILES, cfg)
    try:
        config = StudentConfig.from_dict(cfg["student"])
        task = task_from_dict(cfg["task"], f"in {path / 'config.json'}")
        kept = np.asarray(cfg["vocab"]["kept"], dtype=np.int64)
        input_vocab = np.asarray(cfg["vocab"]["input"], dtype=np.int64)
        eos = int(cfg["vocab"]["eos"])
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, TaskError):
            raise StudentFolderError(str(e)) from None
        raise StudentFolderError(f"{path / 'config.json'}: missing or bad entry ({type(e).__name__}: {e})") from None
    model = Student(config)
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as e:  # safetensors and torch raise several types for damaged or mismatched files
        raise StudentFolderError(f"{weights}: cannot be loaded into the configured student ({type(e).__name__})") from None
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    except Exception as e:  # transformers raises OSError/ValueError/... for incomplete tokenizer folders
        raise StudentFolderError(f"{path / 'tokenizer'}: cannot load the tokenizer ({type(e).__name__})") from None
    extra = {k: v for k, v in cfg.items() if k not in ("student", "vocab", "task")}
    return LoadedDecoder(
        model=model, config=config, task=task, tokenizer=tokenizer, kept=kept, input_vocab=input_vocab, eos_id=eos,
        teacher_vocab_size=logit_width(cfg["vocab"].get("teacher_vocab_size"), tokenizer, kept), meta=extra, path=path,
    )
