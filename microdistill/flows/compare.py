"""Several training configurations on the same shards, side by side, in one report.

    microdistill compare --data runs/demo/shards --configs curriculum,ce,kd --out runs/demo/compare --max-steps 500

Every configuration trains the same student preset with the same seed, data and step budget, in
`out/<name>/` (a finished run is reused, an interrupted one resumed), then `compare.md`,
`compare.json` and `curves.png` put them side by side. `--sizes 100,200,400` also trains each
configuration on the first N training examples (same budget) for `efficiency.png`: does
distillation reach a given accuracy with less data than learning the teacher's text alone?
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from microdistill.core.console import say
from microdistill.core.errors import UserError
from microdistill.core.files import atomic_write_bytes, atomic_write_json
from microdistill.evaluate.peers import PeerError, score_peers
from microdistill.report.evaluation import pct, read_metrics, save_plot, smooth
from microdistill.data.shards import ShardSet
from microdistill.train import TrainConfig, TrainError, train_once, train_sizes

# name -> (what it is, TrainConfig overrides). Everything not overridden is TrainConfig's default.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "curriculum": ("forward KL, w_div cosine 0.9 → 0.1 (the default; with the hidden-state loss where the shards "
                   "hold teacher hidden states, as every logit-based configuration)", {}),
    "no_hidden": ("the default without the hidden-state loss", {"hidden_weight": 0.0}),
    "ce": ("CE on the teacher's tokens only: sequence-level KD, uses only its text", {"signal": "text"}),
    "kd": ("forward KL only (w_div = 1)", {"curriculum": "constant", "divergence_start": 1.0, "divergence_end": 1.0}),
    "mix": ("classic constant mix 0.5·CE + 0.5·KL", {"curriculum": "constant", "divergence_start": 0.5, "divergence_end": 0.5}),
    "linear": ("forward KL, w_div linear 0.9 → 0.1", {"curriculum": "linear"}),
    "step": ("forward KL, w_div in 4 steps 0.9 → 0.1", {"curriculum": "step"}),
    "reverse_kl": ("reverse KL (mode-seeking), cosine curriculum", {"divergence": "reverse_kl"}),
    "jsd": ("generalised JSD, β = 0.5, cosine curriculum", {"divergence": "jsd", "beta": 0.5}),
    "skew_kl": ("skew forward KL, α = 0.1, cosine curriculum", {"divergence": "skew_kl", "alpha": 0.1}),
    "taid": ("TAID interpolated target, cosine curriculum", {"divergence": "taid"}),
    "tail": ("forward KL with the teacher's out-of-vocabulary mass as a class", {"tail": True}),
    "t2": ("forward KL at temperature 2 (× T²), cosine curriculum", {"temperature": 2.0}),
    "heads": ("classifier heads on all-MiniLM-L6-v2: one softmax per enum field on the teacher's decision points, "
              "cosine curriculum", {"student": "heads"}),
}

# Set once for the whole comparison, so that every configuration gets the same data and budget.
SHARED = ("preset", "seed", "max_steps", "epochs", "limit_train")
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
RESERVED = {"sizes"}  # out/sizes/ holds the data-efficiency runs


class CompareError(UserError):
    """A comparison that cannot run as asked (unknown configuration, bad plan file); one line."""


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


# ---- rendering -----------------------------------------------------------------------------------
def _style(i: int, marker: bool = False) -> dict[str, Any]:
    # Ten colours, then the same colours dashed: twelve configurations stay distinguishable; equal
    # accuracies overlap exactly, and distinct markers keep the line underneath visible.
    style = {"color": f"C{i % 10}", "ls": "-" if i < 10 else "--"}
    return {**style, "marker": "osD^v<>p*hXP"[i % 12], "ms": 5, "alpha": 0.85} if marker else style


def plot_curves(runs: list[tuple[str, Path]], path: Path) -> str:
    """2x2 PNG, one line per configuration: held-out exact match and token accuracy at each
    epoch's evaluation, and the training loss and CE per step (smoothed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8), dpi=110)
    (a_exact, a_tok), (a_loss, a_ce) = fig.subplots(2, 2)
    for i, (name, run_dir) in enumerate(runs):
        steps, evals = read_metrics(run_dir / "metrics.jsonl")
        ex = [r["step"] for r in evals]
        a_exact.plot(ex, [r["val_exact_match"] for r in evals], label=name, **_style(i, marker=True))
        a_tok.plot(ex, [r["val_token_acc"] for r in evals], label=name, **_style(i, marker=True))
        x = [r["step"] for r in steps]
        window = max(len(steps) // 25, 1)
        for ax, key in ((a_loss, "loss"), (a_ce, "ce")):
            y = smooth([r[key] for r in steps], window) if steps else []
            ax.plot(x, y, lw=1.2, label=name, **_style(i))
    a_exact.set(title="held-out exact match (each epoch end)", xlabel="step", ylim=(-0.02, 1.02))
    a_tok.set(title="held-out token accuracy, teacher-forced (each epoch end)", xlabel="step", ylim=(-0.02, 1.02))
    a_loss.set(title="training loss per step (each its own objective; smoothed)", xlabel="step")
    a_ce.set(title="training CE on the teacher's token per step (smoothed)", xlabel="step")
    for ax in (a_loss, a_ce):
        lines = [v for line in ax.get_lines() for v in line.get_ydata() if v > 0]
        if lines and max(lines) / min(lines) > 30:
            ax.set_yscale("log")
    for ax in (a_exact, a_tok, a_loss, a_ce):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2 if len(runs) > 6 else 1)
    return save_plot(fig, Path(path))


def plot_efficiency(eff: dict[str, list[dict]], path: Path) -> str:
    """Held-out exact match and token accuracy against training examples, one line per configuration."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(12, 4.5), dpi=110)
    a_exact, a_tok = fig.subplots(1, 2)
    sizes = sorted({p["examples"] for points in eff.values() for p in points})
    for i, (name, points) in enumerate(eff.items()):
        n = [p["examples"] for p in points]
        a_exact.plot(n, [p["exact_match"] for p in points], label=name, **_style(i, marker=True))
        a_tok.plot(n, [p["token_acc"] for p in points], label=name, **_style(i, marker=True))
    for ax, what in ((a_exact, "held-out exact match"), (a_tok, "held-out token accuracy")):
        ax.set(title=f"{what} vs training examples", xlabel="training examples (log scale)", xscale="log",
               ylim=(-0.02, 1.02))
        # Ticks at the sizes trained: the log axis would otherwise label them 3×10¹ and so on.
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_plot(fig, Path(path))


def _efficiency_md(eff: dict[str, list[dict]], reference: str = "ce") -> list[str]:
    sizes = sorted({p["examples"] for points in eff.values() for p in points})
    lines = ["## Accuracy vs training examples", "", "Held-out exact match; every run has the same step budget.", "",
             "| configuration | " + " | ".join(str(n) for n in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for name, points in eff.items():
        at = {p["examples"]: p["exact_match"] for p in points}
        lines.append(f"| {name} | " + " | ".join(pct(at.get(n)) for n in sizes) + " |")
    if reference in eff and len(eff) > 1:
        best = eff[reference][-1]
        target = best["exact_match"]
        lines += ["", f"Examples each configuration needs to match `{reference}` with all {best['examples']} examples "
                  f"({pct(target)}):", ""]
        for name, points in eff.items():
            hit = next((p["examples"] for p in points if p["exact_match"] >= target), None)
            lines.append(f"- {name}: {hit if hit is not None else 'not reached'}")
    return lines + ["", "![accuracy vs training examples](efficiency.png)", ""]


def _verdict_md(v: dict[str, Any], n: int) -> str:
    if v["margin"] > 0:
        head = (f"**Winner: {v['winner']}**, {100 * v['margin']:+.2f} points of held-out exact match over "
                f"{v['runner_up']}")
    elif v["token_margin"] > 0:
        head = (f"**Winner: {v['winner']}**, tied with {v['runner_up']} on held-out exact match and "
                f"{100 * v['token_margin']:+.2f} points ahead on teacher-forced token accuracy")
    else:
        head = f"**Winner: {v['winner']}**, tied with {v['runner_up']} on both held-out accuracies"
    noisy = v["margin"] < 2 * v["margin_se"]
    return (f"{head}. One standard error of the exact-match difference on {n} held-out examples is about "
            f"{100 * v['margin_se']:.2f} points" + (": within noise." if noisy else "."))


def peer_rows(shards: ShardSet, limit_train: int | None, progress: bool) -> list[dict] | None:
    """The peers (peers.py) on the same training examples and held-out split; None (said) when
    the task has fields they cannot answer."""
    try:
        return score_peers(shards.dir, limit_train=limit_train, progress=progress)
    except PeerError as e:
        say(f"no peers: {e}", progress)
        return None


def markdown(result: dict[str, Any]) -> str:
    rows = result["runs"]
    field_names = list(rows[0]["field_agreement"])
    budget = f"{result['max_steps']} steps" if result["max_steps"] else f"{result['epochs']} epochs"
    lines = ["# Distillation methods compared", "",
             f"Shards `{result['data']}` ({result['n_train']} training examples, {rows[0]['val_examples']} held-out scored); "
             f"student preset `{result['preset']}`, seed {result['seed']}, {budget} each.", "",
             "| configuration | held-out exact match | token accuracy | " + " | ".join(field_names)
             + " | train loss | train divergence | train CE | steps | wall time |",
             "|---|" + "---:|" * (len(field_names) + 7)]
    for r in rows:
        div = "—" if r["train_divergence"] is None else f"{r['train_divergence']:.4f}"
        lines.append(f"| {r['name']} | {pct(r['exact_match'])} | {pct(r['token_acc'])} | "
                     + " | ".join(pct(r["field_agreement"][f]) for f in field_names)
                     + f" | {r['train_loss']:.4f} | {div} | {r['train_ce']:.4f} | {r['steps']} | {r['wall_s']:.1f} s |")
    for p in result.get("peers") or []:
        lines.append(f"| peer: {p['name']} | {pct(p['exact_match'])} | — | "
                     + " | ".join(pct(p["fields"][f]) for f in field_names) + " | — | — | — | — | "
                     f"{p['fit_s']:.1f} s |")
    v = result["verdict"]
    lines.append("")
    if v["runner_up"] is None:
        lines.append(f"Only one configuration: **{v['winner']}**.")
    else:
        lines.append(_verdict_md(v, rows[0]["val_examples"]))
    lines += ["", "Held-out numbers are from each run's last evaluation, training numbers from its last step. "
              "Train loss is each configuration's own objective (w_div·D + (1 − w_div)·CE) and is not comparable "
              "across rows; train CE (on the teacher's token) is. Peer rows are the obvious alternatives, trained on "
              "the same teacher answers and scored on the same held-out inputs: TF-IDF n-grams and frozen "
              "all-MiniLM-L6-v2 embeddings, each with one logistic regression per field.", "",
              "| configuration | what it is |", "|---|---|"]
    lines += [f"| {r['name']} | {r['description']} |" for r in rows]
    lines += ["", "![learning curves](curves.png)", ""]
    if result.get("efficiency"):
        lines += _efficiency_md(result["efficiency"])
    return "\n".join(lines)


# ---- the comparison ------------------------------------------------------------------------------
def compare(data_dir: Path, out_dir: Path, configs: list[str] | list[dict], preset: str = "micro",
            max_steps: int | None = None, epochs: int | None = None, seed: int = 0, sizes: list[int] | None = None,
            progress: bool = True, limit_train: int | None = None, common: dict[str, Any] | None = None,
            sizes_for: list[str] | None = None) -> dict:
    """Train each configuration on the same shards, preset, seed and budget; write the report.

    configs: registry names (CONFIGS) or plan entries {name, base?, TrainConfig fields}; `common`
    holds TrainConfig fields for every run (e.g. batch_size, lr, eval_limit), under each run's own.
    sizes_for: the configurations that get the accuracy-vs-data curve (default: all of them).
    Returns what compare.json holds.
    """
    if max_steps is not None and epochs is not None:
        raise CompareError("give a step budget (--max-steps) or --epochs, not both")
    shards, out = ShardSet(data_dir), Path(out_dir)
    n_train, n_val = split_counts(shards)
    if n_val == 0:
        raise CompareError(f"shard folder {shards.dir}: no held-out (val) examples to compare on")
    budget = {"max_steps": max_steps} if max_steps is not None else {"epochs": epochs or TrainConfig.epochs}
    shared = {"preset": preset, "seed": seed, "limit_train": limit_train, **budget}
    runs = build_runs(configs, shared, dict(common or {}))
    if not shards.has_logits:
        needs = [name for name, _, cfg in runs if cfg.signal != "text"]
        if needs:
            raise CompareError(f"shard folder {shards.dir}: text-only shards have no teacher logits, which "
                               f"{', '.join(needs)} need; compare ce (text) configurations only")
    if sizes and any(not isinstance(n, int) or n < 1 for n in sizes):
        raise CompareError(f"sizes {sizes}: expected positive numbers of training examples")
    names = [name for name, _, _ in runs]
    unknown = [name for name in sizes_for or [] if name not in names]
    if unknown:
        raise CompareError(f"sizes for {', '.join(unknown)}: not among the configurations compared ({', '.join(names)})")
    used = min(limit_train or n_train, n_train)
    rows = []
    for i, (name, what, cfg) in enumerate(runs):
        say(f"[{i + 1}/{len(runs)}] {name}: {what}", progress)
        train_once(shards.dir, out / name, cfg, progress)
        rows.append({"name": name, "description": what, "dir": str(out / name), "config": cfg.to_dict(),
                     **summarise(out / name)})
    result = {"data": str(shards.dir), "preset": preset, "seed": seed, "max_steps": max_steps,
              "epochs": budget.get("epochs"), "limit_train": limit_train, "n_train": used, "n_val": n_val,
              "runs": rows, "verdict": verdict(rows), "efficiency": None,
              "plots": [plot_curves([(r["name"], Path(r["dir"])) for r in rows], out / "curves.png")]}
    result["peers"] = peer_rows(shards, limit_train, progress)
    if sizes:
        curve = [r for r in runs if sizes_for is None or r[0] in sizes_for]
        result["efficiency"] = efficiency(shards.dir, out, curve, sorted(set(sizes)), used, progress)
        result["plots"].append(plot_efficiency(result["efficiency"], out / "efficiency.png"))
    atomic_write_json(out / "compare.json", result)
    atomic_write_bytes(out / "compare.md", markdown(result).encode())
    return result


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
