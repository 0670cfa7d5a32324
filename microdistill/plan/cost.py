"""Is distilling worth it? Break-even of a student against the teacher it replaces.

    microdistill cost runs/demo --calls-per-day 20000
    microdistill cost runs/demo --calls-per-day 20000 --corpus-size 1000000   # plan a bigger corpus

The teacher's cost per call comes from an API price (tokens per call measured with the
teacher's tokenizer over the task prompt and the shards' outputs) or from measured local
latency x a machine price. The one-off cost of distilling is the extraction and training
wall time of a finished run x a machine price, or an estimate for a planned corpus from the
throughput measured on a small one (`estimate_time`). The student's cost per call is its
measured latency x a machine price. All prices are inputs; the defaults are examples.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from microdistill.core.options import Options
from microdistill.core.errors import UserError
from microdistill.core.files import read_json as _read_json
from microdistill.data.shards import VAL_FRACTION

DAYS_PER_YEAR = 365
TOKEN_SAMPLE = 200  # examples whose prompts are tokenised to measure tokens per call


class CostError(UserError):
    """A price, rate or run log that cannot be used; the message is one line for the user."""


# ---- inputs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostConfig(Options):
    """Every price and rate of the analysis; field names are the CLI flags (`_` -> `-`).

    Default prices are examples (a small cloud CPU VM; a small hosted model's API price),
    not claims about any provider: pass your own.
    """

    calls_per_day: float = 10_000
    machine_usd_per_hour: float = 0.10
    teacher_machine_usd_per_hour: float | None = None  # None: the same machine price
    teacher_pricing: Literal["api", "local"] = "api"
    api_usd_per_m_input: float = 0.15
    api_usd_per_m_output: float = 0.60
    input_tokens: float | None = None  # None: measured from the shards
    output_tokens: float | None = None
    teacher_usd_per_call: float | None = None  # a known figure overrides everything above
    student_usd_per_call: float | None = None
    basis: Literal["latency", "throughput"] = "latency"
    corpus_size: int | None = None  # plan this many teacher-labelled examples instead of the run's
    epochs: float | None = None  # for a planned corpus; None: the measured run's epochs

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


def read_json(path: Path, what: str) -> dict:
    data = _read_json(path, what, CostError)
    if not isinstance(data, dict):
        raise CostError(f"{path}: expected a JSON object ({what})")
    return data


def need(data: dict, key: str, path: Path) -> float:
    """The positive number at dotted `key` of `data` (read from `path`), or a one-line error."""
    v: Any = data
    for part in key.split("."):
        if not isinstance(v, dict) or part not in v:
            raise CostError(f"{path}: missing key '{key}'")
        v = v[part]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise CostError(f"{path}: '{key}' must be a positive number, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class RunFiles:
    """Where the artefacts are: a run folder's, or explicit paths (which win)."""

    shards: Path | None = None
    student: Path | None = None
    report: Path | None = None
    run_json: Path | None = None

    @classmethod
    def resolve(cls, run: Path | None = None, shards: Path | None = None, student: Path | None = None,
                report: Path | None = None) -> "RunFiles":
        run_json = None
        if run is not None:
            run = Path(run)
            if not run.is_dir():
                raise CostError(f"run folder {run}: not found")
            run_json = run / "run.json"
            if not run_json.is_file():
                raise CostError(f"run folder {run}: no run.json (not a microdistill run folder)")
            shards = shards or run / "shards"
            student = student or run / "student"
            if report is None and (run / "eval" / "report.json").is_file():
                report = run / "eval" / "report.json"
        if report is not None and Path(report).is_dir():
            report = Path(report) / "report.json"
        return cls(shards=shards and Path(shards), student=student and Path(student), report=report, run_json=run_json)

    def manifest(self) -> tuple[dict, Path]:
        if self.shards is None:
            raise CostError("no shard folder: pass a run folder or --shards")
        path = self.shards / "manifest.json"
        return read_json(path, "the shard folder's manifest"), path

    def training(self) -> tuple[dict, Path]:
        if self.student is None:
            raise CostError("no student folder: pass a run folder or --student")
        path = self.student / "training.json"
        return read_json(path, "the student's training log"), path

    def speed(self) -> tuple[dict, Path] | None:
        if self.report is None:
            return None
        path = Path(self.report)
        data = read_json(path, "the evaluation report")
        if "speed" not in data:
            raise CostError(f"{path}: missing key 'speed'")
        return data["speed"], path


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


def measure_call_tokens(shards: Path, sample: int = TOKEN_SAMPLE) -> tuple[float, float]:
    """Mean (prompt, output) teacher tokens per call over the first `sample` shard examples.

    Prompt tokens are the chat-templated task messages (system, few-shot, the input), as an
    API would bill them; output tokens are what the teacher generated, end token included.
    An API model's own tokenizer may count a little differently.
    """
    from microdistill.data.shards import ShardSet, StoreError

    try:
        shard_set = ShardSet(shards)
        task, tok = shard_set.task(), shard_set.tokenizer()
    except StoreError as e:
        raise CostError(f"{e}; pass --input-tokens and --output-tokens instead") from None
    n_in = n_out = n = 0
    for r in shard_set.records():
        prompt = tok.apply_chat_template(task.messages(r.text), tokenize=False, add_generation_prompt=True)
        n_in += len(tok(prompt, add_special_tokens=False)["input_ids"])
        n_out += len(r.output_ids)
        n += 1
        if n >= sample:
            break
    if n == 0:
        raise CostError(f"shard folder {shards}: no examples to measure tokens per call")
    return n_in / n, n_out / n


def api_call_tokens(shards: Path) -> tuple[float, float] | None:
    """Mean (prompt, output) tokens per call as an API teacher's server counted and billed them
    (the shard manifest's `api_usage`, extract_api.py), or None for a local teacher's shards."""
    path = Path(shards) / "manifest.json"
    usage = read_json(path, "the shard folder's manifest").get("api_usage") if path.is_file() else None
    if not usage or not usage.get("calls"):
        return None
    return float(usage["prompt_tokens_per_call"]), float(usage["completion_tokens_per_call"])


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


# ---- time: measured throughput scaled to a corpus ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Throughput:
    """Measured speeds that scale with corpus size."""

    extract_examples_per_s: float  # teacher-labelled examples per second
    train_examples_per_s: float  # training examples x epochs per second
    epochs: float  # epochs of the measured training

    def __post_init__(self) -> None:
        for name in ("extract_examples_per_s", "train_examples_per_s", "epochs"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise CostError(f"throughput {name} must be a positive number, got {v}")


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


def example_epochs(training: dict, tpath: Path, manifest: dict, mpath: Path) -> float:
    """Training examples processed, repeats counted: full epochs plus a partial last one.

    A run cut short by a step budget still logs its last epoch as a whole one, so the steps
    and batch size (when logged) say how far it really got.
    """
    # Training may have used a subset of the train split (limit_train); its log says so.
    n = need(training, "examples", tpath) if "examples" in training else need(manifest, "counts.train", mpath)
    batch, steps = training.get("config", {}).get("batch_size"), training.get("steps")
    if batch and steps:
        full, rest = divmod(int(steps), math.ceil(n / batch))
        return full * n + min(rest * batch, n)
    return n * need(training, "epochs", tpath)


def throughput_from_logs(shards: Path, student: Path) -> Throughput:
    """Steady-state throughput of a finished extraction and training, from their own logs.

    Extraction: the manifest's examples/s (no model loading or calibration). Training: the
    optimiser steps' own time (`train_s`; `wall_s` when absent), so the held-out evaluation
    after each epoch, which a short measurement over-weights, is left out.
    """
    files = RunFiles(shards=Path(shards), student=Path(student))
    manifest, mpath = files.manifest()
    training, tpath = files.training()
    extract_per_s = need(manifest, "timings.examples_per_s", mpath)
    seconds = need(training, "train_s" if "train_s" in training else "wall_s", tpath)
    # The configured epochs, not the logged count: a step-budget measurement runs part of one.
    epochs = training.get("config", {}).get("epochs") or need(training, "epochs", tpath)
    return Throughput(extract_per_s, example_epochs(training, tpath, manifest, mpath) / seconds, float(epochs))


def estimated_one_off(cfg: CostConfig, throughput: Throughput) -> OneOff:
    est = estimate_time(cfg.corpus_size, throughput, cfg.epochs)
    usd = machine_usd(cfg.teacher_usd_per_hour, est.extract_s) + machine_usd(cfg.machine_usd_per_hour, est.train_s)
    return OneOff(usd, est.extract_s, est.train_s, f"estimate for {cfg.corpus_size:,} examples", est)


# ---- one-off cost: measured, or estimated from throughput ------------------------------------
@dataclass(frozen=True)
class OneOff:
    usd: float
    extract_s: float
    train_s: float
    basis: str
    estimate: Estimate | None = None


def measured_one_off(cfg: CostConfig, files: RunFiles) -> OneOff:
    """Extraction + training wall time of a finished run x machine prices."""
    run = read_json(files.run_json, "the run log") if files.run_json else {}
    if run.get("stages", {}).get("extract", {}).get("wall_s") is not None:
        extract_s = need(run, "stages.extract.wall_s", files.run_json)
        train_s = need(run, "stages.train.wall_s", files.run_json)
        basis = f"run log {files.run_json}"
    else:
        manifest, mpath = files.manifest()
        training, tpath = files.training()
        calibrate_s = manifest.get("timings", {}).get("calibrate_s") or 0.0
        extract_s = need(manifest, "timings.extract_s", mpath) + float(calibrate_s)
        train_s = need(training, "wall_s", tpath)
        basis = "shard manifest and training log"
    usd = machine_usd(cfg.teacher_usd_per_hour, extract_s) + machine_usd(cfg.machine_usd_per_hour, train_s)
    return OneOff(usd, extract_s, train_s, basis)


# ---- the analysis -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Analysis:
    config: CostConfig
    teacher: PerCall
    student: PerCall
    one_off: OneOff
    forecast: dict | None = None  # from forecast.forecast(), when a target agreement was asked
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
