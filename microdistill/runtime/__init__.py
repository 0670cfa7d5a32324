"""The lean runtime: an exported student answered by onnxruntime, without torch.

    microdistill predict --student runs/demo/export "thanks, that fixed it!"
    from microdistill.runtime import load_exported   # load_exported("runs/demo/export").predict([...])

An export folder (written by export/) holds the graphs and files of its kind (heads.py,
decoder.py) and, whatever the kind,

    task.yaml        the task, for people to read (export.json's copy is the one loaded)
    export.json      format and version, kind, fields and values, task, opset, the onnxruntime that
                     exported it, each file's size and sha256, precision, parity with PyTorch
    parity.md        every held-out input where the export answers differently from PyTorch

Every kind answers through the same interface: kind, task, fields, path, tokenizer and
predict(texts) -> one result dict per text with a confidence per field. This folder imports
onnxruntime, tokenizers, numpy and the package's pure-Python parts only, so `pip install
microdistill` (no torch) can load and answer with an export.
"""

from __future__ import annotations

from pathlib import Path

from microdistill.core.task import TaskError, task_from_dict
from microdistill.runtime import decoder, heads
from microdistill.runtime.common import (MANIFEST, ExportError, check_files, expect_task, is_export, read_manifest,
                                         session)

# Every exported kind (each module: REQUIRED files, graphs first, and load(path, manifest, task, sessions)).
READERS = {"heads": heads, "decoder": decoder}

__all__ = ["ExportError", "READERS", "is_export", "load_exported"]


def load_exported(path: Path, task: str | None = None, threads: int | None = None):
    """The export folder `path`, verified (format, version, file hashes) and ready to predict.

    task: the task name the caller expects (an error when the student does another).
    threads: onnxruntime intra-op threads (default: the cores, up to 4).
    """
    path = Path(path)
    m = read_manifest(path)
    reader = READERS.get(m.get("kind"))
    if reader is None:
        raise ExportError(f"{path / MANIFEST}: a {m.get('kind')!r} export, which this version cannot run "
                          f"(it runs {' and '.join(map(repr, READERS))})")
    check_files(path, m, reader.REQUIRED)
    try:
        t = task_from_dict(m["task"], f"in {path / MANIFEST}")
        fields = list(t.output.fields)
        if [[f.name, getattr(f, "values", None)] for f in fields] != [[f["name"], f["values"]] for f in m["fields"]]:
            raise ExportError(f"{path / MANIFEST}: its fields do not match its task; export the student again")
        expect_task(t, task, path)
        sessions = [session(path / name, m, threads) for name in reader.REQUIRED if name.endswith(".onnx")]
        return reader.load(path, m, t, sessions)
    except TaskError as e:
        raise ExportError(str(e)) from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ExportError(f"{path / MANIFEST}: missing or bad entry ({type(e).__name__}: {e})") from None
