"""Is distilling worth it, and how big a corpus does it need? The runs behind `microdistill cost`.

    microdistill cost runs/demo --calls-per-day 20000
    microdistill cost --measure --input sample.jsonl --preset small --corpus-size 1000000
    microdistill cost runs/demo --target-agreement 0.9   # trains a pilot at 25/50/100% of the shards

Extraction and training are both linear in the number of examples, so a short measured run
predicts a long one (the way a pilot's throughput once put a full distillation at 270 h of
extraction and 2,600 h of training): `measure_throughput` times a small extraction and a few
training steps, which plan/cost.py scales. Quality is not linear: `pilot` trains on fractions of
a small extracted set and plan/forecast.py fits the learning curve to them. `cost_analysis`
runs what was asked, prices it and writes cost.json, cost.png and forecast.png.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from microdistill.data.shards import ShardSet
from microdistill.extract import ExtractConfig, extract
from microdistill.data.samples import sample_corpus
from microdistill.plan.cost import Analysis, CostConfig, PilotConfig, analyse
from microdistill.plan.forecast import forecast, plan_from_forecast
from microdistill.plan.measured import CostError, RunFiles, Throughput, throughput_from_logs
from microdistill.report.cost import plot_forecast, write_cost
from microdistill.train import TrainConfig, held_out_exact, train_once, train_sizes


def measure_throughput(corpus: Path, out_dir: Path, extract_config: ExtractConfig, *, preset: str = PilotConfig.preset,
                       sample: int = PilotConfig.sample, train_steps: int = PilotConfig.train_steps) -> Throughput:
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
                      preset: str = PilotConfig.preset) -> dict:
    """Forecast from given pilot points, or from a pilot trained on `shards`; writes forecast.png."""
    if points is None:
        if shards is None:
            raise CostError("a forecast needs pilot results: pass a run folder or --shards to train a pilot, or --points")

        points = pilot(shards, Path(out_dir) / "pilot", config=TrainConfig(preset=preset))
    fc = forecast(points, target)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fc["plot"] = str(plot_forecast(fc, Path(out_dir) / "forecast.png"))
    return fc


def cost_analysis(run_dir: Path | None, cfg: CostConfig, out: Path | None = None, *, shards: Path | None = None,
                  student: Path | None = None, report: Path | None = None, measure: ExtractConfig | None = None,
                  corpus: Path | None = None, preset: str = PilotConfig.preset, sample: int = PilotConfig.sample,
                  train_steps: int = PilotConfig.train_steps, target_agreement: float | None = None,
                  points: list[tuple[int, float]] | None = None) -> Analysis:
    """The whole `cost` verb: measure throughput on a sample if asked (`measure`: what to
    extract; `corpus`: from where, default the packaged sample comments), forecast the corpus a
    target agreement needs if asked, then the break-even analysis, written to `out` (default
    RUN/cost, or ./cost without a run folder): cost.json, cost.png, forecast.png."""
    out = Path(out) if out is not None else Path(run_dir) / "cost" if run_dir else Path("cost")
    throughput = None
    if measure is not None:
        throughput = measure_throughput(corpus or sample_corpus(), out / "measure", measure, preset=preset,
                                        sample=sample, train_steps=train_steps)
        shards = shards or out / "measure" / "shards"
    files = RunFiles.resolve(run_dir, shards=shards, student=student, report=report)
    fc = None
    if target_agreement is not None:
        fc = learning_forecast(files.shards, out, target_agreement, points, preset=preset)
        cfg = plan_from_forecast(cfg, fc)
    return write_cost(analyse(files, cfg, throughput=throughput, forecast=fc), out)
