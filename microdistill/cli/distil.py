"""The verbs that make a student, in the order of the work; cli/__init__.py adds them to `microdistill`.

    microdistill run                                   # all three stages under runs/NAME/
    microdistill synthesize --task support-ticket --n 500 --out tickets.jsonl   # no real inputs yet
    microdistill extract --input comments.jsonl --out runs/demo/shards
    microdistill train --data runs/demo/shards --out runs/demo/student
    microdistill eval --student runs/demo/student --data runs/demo/shards

Each verb's flags come from its config class (verbs.py); library modules are imported inside the
verb, so `--help` imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from microdistill.cli.verbs import Flags, fail, verb
from microdistill.evaluate.config import EvalConfig
from microdistill.extract.config import ExtractConfig
from microdistill.flows.config import RunConfig, SynthesizeConfig
from microdistill.train.config import CHECKPOINT_EVERY, TrainConfig

LABEL = {"labels": "--label"}  # one FIELD=COLUMN pair per flag, repeated


@verb
def run(cfg: RunConfig = Flags(RunConfig, nested={
    "extract": Flags(ExtractConfig, names=LABEL, only=(
        "task", "teacher", "field", "labels", "limit", "batch_size", "vocab_size", "hidden_layer", "dtype",
        "teacher_url", "concurrency")),
    "train": Flags(TrainConfig, only=(
        "student", "preset", "encoder", "epochs", "dropout", "hidden_weight", "max_steps", "seed")),
    "eval": Flags(EvalConfig, only=("time_teacher",), names={"time_teacher": "--eval-teacher/--no-eval-teacher"}),
})) -> None:
    """Extract, train and evaluate in one go, under runs/NAME/ (re-run to resume); --synthesize N first has
    the teacher write the inputs."""
    from microdistill.flows.run import run as run_pipeline

    run_pipeline(cfg)


@verb
def synthesize(
    out: Path = typer.Option(..., help="The .jsonl file to write (a run stopped early continues from OUT.partial)."),
    cfg: SynthesizeConfig = Flags(SynthesizeConfig),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Have the teacher write inputs for a task (steered to every value of its fields) -> a corpus for extract."""
    from microdistill.flows.synthesize import synthesize as write_inputs

    r = write_inputs(cfg, out, progress_bar=not quiet)
    typer.echo(f"{r['written']} inputs of {r['task']} written to {r['out']} ({r['asked']} asked: "
               f"{r['failed_input_rules']} failed the input rules, {r['near_duplicates']} near-duplicates)")


@verb
def extract(
    input: Path = typer.Option(..., "--input", help="Corpus: .txt, .jsonl, .csv, .parquet or a HF datasets folder."),
    out: Path = typer.Option(..., help="Shard folder to write (re-run the same command to continue it)."),
    cfg: ExtractConfig = Flags(ExtractConfig, names=LABEL),
    part: Optional[str] = typer.Option(None, help="I/N: worker I of N, all with this --out (default under torchrun: "
                                       "RANK/WORLD_SIZE)."),
    select: Optional[str] = typer.Option(None, help="Label only --budget inputs of --input, chosen: first, random, or "
                                         "by the --student's doubt: margin, entropy, diverse (appends to --out)."),
    student: Optional[Path] = typer.Option(None, help="The student whose doubt --select margin/entropy/diverse reads."),
    budget: Optional[int] = typer.Option(None, help="How many inputs --select chooses for the teacher."),
    seed: int = typer.Option(0, help="Seed of --select random."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Label a corpus with the teacher under the task's schema and store its logits as shards."""
    if (select is None) != (budget is None) or (student is not None and select is None):
        fail("--select and --budget go together (and --student with them)")
    from microdistill.students.decoder.draft import draft_loader

    if select is not None:
        from microdistill.flows.select import select_and_extract

        path = select_and_extract(input, out, cfg, select, budget, student, seed, progress=not quiet,
                                  drafter_for=draft_loader(cfg))
    else:
        from microdistill.extract import extract as run_extract
        from microdistill.extract.parts import Part, from_env

        path = run_extract(input, out, cfg, progress=not quiet, part=Part.parse(part) if part else from_env(),
                           drafter_for=draft_loader(cfg))
    typer.echo(f"shards: {path}")


@verb
def train(
    data: Path = typer.Option(..., help="Shard folder written by extract."),
    out: Path = typer.Option(..., help="Student folder to write (model, config, tokenizer, metrics; a checkpoint while it trains)."),
    cfg: TrainConfig = Flags(TrainConfig),
    resume: bool = typer.Option(False, help="Continue the run in --out from its checkpoint (same options)."),
    checkpoint_every: str = typer.Option(CHECKPOINT_EVERY, help="Besides each epoch's end, a checkpoint every N steps "
                                         "(500) or N seconds (300s): what a killed run can lose."),
    keep_checkpoint: bool = typer.Option(False, help="Keep the last checkpoint (optimiser state, hidden-state probe; "
                                         "about 3x the student's size) in --out once training ends."),
    quiet: bool = typer.Option(False, help="No live progress line."),
) -> None:
    """Train a student on teacher shards; Ctrl-C saves a checkpoint, --resume continues it exactly (torchrun: DDP)."""
    import json
    import os

    from microdistill.train import TrainingInterrupted, train as run_training

    try:
        path = run_training(data, out, cfg, resume=resume, progress=not quiet, checkpoint_every=checkpoint_every,
                            keep_checkpoint=keep_checkpoint)
    except TrainingInterrupted as e:
        typer.secho(str(e), err=True)
        raise typer.Exit(130)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        stats = json.loads((path / "training.json").read_text())
        typer.echo(f"student saved in {path} ({stats['steps']} steps, {stats['wall_s']:.1f} s, "
                   f"{stats['tokens_per_s']:.0f} tokens/s)")


@verb
def eval_(
    student: Path = typer.Option(..., help="Student folder (the --out of train)."),
    data: Path = typer.Option(..., help="Shard folder the student was trained on; its held-out split is scored."),
    cfg: EvalConfig = Flags(EvalConfig, names={"time_teacher": " /--no-teacher"}),
    out: Optional[Path] = typer.Option(None, help="Report folder (default: 'eval' beside the student folder)."),
    json_out: bool = typer.Option(False, "--json", help="Print report.json to stdout."),
    quiet: bool = typer.Option(False, help="No progress lines."),
) -> None:
    """Agreement with the teacher, speed, size and memory -> report.md, PNG plots and report.json."""
    import json

    from microdistill.flows.eval import make_report

    out = out or student.parent / "eval"
    report = make_report(student, data, out, cfg, progress=not quiet)
    if json_out:
        typer.echo(json.dumps(report, indent=1))
        return
    speed = report["speed"]
    lo, hi = report["student_only_exact_ci95"]
    typer.echo(f"{report['n_eval']} {report['split']} examples: exact match {report['student_only_exact']:.2%} "
               f"(95% interval {lo:.1%}–{hi:.1%}), "
               f"token accuracy {report['teacher_forced_token_acc']:.2%}, "
               f"valid JSON without the grammar {report['valid_json_unconstrained']:.2%}")
    if speed["speedup_p50"]:
        typer.echo(f"student vs teacher: {speed['speedup_p50']:.1f}x faster at batch 1, "
                   f"{speed['speedup_throughput']:.1f}x the throughput")
    typer.echo(f"report: {out / 'report.md'}")


VERBS = {"run": run, "synthesize": synthesize, "extract": extract, "train": train, "eval": eval_}
