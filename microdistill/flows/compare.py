"""Several training configurations on the same shards, side by side, in one report.

    microdistill compare --data runs/demo/shards --configs curriculum,ce,kd --out runs/demo/compare --max-steps 500

Every configuration trains the same student preset with the same seed, data and step budget, in
`out/<name>/` (a finished run is reused, an interrupted one resumed), then `compare.md`,
`compare.json` and `curves.png` put them side by side. `--sizes 100,200,400` also trains each
configuration on the first N training examples (same budget) for `efficiency.png`: does
distillation reach a given accuracy with less data than learning the teacher's text alone?
The named configurations are train/recipes.yaml's; report/compare.py draws and writes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from microdistill.core.console import say
from microdistill.core.files import atomic_write_bytes, atomic_write_json
from microdistill.data.shards import ShardSet
from microdistill.flows.config import CompareConfig, CompareError
from microdistill.evaluate.peers import PeerError, score_peers
from microdistill.report.compare import markdown, plot_curves, plot_efficiency
from microdistill.report.evaluation import read_metrics
from microdistill.train import TrainConfig, TrainError, train_once, train_sizes
from microdistill.train.recipes import CONFIGS, SHARED

NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
RESERVED = {"sizes"}  # out/sizes/ holds the data-efficiency runs


# ---- which runs --------------------------------------------------------------------------------
def _coerce(name: str, value: Any, where: str) -> Any:
    """A plan value checked against the TrainConfig field's type (YAML reads `1e-3` as a string)."""
    kind = {f.name: str(f.type) for f in fields(TrainConfig)}[name]
    optional = "None" in kind
    if value is None and optional:
        return None
    try:
        if kind.startswith("bool"):
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind.startswith("int"):
            if isinstance(value, bool) or not float(value).is_integer():
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError):
        raise CompareError(f"{where}: {name}={value!r} is not a {kind}") from None


def resolve(entry: str | dict[str, Any], where: str) -> tuple[str, str, dict[str, Any]]:
    """A configuration name, or a plan entry {name, base?, TrainConfig fields...} -> (name, what, overrides).

    An entry's `base` (default: its own name, when that is a registry name) supplies the starting
    overrides; the entry's fields go on top."""
    if isinstance(entry, str):
        if entry not in CONFIGS:
            raise CompareError(f"{where}: unknown configuration {entry!r}; choose from {', '.join(CONFIGS)} "
                               "or describe it in a --plan file")
        return entry, CONFIGS[entry][0], dict(CONFIGS[entry][1])
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise CompareError(f"{where}: each run needs a 'name' (and TrainConfig fields), got {entry!r}")
    name = entry["name"]
    where = f"{where}, run {name!r}"
    base = entry.get("base", name if name in CONFIGS else None)
    if base is not None and base not in CONFIGS:
        raise CompareError(f"{where}: unknown base {base!r}; choose from {', '.join(CONFIGS)}")
    known = {f.name for f in fields(TrainConfig)}
    overrides = dict(CONFIGS[base][1]) if base else {}
    parts = [CONFIGS[base][0]] if base else []
    for key, value in entry.items():
        if key in ("name", "base"):
            continue
        key = TrainConfig.renamed.get(key, key)
        if key not in known:
            raise CompareError(f"{where}: unknown field {key!r}; expected TrainConfig fields ({', '.join(sorted(known))})")
        if key in SHARED:
            raise CompareError(f"{where}: {key} is shared by the whole comparison; set it with --{key.replace('_', '-')}")
        overrides[key] = _coerce(key, value, where)
        parts.append(f"{key}={overrides[key]}")
    return name, "; ".join(parts) or "TrainConfig defaults", overrides


def load_plan(path: Path) -> list[dict[str, Any]]:
    """A YAML plan: a list of runs, or a mapping with `runs:`; each run {name, base?, fields...}."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CompareError(f"plan {path}: not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CompareError(f"plan {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict) and set(data) == {"runs"}:
        data = data["runs"]
    if not isinstance(data, list) or not data:
        raise CompareError(f"plan {path}: expected a list of runs (or 'runs:' holding one), each with a name")
    for entry in data:
        resolve(entry, f"plan {path}")  # fail now, naming the file, not after hours of training
    return data


def build_runs(configs: list[str | dict], shared: dict[str, Any], common: dict[str, Any],
               where: str = "configurations") -> list[tuple[str, str, TrainConfig]]:
    """(name, description, TrainConfig) for each configuration: defaults < common < its own < shared."""
    runs, seen = [], set()
    for entry in configs:
        name, what, overrides = resolve(entry, where)
        if not NAME.match(name) or name in RESERVED:
            raise CompareError(f"{where}: configuration name {name!r} must be letters, digits, '_', '-' or '.' "
                               f"(and not {', '.join(RESERVED)})")
        if name in seen:
            raise CompareError(f"{where}: configuration {name!r} is listed twice")
        seen.add(name)
        try:
            cfg = TrainConfig(**{**common, **overrides, **shared})
        except TrainError as e:
            raise CompareError(f"{where}, configuration {name!r}: {e}") from None
        runs.append((name, what, cfg))
    if not runs:
        raise CompareError(f"{where}: no configurations to compare")
    return runs


# ---- training and reading back ----------------------------------------------------------------
def summarise(run_dir: Path) -> dict[str, Any]:
    """A finished run's numbers: the last held-out evaluation and the last training step."""
    steps, evals = read_metrics(run_dir / "metrics.jsonl")
    stats = json.loads((run_dir / "training.json").read_text())
    if not steps or not evals:
        raise CompareError(f"{run_dir / 'metrics.jsonl'}: no training steps or held-out evaluation recorded")
    last, final = steps[-1], evals[-1]
    return {
        "exact_match": final["val_exact_match"], "token_acc": final["val_token_acc"],
        "field_agreement": final["val_field_agreement"], "val_examples": final["val_examples"],
        "train_loss": last["loss"], "train_ce": last["ce"],
        # Text-only training has no KL term: 0 there would read as a perfect match.
        "train_divergence": last["divergence"] if stats["signal"] == "logits" else None,
        "steps": stats["steps"], "epochs": stats["epochs"], "wall_s": stats["wall_s"],
        "examples": stats["examples"], "signal": stats["signal"],
    }


def text_scores(run_dir: Path, shards: ShardSet, limit: int | None) -> dict[str, Any]:
    """{"chrf": {field: chrF of the student's text against the teacher's on the held-out inputs}} for a
    task with free-text fields (exact match is too strict a measure of a summary); {} otherwise."""
    from microdistill.core.task import StringField
    from microdistill.evaluate.agreement import chrf
    from microdistill.students import load_student

    names = [f.name for f in shards.task().output.fields if isinstance(f, StringField)]
    if not names:
        return {}
    records = list(shards.records("val"))[:limit]
    answers = [p["fields"] or {} for p in load_student(run_dir).predict([r.text for r in records])]
    return {"chrf": {n: chrf([r.fields[n] for r in records], [a.get(n) for a in answers]) for n in names}}


def split_counts(shards: ShardSet) -> tuple[int, int]:
    counts = shards.manifest.get("counts", {})
    if "train" in counts and "val" in counts:
        return int(counts["train"]), int(counts["val"])
    records = list(shards.records())
    return sum(r.split == "train" for r in records), sum(r.split == "val" for r in records)


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The winner by held-out exact match (token accuracy breaks ties) and its margin over the
    runner-up, with one standard error of that difference (two binomials on the same n)."""
    ranked = sorted(rows, key=lambda r: (r["exact_match"], r["token_acc"]), reverse=True)
    if len(ranked) < 2:
        return {"winner": ranked[0]["name"], "runner_up": None, "margin": None, "margin_se": None, "token_margin": None}
    a, b = ranked[0], ranked[1]
    n = max(a["val_examples"], 1)
    se = math.sqrt((a["exact_match"] * (1 - a["exact_match"]) + b["exact_match"] * (1 - b["exact_match"])) / n)
    return {"winner": a["name"], "runner_up": b["name"], "margin": a["exact_match"] - b["exact_match"], "margin_se": se,
            "token_margin": a["token_acc"] - b["token_acc"]}


def peer_rows(shards: ShardSet, limit_train: int | None, progress: bool) -> list[dict] | None:
    """The peers (peers.py) on the same training examples and held-out split; None (said) when
    the task has fields they cannot answer."""
    try:
        return score_peers(shards.dir, limit_train=limit_train, progress=progress)
    except PeerError as e:
        say(f"no peers: {e}", progress)
        return None


# ---- the comparison ------------------------------------------------------------------------------
def compare(data_dir: Path, out_dir: Path, configs: list[str] | list[dict], config: CompareConfig = CompareConfig(),
            progress: bool = True) -> dict:
    """Train each configuration on the same shards, preset, seed and budget; write the report.

    configs: recipe names (train/recipes.yaml) or plan entries {name, base?, TrainConfig fields}.
    Returns what compare.json holds.
    """
    c, shards, out = config, ShardSet(data_dir), Path(out_dir)
    n_train, n_val = split_counts(shards)
    if n_val == 0:
        raise CompareError(f"shard folder {shards.dir}: no held-out (val) examples to compare on")
    shared = c.shared()
    runs = build_runs(configs, shared, c.common())
    check_runs(runs, shards, c.sizes_for)
    used = min(c.limit_train or n_train, n_train)
    rows = []
    for i, (name, what, cfg) in enumerate(runs):
        say(f"[{i + 1}/{len(runs)}] {name}: {what}", progress)
        train_once(shards.dir, out / name, cfg, progress)
        rows.append({"name": name, "description": what, "dir": str(out / name), "config": cfg.to_dict(),
                     **summarise(out / name), **text_scores(out / name, shards, c.eval_limit)})
    result = {"data": str(shards.dir), "preset": c.preset, "seed": c.seed, "max_steps": c.max_steps,
              "epochs": shared.get("epochs"), "limit_train": c.limit_train, "n_train": used, "n_val": n_val,
              "runs": rows, "verdict": verdict(rows), "efficiency": None,
              "plots": [plot_curves([(r["name"], Path(r["dir"])) for r in rows], out / "curves.png")]}
    result["peers"] = peer_rows(shards, c.limit_train, progress)
    if c.sizes:
        curve = [r for r in runs if c.sizes_for is None or r[0] in c.sizes_for]
        result["efficiency"] = efficiency(shards.dir, out, curve, sorted(set(c.sizes)), used, progress)
        result["plots"].append(plot_efficiency(result["efficiency"], out / "efficiency.png"))
    atomic_write_json(out / "compare.json", result)
    atomic_write_bytes(out / "compare.md", markdown(result).encode())
    return result


def check_runs(runs: list[tuple[str, str, TrainConfig]], shards: ShardSet, sizes_for: tuple[str, ...] | None) -> None:
    """Refuse, before any training, runs the shards cannot feed and --sizes-for names that are not among them."""
    if not shards.has_logits:
        needs = [name for name, _, cfg in runs if cfg.signal != "text"]
        if needs:
            raise CompareError(f"shard folder {shards.dir}: text-only shards have no teacher logits, which "
                               f"{', '.join(needs)} need; compare ce (text) configurations only")
    names = [name for name, _, _ in runs]
    unknown = [name for name in sizes_for or [] if name not in names]
    if unknown:
        raise CompareError(f"sizes for {', '.join(unknown)}: not among the configurations compared ({', '.join(names)})")


def efficiency(data_dir: Path, out: Path, runs: list[tuple[str, str, TrainConfig]], sizes: list[int],
               used: int, progress: bool) -> dict[str, list[dict]]:
    """Each configuration trained on the first n training examples for each size, then the full
    run as the last point: a size at or above the examples available would be the same examples,
    so the same weights."""
    sizes = [n for n in sizes if n < used]
    eff: dict[str, list[dict]] = {}
    for name, _, cfg in runs:
        points = train_sizes(data_dir, cfg, sizes, lambda n: out / "sizes" / name / f"n{n}", progress)
        points.append({"examples": used, "dir": str(out / name)})
        eff[name] = [{**summary_point(Path(p["dir"])), "dir": p["dir"]} for p in points]
    return eff


def summary_point(run_dir: Path) -> dict[str, Any]:
    s = summarise(run_dir)
    return {"examples": s["examples"], "exact_match": s["exact_match"], "token_acc": s["token_acc"], "steps": s["steps"]}
