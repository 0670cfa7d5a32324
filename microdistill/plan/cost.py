"""Is distilling worth it? The price model: break-even of a student against the teacher it replaces.

    microdistill cost runs/demo --calls-per-day 20000
    microdistill cost runs/demo --calls-per-day 20000 --corpus-size 1000000   # plan a bigger corpus

The teacher's cost per call comes from an API price (tokens per call measured with the
teacher's tokenizer over the task prompt and the shards' outputs) or from measured local
latency x a machine price. The one-off cost of distilling is the extraction and training
wall time of a finished run x a machine price, or an estimate for a planned corpus from the
throughput measured on a small one (`estimate_time`). The student's cost per call is its
measured latency x a machine price. All prices are inputs; the defaults are examples.
What the run measured is read by measured.py; this module only prices it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from microdistill.core.options import Options, option
from microdistill.data.shards import VAL_FRACTION
from microdistill.students.decoder.config import DEFAULT_PRESET
from microdistill.plan.measured import (
    CostError, RunFiles, Throughput, api_call_tokens, measure_call_tokens, need, throughput_from_logs,
)

DAYS_PER_YEAR = 365


# ---- inputs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostConfig(Options):
    """Every price and rate of the analysis; field names are the CLI flags (`_` -> `-`).

    Default prices are examples (a small cloud CPU VM; a small hosted model's API price),
    not claims about any provider: pass your own.
    """

    calls_per_day: float = option(10_000, help="Calls per day the student would take over (example default).")
    machine_usd_per_hour: float = option(0.10, help=(
        "Machine price for training and the student; example default: a small cloud CPU VM."))
    teacher_machine_usd_per_hour: float | None = option(None, help=(
        "Machine price for extraction and a local teacher (default: --machine-usd-per-hour)."))
    teacher_pricing: Literal["api", "local"] = option("api", help=(
        "Teacher cost per call: 'api' (token prices) or 'local' (measured speed x machine price)."))
    api_usd_per_m_input: float = option(0.15, help="API price per million input tokens (example default).")
    api_usd_per_m_output: float = option(0.60, help="API price per million output tokens (example default).")
    input_tokens: float | None = option(None, help="Input tokens per call (default: measured from the shards' task prompt).")
    output_tokens: float | None = option(None, help="Output tokens per call (default: mean output length in the shards).")
    teacher_usd_per_call: float | None = option(None, help=(
        "A known teacher cost per call (overrides the pricing above)."))
    student_usd_per_call: float | None = option(None, help="A known student cost per call (overrides the measured one).")
    basis: Literal["latency", "throughput"] = option("latency", help=(
        "Measured speed to price: 'latency' (p50, batch 1) or 'throughput' (batched)."))
    corpus_size: int | None = option(None, help=(
        "Plan this many teacher-labelled examples instead of the run's: estimate the one-off cost from throughput."))
    epochs: float | None = option(None, help="Epochs for the planned corpus (default: the measured run's).")

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not (math.isfinite(v) and v > 0):
                raise CostError(f"--{f.name.replace('_', '-')} must be a positive number, got {v:g}")
        if self.teacher_pricing not in ("api", "local"):
            raise CostError(f"--teacher-pricing must be 'api' or 'local', got {self.teacher_pricing!r}")
        if self.basis not in ("latency", "throughput"):
            raise CostError(f"--basis must be 'latency' or 'throughput', got {self.basis!r}")

    @property
    def teacher_usd_per_hour(self) -> float:
        return self.teacher_machine_usd_per_hour or self.machine_usd_per_hour


@dataclass(frozen=True)
class PilotConfig(Options):
    """The small runs the analysis trains when asked: a sample to time (--measure) and a pilot to
    forecast from (--target-agreement without --points)."""

    preset: str = option(DEFAULT_PRESET, help="Student preset for --measure and the pilot.")
    sample: int = option(128, help="Inputs to extract for --measure.")
    train_steps: int = option(20, help="Training steps to time for --measure.")


# ---- per-call costs --------------------------------------------------------------------------
@dataclass(frozen=True)
class PerCall:
    usd: float
    basis: str  # how the figure was obtained, for the table


def api_usd_per_call(input_tokens: float, output_tokens: float, usd_per_m_input: float, usd_per_m_output: float) -> float:
    return (input_tokens * usd_per_m_input + output_tokens * usd_per_m_output) / 1e6


def machine_usd(usd_per_hour: float, seconds: float) -> float:
    """The price of `seconds` of a machine rented at `usd_per_hour`."""
    return usd_per_hour * seconds / 3600.0


def speed_usd_per_call(speed: dict, who: str, usd_per_hour: float, basis: str, path: Path) -> PerCall:
    """Cost per call from an evaluation report's `speed.<who>` at batch 1 or batched."""
    if basis == "latency":
        ms = need(speed, f"{who}.p50_ms", path)
        return PerCall(machine_usd(usd_per_hour, ms / 1000), f"p50 latency {ms:.1f} ms x ${usd_per_hour:g}/h")
    per_s = need(speed, f"{who}.per_s", path)
    return PerCall(machine_usd(usd_per_hour, 1 / per_s), f"batched {per_s:.1f}/s x ${usd_per_hour:g}/h")


def teacher_per_call(cfg: CostConfig, files: RunFiles, speed: tuple[dict, Path] | None) -> PerCall:
    if cfg.teacher_usd_per_call is not None:
        return PerCall(cfg.teacher_usd_per_call, "given")
    if cfg.teacher_pricing == "api":
        n_in, n_out = cfg.input_tokens, cfg.output_tokens
        if n_in is None or n_out is None:
            if files.shards is None:
                raise CostError("tokens per call unknown: pass a run folder, --shards, or --input-tokens and --output-tokens")
            m_in, m_out = api_call_tokens(files.shards) or measure_call_tokens(files.shards)
            n_in, n_out = n_in or m_in, n_out or m_out
        usd = api_usd_per_call(n_in, n_out, cfg.api_usd_per_m_input, cfg.api_usd_per_m_output)
        return PerCall(usd, f"API: {n_in:.0f} in x ${cfg.api_usd_per_m_input:g}/M + {n_out:.1f} out x ${cfg.api_usd_per_m_output:g}/M")
    if speed is not None and isinstance(speed[0].get("teacher"), dict):
        return speed_usd_per_call(speed[0], "teacher", cfg.teacher_usd_per_hour, cfg.basis, speed[1])
    # Teacher not timed in an evaluation: its batched extraction throughput is its measured speed.
    manifest, path = files.manifest()
    per_s = need(manifest, "timings.examples_per_s", path)
    return PerCall(machine_usd(cfg.teacher_usd_per_hour, 1 / per_s),
                   f"extraction {per_s:.1f}/s x ${cfg.teacher_usd_per_hour:g}/h")


def student_per_call(cfg: CostConfig, speed: tuple[dict, Path] | None) -> PerCall:
    if cfg.student_usd_per_call is not None:
        return PerCall(cfg.student_usd_per_call, "given")
    if speed is None:
        raise CostError("student cost per call unknown: pass a run folder with eval/report.json, --report, or --student-usd-per-call")
    return speed_usd_per_call(speed[0], "student", cfg.machine_usd_per_hour, cfg.basis, speed[1])


# ---- one-off cost: measured, or estimated from throughput ------------------------------------
@dataclass(frozen=True)
class Estimate:
    corpus_size: int
    epochs: float
    extract_s: float
    train_s: float


def estimate_time(corpus_size: int, throughput: Throughput, epochs: float | None = None,
                  val_fraction: float = VAL_FRACTION) -> Estimate:
    """Extraction and training seconds for `corpus_size` inputs that reach the teacher.

    Extraction labels all of them; training passes over the train split (`1 - val_fraction`
    of them) once per epoch.
    """
    if isinstance(corpus_size, bool) or not isinstance(corpus_size, int) or corpus_size <= 0:
        raise CostError(f"--corpus-size must be a positive integer, got {corpus_size}")
    epochs = throughput.epochs if epochs is None else epochs
    if not (math.isfinite(epochs) and epochs > 0):
        raise CostError(f"--epochs must be a positive number, got {epochs}")
    extract_s = corpus_size / throughput.extract_examples_per_s
    train_s = corpus_size * (1 - val_fraction) * epochs / throughput.train_examples_per_s
    return Estimate(corpus_size, epochs, extract_s, train_s)


@dataclass(frozen=True)
class OneOff:
    usd: float
    extract_s: float
    train_s: float
    basis: str
    estimate: Estimate | None = None


def priced_one_off(cfg: CostConfig, extract_s: float, train_s: float, basis: str,
                   estimate: Estimate | None = None) -> OneOff:
    """Extraction at the teacher's machine price plus training at the machine price."""
    usd = machine_usd(cfg.teacher_usd_per_hour, extract_s) + machine_usd(cfg.machine_usd_per_hour, train_s)
    return OneOff(usd, extract_s, train_s, basis, estimate)


def estimated_one_off(cfg: CostConfig, throughput: Throughput) -> OneOff:
    est = estimate_time(cfg.corpus_size, throughput, cfg.epochs)
    return priced_one_off(cfg, est.extract_s, est.train_s, f"estimate for {cfg.corpus_size:,} examples", est)


def measured_one_off(cfg: CostConfig, files: RunFiles) -> OneOff:
    """Extraction + training wall time of a finished run x machine prices."""
    return priced_one_off(cfg, *files.stage_seconds())


# ---- the analysis -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Analysis:
    config: CostConfig
    teacher: PerCall
    student: PerCall
    one_off: OneOff
    forecast: dict | None = None  # from forecast.py's forecast(), when a target agreement was asked
    plot: str | None = None  # path of the cumulative-cost PNG, once written
    notes: list[str] = field(default_factory=list)

    @property
    def teacher_per_day(self) -> float:
        return self.teacher.usd * self.config.calls_per_day

    @property
    def student_per_day(self) -> float:
        return self.student.usd * self.config.calls_per_day

    @property
    def saving_per_day(self) -> float:
        return self.teacher_per_day - self.student_per_day

    @property
    def break_even_days(self) -> float | None:
        """Days until the one-off cost is paid back; None when the student never pays back."""
        return self.one_off.usd / self.saving_per_day if self.saving_per_day > 0 else None

    @property
    def break_even_calls(self) -> float | None:
        saving_per_call = self.teacher.usd - self.student.usd
        return self.one_off.usd / saving_per_call if saving_per_call > 0 else None

    @property
    def first_year_saving(self) -> float:
        """Net of the one-off cost: negative when a year does not pay it back."""
        return DAYS_PER_YEAR * self.saving_per_day - self.one_off.usd

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "teacher": asdict(self.teacher),
            "student": asdict(self.student),
            "one_off": asdict(self.one_off),
            "teacher_usd_per_day": self.teacher_per_day,
            "student_usd_per_day": self.student_per_day,
            "saving_usd_per_day": self.saving_per_day,
            "break_even_days": self.break_even_days,
            "break_even_calls": self.break_even_calls,
            "first_year_saving_usd": self.first_year_saving,
            "forecast": self.forecast,
            "plot": self.plot,
            "notes": self.notes,
        }


def analyse(files: RunFiles, cfg: CostConfig = CostConfig(), speed: dict | None = None,
            throughput: Throughput | None = None, forecast: dict | None = None) -> Analysis:
    """The break-even analysis of `files` under `cfg`.

    `speed` is an evaluation report's `speed` section, for a caller that has it in memory
    before report.json exists; `throughput` a measured one for a planned `cfg.corpus_size`
    (default: the run's own, from its logs).
    """
    if throughput is not None and cfg.corpus_size is None:
        raise CostError("a measured throughput plans a corpus: pass --corpus-size or a reachable --target-agreement")
    spd = (speed, Path("evaluation speed")) if speed is not None else files.speed()
    teacher = teacher_per_call(cfg, files, spd)
    student = student_per_call(cfg, spd)
    if cfg.corpus_size is not None:
        if throughput is None:
            if files.shards is None or files.student is None:
                raise CostError("no throughput to estimate from: pass a run folder, --shards and --student, or --measure")
            throughput = throughput_from_logs(files.shards, files.student)
        one_off = estimated_one_off(cfg, throughput)
    else:
        one_off = measured_one_off(cfg, files)
    notes = []
    if student.usd >= teacher.usd:
        notes.append("the student costs at least as much per call as the teacher: it never pays back")
    return Analysis(cfg, teacher, student, one_off, forecast=forecast, notes=notes)
