"""calibration.json: the per-field temperatures a student's confidences are divided by.

Written beside a student by its confidence calibration (students/confidence.py) and copied into
its export; read alike by the PyTorch student and the torch-free runtime, so both give the same
calibrated confidence. Dividing a field's logits by T > 0 never changes its answer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from microdistill.core.errors import UserError

CALIBRATION = "calibration.json"  # {"method": "temperature", "temperatures": {field: T}, ...}


def read_temperatures(folder: Path, names: Sequence[str], error: type[UserError] = UserError) -> dict[str, float] | None:
    """The per-field temperatures of `folder`/calibration.json (a field it does not name keeps
    T = 1), or None when the folder has none; a damaged file is an `error` in one line."""
    file = Path(folder) / CALIBRATION
    if not file.is_file():
        return None
    try:
        cal = json.loads(file.read_text())
        if cal.get("method", "temperature") != "temperature":
            raise error(f"{file}: calibration method {cal.get('method')!r}; this version applies 'temperature' only")
        temps = {str(k): float(v) for k, v in cal["temperatures"].items()}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise error(f"{file}: unreadable ({type(e).__name__}: {e}); fit it again with "
                    f"microdistill calibrate-confidence --student {folder}") from None
    bad = sorted(k for k, t in temps.items() if k not in names or not (math.isfinite(t) and t > 0))
    if bad:
        raise error(f"{file}: temperatures for unknown fields or not positive numbers: {', '.join(bad)}")
    return {name: temps.get(name, 1.0) for name in names}
