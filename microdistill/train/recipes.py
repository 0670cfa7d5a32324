"""The named training configurations (recipes.yaml, shipped with the package) that `compare` trains.

    microdistill compare --list

CONFIGS maps each name to (what it is, the TrainConfig fields it sets); SHARED names the
TrainConfig fields a comparison sets once for every run, which no recipe may set.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml


def _load() -> tuple[dict[str, tuple[str, dict[str, Any]]], tuple[str, ...]]:
    data = yaml.safe_load(resources.files("microdistill.train").joinpath("recipes.yaml").read_text(encoding="utf-8"))
    return {name: (r["what"], dict(r["set"])) for name, r in data["recipes"].items()}, tuple(data["shared"])


CONFIGS, SHARED = _load()
