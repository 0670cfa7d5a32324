"""Planning before paying the teacher: how long a big corpus takes, and how big it must be.

    microdistill cost --measure --input sample.jsonl --preset small --corpus-size 1000000 ...
    microdistill cost runs/pilot --target-agreement 0.9 --pilot ...

Extraction and training are both linear in the number of examples, so a short measured run
predicts a long one (the way a pilot's throughput once put a full distillation at 270 h of
extraction and 2,600 h of training): `measure_throughput` times a small extraction and a few
training steps, `estimate_time` scales them. Quality is not linear: student error against the
teacher falls roughly as a power of the number of teacher-labelled examples, so `pilot` trains
on fractions of a small extracted set and `forecast` fits error(n) = a * n^(-b) to say how many
examples reach a target agreement.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from microdistill.plan.cost import Analysis, CostConfig, CostError, RunFiles, Throughput, analyse, throughput_from_logs
from microdistill.extract import ExtractConfig, extract
from microdistill.core.files import save_figure
from microdistill.report.evaluation import write_cost
from microdistill.data.shards import VAL_FRACTION, ShardSet
from microdistill.train import TrainConfig, held_out_exact, train_once, train_sizes

# A perfect score on a small held-out set only says the error is below that set's resolution;
# flooring it keeps log(error) finite without letting one point dominate the fit.
ERROR_FLOOR = 1e-3
# Beyond this many examples a forecast says nothing useful about a teacher budget.
MAX_FORECAST_N = 1e12


def plan_from_forecast(cfg: CostConfig, fc: dict) -> CostConfig:
    """Plan the corpus a forecast asks for, when no corpus size was given.

    The forecast counts training examples; the teacher also labels the held-out split.
    """
    if cfg.corpus_size is not None or not fc.get("reachable"):
        return cfg
    return replace(cfg, corpus_size=math.ceil(fc["n_needed"] / (1 - VAL_FRACTION)))


def measure_throughput(corpus: Path, out_dir: Path, extract_config: ExtractConfig, *, preset: str = "micro",
                       sample: int = 128, train_steps: int = 20) -> Throughput:
    """Time a short extraction of `sample` inputs and `train_steps` training steps.

    The sample's shards and student stay in `out_dir` (`shards/`, `student/`), so a second
    call reuses them instead of paying the teacher again.
    """
    for name, v in (("--sample", sample), ("--train-steps", train_steps)):
        if v <= 0:
            raise CostError(f"{name} must be a positive integer, got {v}")
    out_dir = Path(out_dir)
    shards, student = out_dir / "shards", out_dir / "student"
    extract(Path(corpus), shards, replace(extract_config, limit=sample))
    train_once(shards, student, TrainConfig(preset=preset, max_steps=train_steps))
    return throughput_from_logs(shards, student)


# ---- quality ------------------------------------------------------------------------------------
def fit_learning_curve(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(a, b) of error(n) = a * n^(-b), least squares on log(error) = log(a) - b log(n).

    `points` are (training examples, agreement with the teacher in [0, 1]).
    """
    if len({n for n, _ in points}) < 2:
        raise CostError(f"a learning curve needs points at two or more training sizes, got {len(points)} point(s)")
    for n, acc in points:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise CostError(f"learning-curve point size must be a positive integer, got {n!r}")
        if not 0.0 <= acc <= 1.0:
            raise CostError(f"learning-curve point agreement must be in [0, 1], got {acc!r} at n={n}")
    n = np.array([p[0] for p in points], dtype=np.float64)
    err = np.clip(1.0 - np.array([p[1] for p in points], dtype=np.float64), ERROR_FLOOR, 1.0)
    design = np.stack([np.ones_like(n), np.log(n)], axis=1)
    (log_a, slope), *_ = np.linalg.lstsq(design, np.log(err), rcond=None)
    return float(np.exp(log_a)), float(-slope)


def forecast(points: list[tuple[int, float]], target: float) -> dict:
    """How many teacher-labelled training examples reach `target` agreement.

    Returns {a, b, target, n_needed (int, or None), reachable, points}. Not reachable when the
    fitted error does not fall with more data (b <= 0) or only beyond MAX_FORECAST_N examples.
    """
    if not 0.0 < target < 1.0:
        raise CostError(f"--target-agreement must be between 0 and 1 (exclusive), got {target}")
    a, b = fit_learning_curve(points)
    n_needed = None
    if b > 0:
        n = (a / (1.0 - target)) ** (1.0 / b) if a > 1.0 - target else 1.0
        # Round first so float noise in an exact fit cannot push ceil() one example up.
        n_needed = math.ceil(round(n, 6)) if n <= MAX_FORECAST_N else None
    return {
        "a": a, "b": b, "target": target, "n_needed": n_needed, "reachable": n_needed is not None,
        "points": [[int(n), float(acc)] for n, acc in points],
    }


def plot_forecast(fc: dict, path: Path) -> Path:
    """PNG of the pilot's points and the fitted curve, as agreement against examples (log x)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in servers and tests
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ns = [p[0] for p in fc["points"]]
    hi = max(ns) * 4 if fc["n_needed"] is None else max(max(ns), fc["n_needed"]) * 1.5
    x = np.geomspace(min(ns) / 2, hi, 200)
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    ax.plot(x, 1.0 - np.minimum(fc["a"] * x ** (-fc["b"]), 1.0), label=f"fit: error = {fc['a']:.3g} n^-{fc['b']:.3g}")
    ax.scatter(ns, [p[1] for p in fc["points"]], color="black", zorder=3, label="pilot")
    ax.axhline(fc["target"], color="grey", linestyle="--", label=f"target {fc['target']:.1%}")
    if fc["n_needed"] is not None:
        ax.axvline(fc["n_needed"], color="grey", linestyle=":", label=f"{fc['n_needed']:,} examples")
    ax.set_xscale("log")
    # Labels at 1-2-5 steps: matplotlib's default labels either only decades or overlapping minors.
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("teacher-labelled training examples")
    ax.set_ylabel("agreement with the teacher (exact match)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save_figure(fig, path)


def pilot(data_dir: Path, out_dir: Path, fractions: tuple[float, ...] = (0.25, 0.5, 1.0), config=None,
          progress: bool = True) -> list[tuple[int, float]]:
    """Train one student per fraction of the train split; (examples, held-out exact match) each.

    Students land in `out_dir/n<examples>/`; a finished one is reused, so an interrupted pilot
    continues. `config` is a `TrainConfig` (its `limit_train` is set per fraction).
    """
    if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
        raise CostError(f"pilot fractions must be in (0, 1], got {list(fractions)}")
    n_train = int(ShardSet(data_dir).manifest.get("counts", {}).get("train", 0))
    if n_train < 2 * len(fractions):
        raise CostError(f"shard folder {data_dir}: {n_train} training examples are too few for a pilot")
    sizes = [max(1, round(f * n_train)) for f in fractions]
    points = train_sizes(data_dir, config or TrainConfig(), sizes, lambda n: Path(out_dir) / f"n{n}", progress)
    return [(p["examples"], held_out_exact(Path(p["dir"]))) for p in points]


def learning_forecast(shards: Path, out_dir: Path, target: float, points: list[tuple[int, float]] | None = None,
                      preset: str = "micro") -> dict:
    """Forecast from given pilot points, or from a pilot trained on `shards`; writes forecast.png."""
    if points is None:
        if shards is None:
            raise CostError("a forecast needs pilot results: pass a run folder or --shards to train a pilot, or --points")

        points = pilot(shards, Path(out_dir) / "pilot", config=TrainConfig(preset=preset))
    fc = forecast(points, target)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fc["plot"] = str(plot_forecast(fc, Path(out_dir) / "forecast.png"))
    return fc


def parse_points(text: str) -> list[tuple[int, float]]:
    """'250:0.61,500:0.72' -> [(250, 0.61), (500, 0.72)]."""
    try:
        return [(int(n), float(acc)) for n, acc in (item.split(":") for item in text.split(",") if item.strip())]
    except ValueError:
        raise CostError(f"--points {text!r}: expected examples:agreement pairs, e.g. 250:0.61,500:0.72") from None


def cost_analysis(run_dir: Path | None, cfg: CostConfig, out: Path, *, shards: Path | None = None,
                  student: Path | None = None, report: Path | None = None, measure: ExtractConfig | None = None,
                  corpus: Path | None = None, preset: str = "micro", sample: int = 128, train_steps: int = 20,
                  target_agreement: float | None = None, points: list[tuple[int, float]] | None = None) -> Analysis:
    """The whole `cost` verb: measure throughput on a sample if asked (`measure`: what to
    extract; `corpus`: from where), forecast the corpus a target agreement needs if asked,
    then the break-even analysis, written to `out` (cost.json, cost.png, forecast.png)."""
    throughput = None
    if measure is not None:
        throughput = measure_throughput(corpus, out / "measure", measure, preset=preset, sample=sample,
                                        train_steps=train_steps)
        shards = shards or out / "measure" / "shards"
    files = RunFiles.resolve(run_dir, shards=shards, student=student, report=report)
    fc = None
    if target_agreement is not None:
        fc = learning_forecast(files.shards, out, target_agreement, points, preset=preset)
        cfg = plan_from_forecast(cfg, fc)
    return write_cost(analyse(files, cfg, throughput=throughput, forecast=fc), out)
