"""The student folder: everything needed to run a trained student, without the teacher or the trainer.

    from microdistill.students.decoder.folder import load_student
    student = load_student("runs/demo/student")     # then predict.predict(student, ["some text"])

A folder holds:

    model.safetensors   the weights (float32)
    config.json         the student kind ("decoder"), hyper-parameters, vocabulary maps (teacher id of each output and
                        input index), the teacher's EOS id and logit width, the task, a summary of
                        the shards it was trained on, and the training configuration
    tokenizer/          the teacher's tokenizer files, copied from the shards
    task.yaml           the task, for people to read (config.json's copy is the one loaded)

Each file is replaced atomically, the weights first and config.json last; config.json records
the size of the weights it belongs to, so a save cut short between the two is detected on load.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from microdistill.students import FORMAT, StudentFolderError
from microdistill.core.files import atomic_write_bytes, atomic_write_json, copy_tree_atomic, read_format
from microdistill.data.shards import ShardSet, StoreError
from microdistill.students.decoder.model import N_SPECIAL, Student, StudentConfig
from microdistill.core.task import Task, TaskError, task_from_dict

KIND = "decoder"  # config.json's "kind"; folders written before kinds existed are decoders
FILES = ("config.json", "model.safetensors", "tokenizer", "task.yaml")


@dataclass
class LoadedStudent:
    """A student ready to predict: the model plus the maps between its indices and teacher ids.

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
    def from_shards(cls, model: Student, shards: ShardSet, tokenizer=None) -> LoadedStudent:
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


def logit_width(declared: int | None, tokenizer, kept: np.ndarray) -> int:
    """A vocabulary size that covers the tokenizer, the declared model width and every kept id."""
    return max(int(declared or 0), len(tokenizer), int(np.max(kept)) + 1)


def save_student(model: Student, config: StudentConfig, shards: ShardSet, path: Path,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write the student folder `path` (created if needed; other files in it are left alone).

    `extra` is merged into config.json (the trainer stores its configuration there).
    """
    from safetensors.torch import save

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    src_tok = shards.dir / "tokenizer"
    if not src_tok.is_dir():
        raise StoreError(f"shard folder {shards.dir}: tokenizer/ is missing")
    kept = shards.kept_vocab
    task = shards.task()
    weights = save({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                   metadata={"format": FORMAT})
    copy_tree_atomic(src_tok, path / "tokenizer")
    atomic_write_bytes(path / "task.yaml", yaml.safe_dump(task.model_dump(), sort_keys=False, allow_unicode=True).encode())
    atomic_write_bytes(path / "model.safetensors", weights)
    m = shards.manifest
    atomic_write_json(path / "config.json", {
        "format": FORMAT,
        "kind": KIND,
        "student": config.to_dict(),
        "vocab": {
            "kept": [int(i) for i in kept],
            "input": [int(i) for i in shards.input_vocab],
            "eos": shards.eos_id,
            "teacher_vocab_size": m.get("teacher", {}).get("vocab_size"),
            "tail": config.output_vocab == len(kept) + 1,
        },
        "task": task.model_dump(),
        "shards": {
            "path": str(shards.dir), "task_fingerprint": m.get("task_fingerprint"), "teacher": m.get("teacher"),
            "signal": m.get("signal", "logits"), "counts": m.get("counts"), "coverage": m.get("vocab", {}).get("coverage"),
        },
        "model_bytes": len(weights),
        "model_sha256": hashlib.sha256(weights).hexdigest(),
        **(extra or {}),
    })
    return path


def load_student(path: Path):
    """Load a student folder written by training: a LoadedStudent (decoder), or a LoadedHeads
    (classifier heads, students/heads.py) when config.json says `"kind": "heads"`."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise StudentFolderError(f"student folder {path}: not found")
    if not (path / "config.json").is_file():
        raise StudentFolderError(f"student folder {path}: config.json is missing (not a complete student folder)")
    cfg = _read_config(path / "config.json")
    kind = cfg.get("kind", KIND)
    if kind == "heads":
        from microdistill.students.heads.model import load_heads

        return load_heads(path, cfg)
    if kind != KIND:
        raise StudentFolderError(f"student folder {path}: a {kind!r} student, which this version cannot load "
                                 f"(it loads {KIND!r} and 'heads' students)")
    for name in FILES:
        if not (path / name).exists():
            raise StudentFolderError(f"student folder {path}: {name} is missing (not a complete student folder)")
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
    weights = path / "model.safetensors"
    if weights.stat().st_size != cfg.get("model_bytes", weights.stat().st_size):
        raise StudentFolderError(f"{weights}: does not match config.json (an interrupted save?); save the student again")
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
    return LoadedStudent(
        model=model, config=config, task=task, tokenizer=tokenizer, kept=kept, input_vocab=input_vocab, eos_id=eos,
        teacher_vocab_size=logit_width(cfg["vocab"].get("teacher_vocab_size"), tokenizer, kept), meta=extra, path=path,
    )


def _read_config(path: Path) -> dict[str, Any]:
    return read_format(path, FORMAT, "config", StudentFolderError)
