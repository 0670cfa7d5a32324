"""Writes that never leave a half file or folder behind, and figures saved that way.

A reader sees either the old content or the whole new one: files are written to a temporary
name beside the target and renamed; folders are built under a temporary name and swapped in.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from microdistill.core.errors import UserError


class WriteError(UserError):
    """A file that cannot be written (disk full, no permission)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either the old file or the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        reason = "disk full" if e.errno == 28 else e.strerror or str(e)
        raise WriteError(f"cannot write {path}: {reason}; files written before are intact") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode())


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Build a folder that replaces `dest` as a whole: yields an empty temporary folder beside it;
    when the block ends without an error, the old `dest` (if any) is moved aside and the new one
    renamed into place, so at every moment `dest` or its backup is complete. On an error the
    temporary folder is removed and `dest` is untouched."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    old = dest.with_name(f".{dest.name}.old")
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; these folders are shared like any other
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_folder(out: Path, flag: str, marker: str, fmt: str, what: str, inputs: dict[str, Path | None],
                        error: type[UserError]) -> Path:
    """`out` resolved, if a verb that replaces it as a whole may write there: not one of the verb's
    `inputs` ({name: folder}) nor a folder holding one; not a file; new, empty, or `what` (e.g. "an
    export folder") that the verb wrote before, its `marker` file saying `"format": fmt`. Anything
    else is a one-line error before any work starts, so a mistyped --out never deletes a folder."""
    out = Path(out).resolve()
    for name, folder in inputs.items():
        if folder is None:
            continue
        folder = Path(folder).resolve()
        if out == folder or out in folder.parents:
            relation = "is" if out == folder else "holds"
            raise error(f"{flag} {out}: {relation} the {name} folder this reads ({folder}); choose another {flag}")
    if out.is_file():
        raise error(f"{flag} {out}: is a file; give a folder to write {what} in")
    if out.is_dir() and any(out.iterdir()):
        try:
            mine = json.loads((out / marker).read_text()).get("format") == fmt
        except (OSError, ValueError, AttributeError):
            mine = False
        if not mine:
            raise error(f"{flag} {out}: holds other files ({marker} missing or of another format), not {what}; "
                        f"choose a new or empty folder, or {what} to replace")
    return out


@contextmanager
def writer_lock(folder: Path, what: str, error: type[UserError]) -> Iterator[None]:
    """Hold `folder`/.lock while the block writes the folder, so a second process writing the same
    folder stops at once with a one-line error naming the first. The kernel releases the lock when
    its process ends, however it ends: a killed writer never leaves a stale lock."""
    import fcntl

    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            other = f.read().strip() or "another process"
            raise error(f"{what} {folder}: {other} is writing it; wait for it to finish or stop it, "
                        "or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
            if created and [p.name for p in folder.iterdir()] == [".lock"]:  # a run that wrote nothing leaves nothing
                shutil.rmtree(folder, ignore_errors=True)


def copy_tree_atomic(src: Path, dst: Path) -> None:
    """Replace folder `dst` by a copy of `src` (see atomic_dir)."""
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as PNG atomically and release it."""
    import matplotlib.pyplot as plt

    # Log-scale tick labels are mathtext, whose STIX fonts some matplotlib builds lack: the DejaVu
    # fallback draws them well, so its warning (one per font, on every first plot) is noise.
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def read_json(path: Path, what: str, error: type[UserError] = UserError) -> Any:
    """A JSON file a stage wrote, or a one-line error naming it and what it should have been."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: not found ({what})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: corrupted ({what}: {e})") from None


def read_format(path: Path, fmt: str, kind: str, error: type[UserError]) -> dict[str, Any]:
    """A JSON object whose "format" must be `fmt` (a shard manifest, a student config, an export
    manifest), or a one-line error: corrupted, or not a `fmt` `kind`."""
    try:
        obj = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: corrupted {kind} ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise error(f"{path}: not a {fmt} {kind} (format={obj.get('format') if isinstance(obj, dict) else None!r})")
    return obj


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
