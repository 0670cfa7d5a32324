"""The `microdistill` command: a thin layer over the library; each verb builds a config and calls one function.

    microdistill --help

Library modules are imported inside each verb, so `--help` never imports torch. Every option's
default is the default of its config class (TrainConfig, ExtractConfig, EvalConfig, CostConfig,
RunConfig); tests/test_cli.py holds the two to each other.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from microdistill.cli.deploy import add_serving_verbs
from microdistill.cli.study import add_study_verbs
from microdistill.core.errors import UserError, user_message


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distil one narrow LLM call into a tiny, fast student model.",
)
add_serving_verbs(app)  # export, serve, calibrate-confidence (cli_serve.py)
add_study_verbs(app)  # inspect, compare (cli_study.py)
TEACHER_URL_HELP = "OpenAI base URL of an openai:MODEL teacher (key: $MICRODISTILL_API_KEY)."
ENCODER_HELP = ("Body of a heads student: minilm, a model folder, or teacher (the teacher's first blocks, pruned; "
                "teacher:SPEC for another copy of it).")

def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    sys.exit(2)


@app.callback()
def _root() -> None:
    """Distil one narrow LLM call into a tiny, fast student model."""


@app.command()
def tasks() -> None:
    """List the built-in task presets."""
    from microdistill.core.task import load_task, presets

    for name in presets():
        t = load_task(name)
        typer.echo(f"{name:20s} fields: {', '.join(t.field_names)}")


@app.command()
def run(
    name: str = typer.Option("default", help="Run folder name under --root."),
    root: Path = typer.Option(Path("runs"), help="Where run folders live."),
    input: Optional[Path] = typer.Option(None, "--input", help="Corpus file or HF datasets folder (default: the packaged sample comments)."),
    field: str = typer.Option("text", help="Text field/column of the corpus."),
    label: list[str] = typer.Option([], help="Human label column for a task field, FIELD=COLUMN (repeatable)."),
    task: str = typer.Option("reddit-comment", help="Task preset name or YAML file."),
    teacher: str = typer.Option("qwen2.5-coder-0.5b-instruct", help="Teacher preset, HF model folder or .gguf file."),
    limit: Optional[int] = typer.Option(None, help="Use at most N inputs."),
    batch_size: int = typer.Option(16, help="Teacher batch size during extraction."),
    vocab_size: int = typer.Option(512, help="Size of the kept output vocabulary."),
    hidden_layer: str = typer.Option("last", help="Teacher layer whose hidden state of each input is stored for hidden-state "
                                     "distillation: last, middle, a number, or none."),
    dtype: str = typer.Option("auto", help="Teacher dtype: float32, bfloat16, or auto (bfloat16 where this CPU runs it "
                              "natively and it answers the calibration inputs as float32 does)."),
    student: str = typer.Option("auto", help="Student kind: heads (enum fields: a pretrained encoder with one "
                                "softmax per field), decoder (any output), or auto (heads when every field is an enum)."),
    preset: str = typer.Option("micro", help="Decoder size preset: nano, micro, small, large."),
    encoder: str = typer.Option("minilm", help=ENCODER_HELP),
    epochs: int = typer.Option(20, help="Training epochs."),
    dropout: float = typer.Option(0.1, help="Dropout on the student's residual branches while training."),
    hidden_weight: float = typer.Option(1.0, help="Weight of the decoder student's hidden-state loss (0: off)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop training after this many steps."),
    seed: int = typer.Option(0, help="Random seed."),
    eval_teacher: bool = typer.Option(True, help="Time the teacher beside the student in the report."),
    teacher_url: Optional[str] = typer.Option(None, help=TEACHER_URL_HELP),
    concurrency: int = typer.Option(8, help="Calls in flight to an API teacher."),
) -> None:
    """Extract, train and evaluate in one go, under runs/NAME/ (re-run to resume)."""
    from microdistill.evaluate.evaluation import EvalConfig
    from microdistill.extract.config import ExtractConfig
    from microdistill.flows.run import RunConfig, run as run_pipeline
    from microdistill.train import TrainConfig

    labels = _parse_pairs(label, "--label") or None
    run_pipeline(RunConfig(
        name=name, root=str(root), input=str(input) if input else None,
        extract=ExtractConfig(task=task, teacher=teacher, field=field, labels=labels, limit=limit,
                              batch_size=batch_size, vocab_size=vocab_size, hidden_layer=hidden_layer, dtype=dtype,
                              teacher_url=teacher_url, concurrency=concurrency),
        train=TrainConfig(student=student, preset=preset, encoder=encoder, epochs=epochs, dropout=dropout,
                          hidden_weight=hidden_weight, max_steps=max_steps, seed=seed),
        eval=EvalConfig(time_teacher=eval_teacher),
    ))


def _parse_pairs(pairs: list[str], flag: str) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise typer.BadParameter(f"expected FIELD=COLUMN, got {p!r}", param_hint=flag)
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


@app.command()
def cost(
    run_dir: Optional[Path] = typer.Argument(None, metavar="RUN", help="A run folder (runs/NAME) whose logs and report to use."),
    calls_per_day: float = typer.Option(10_000, help="Calls per day the student would take over (example default)."),
    shards: Optional[Path] = typer.Option(None, help="Shard folder (default: RUN/shards)."),
    student: Optional[Path] = typer.Option(None, help="Student folder (default: RUN/student)."),
    report: Optional[Path] = typer.Option(None, help="Evaluation report.json or its folder (default: RUN/eval)."),
    machine_usd_per_hour: float = typer.Option(0.10, help="Machine price for training and the student; example default: a small cloud CPU VM."),
    teacher_machine_usd_per_hour: Optional[float] = typer.Option(None, help="Machine price for extraction and a local teacher (default: --machine-usd-per-hour)."),
    teacher_pricing: str = typer.Option("api", help="Teacher cost per call: 'api' (token prices) or 'local' (measured speed x machine price)."),
    api_usd_per_m_input: float = typer.Option(0.15, help="API price per million input tokens (example default)."),
    api_usd_per_m_output: float = typer.Option(0.60, help="API price per million output tokens (example default)."),
    input_tokens: Optional[float] = typer.Option(None, help="Input tokens per call (default: measured from the shards' task prompt)."),
    output_tokens: Optional[float] = typer.Option(None, help="Output tokens per call (default: mean output length in the shards)."),
    teacher_usd_per_call: Optional[float] = typer.Option(None, help="A known teacher cost per call (overrides the pricing above)."),
    student_usd_per_call: Optional[float] = typer.Option(None, help="A known student cost per call (overrides the measured one)."),
    basis: str = typer.Option("latency", help="Measured speed to price: 'latency' (p50, batch 1) or 'throughput' (batched)."),
    corpus_size: Optional[int] = typer.Option(None, help="Plan this many teacher-labelled examples: estimate the one-off cost from throughput."),
    epochs: Optional[float] = typer.Option(None, help="Epochs for the planned corpus (default: the measured run's)."),
    measure: bool = typer.Option(False, help="Measure throughput on a small sample (--input, --task, --teacher, --preset) instead of a run's logs."),
    input: Optional[Path] = typer.Option(None, "--input", help="Corpus for --measure (default: the packaged sample comments)."),
    task: str = typer.Option("reddit-comment", help="Task for --measure."),
    teacher: str = typer.Option("qwen2.5-coder-0.5b-instruct", help="Teacher for --measure."),
    preset: str = typer.Option("micro", help="Student preset for --measure and the pilot."),
    sample: int = typer.Option(128, help="Inputs to extract for --measure."),
    train_steps: int = typer.Option(20, help="Training steps to time for --measure."),
    target_agreement: Optional[float] = typer.Option(None, help="Forecast the examples needed for this exact-match agreement (0-1); plans that corpus unless --corpus-size."),
    points: Optional[str] = typer.Option(None, help="Pilot results 'examples:agreement,...' for the forecast (default: train a pilot at 25/50/100% of the shards)."),
    out: Optional[Path] = typer.Option(None, help="Where cost.json, cost.png and forecast.png go (default: RUN/cost, or ./cost)."),
    json_out: bool = typer.Option(False, "--json", help="Print the analysis as JSON."),
) -> None:
    """Break-even of the student against the teacher: cost per day, one-off cost, days to pay back."""
    import json

    from microdistill.extract.config import ExtractConfig
    from microdistill.flows.cost import cost_analysis
    from microdistill.plan.cost import CostConfig
    from microdistill.plan.forecast import parse_points
    from microdistill.report.cost import summary_table

    cfg = CostConfig(
        calls_per_day=calls_per_day, machine_usd_per_hour=machine_usd_per_hour,
        teacher_machine_usd_per_hour=teacher_machine_usd_per_hour, teacher_pricing=teacher_pricing,
        api_usd_per_m_input=api_usd_per_m_input, api_usd_per_m_output=api_usd_per_m_output,
        input_tokens=input_tokens, output_tokens=output_tokens, teacher_usd_per_call=teacher_usd_per_call,
        student_usd_per_call=student_usd_per_call, basis=basis, corpus_size=corpus_size, epochs=epochs,
    )
    analysis = cost_analysis(
        run_dir, cfg, out, shards=shards, student=student, report=report,
        measure=ExtractConfig(task=task, teacher=teacher) if measure else None, corpus=input, preset=preset,
        sample=sample, train_steps=train_steps, target_agreement=target_agreement,
        points=parse_points(points) if points else None)
    if json_out:
        typer.echo(json.dumps(analysis.to_dict(), indent=1))
        return
    from rich.console import Console

    Console().print(summary_table(analysis))
    typer.echo(f"plot: {analysis.plot}")


@app.command()
def train(
    data: Path = typer.Option(..., help="Shard folder written by extract."),
    out: Path = typer.Option(..., help="Student folder to write (model, config, tokenizer, metrics, checkpoint)."),
    student: str = typer.Option("decoder", help="Student kind: decoder (any output) or heads (enum fields: a "
                                "pretrained encoder with one softmax per field)."),
    preset: str = typer.Option("micro", help="Decoder size preset: nano, micro, small, large."),
    encoder: str = typer.Option("minilm", help=ENCODER_HELP),
    encoder_layers: Optional[int] = typer.Option(None, help="Keep only the body's first N layers (faster; teacher: 2)."),
    mlp_width: Optional[int] = typer.Option(None, help="A teacher body's MLP width, pruned by activation importance (1024)."),
    input_vocab: str = typer.Option("full", help="A pretrained encoder's input vocabulary: full (every piece it "
                                    "knows) or corpus (the pieces the training inputs use: a smaller file)."),
    epochs: int = typer.Option(10, help="Passes over the training split."),
    batch_size: int = typer.Option(32, help="Examples per optimiser step."),
    lr: float = typer.Option(2e-3, help="Peak learning rate (linear warm-up, then cosine)."),
    min_lr_ratio: float = typer.Option(0.1, help="Final learning rate as a fraction of --lr."),
    warmup_frac: float = typer.Option(0.05, help="Fraction of the steps spent warming up."),
    weight_decay: float = typer.Option(0.1, help="AdamW weight decay on matrices and embeddings."),
    grad_clip: float = typer.Option(1.0, help="Max global gradient norm (0: no clipping)."),
    pretrained_lr_ratio: float = typer.Option(0.05, help="A pretrained encoder learns at --lr times this."),
    dropout: float = typer.Option(0.0, help="Dropout on the student's residual branches while training."),
    seed: int = typer.Option(0, help="Random seed (initialisation and data order)."),
    divergence: str = typer.Option("forward_kl", help="forward_kl, reverse_kl, jsd, skew_kl or taid."),
    temperature: float = typer.Option(1.0, help="Distillation temperature T."),
    beta: float = typer.Option(0.5, help="JSD mixing weight (--divergence jsd)."),
    alpha: float = typer.Option(0.1, help="Skew (--divergence skew_kl)."),
    curriculum: str = typer.Option("cosine", help="Schedule of the divergence's weight: cosine, linear, constant or step."),
    divergence_start: float = typer.Option(0.9, help="The divergence's weight at the start (CE gets 1 - it)."),
    divergence_end: float = typer.Option(0.1, help="The divergence's weight at the end."),
    tail: bool = typer.Option(False, help="Add an output class for the teacher's mass outside the kept vocabulary."),
    signal: str = typer.Option("auto", help="Teacher signal: logits, text (CE only), or auto."),
    embed_init: str = typer.Option("teacher", help="Input embeddings: teacher (the teacher's rows, PCA to the "
                                   "student's width, when the shards hold them) or random."),
    hidden_weight: float = typer.Option(1.0, help="Weight of the decoder student's hidden-state loss when the shards "
                                        "hold the teacher's input hidden states (0: off)."),
    max_steps: Optional[int] = typer.Option(None, help="A fixed step budget instead of --epochs."),
    limit_train: Optional[int] = typer.Option(None, help="Use only the first N training examples."),
    eval_limit: Optional[int] = typer.Option(None, help="Evaluate on at most N held-out examples per epoch."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its checkpoint (same options)."),
    quiet: bool = typer.Option(False, help="No live progress line."),
) -> None:
    """Train a student on teacher shards; Ctrl-C saves a checkpoint, --resume continues it exactly (torchrun: DDP)."""
    import json
    import os

    from microdistill.train import TrainConfig, TrainingInterrupted, train as run_training

    cfg = TrainConfig(
        student=student, preset=preset, encoder=encoder, encoder_layers=encoder_layers, mlp_width=mlp_width,
        input_vocab=input_vocab, epochs=epochs,
        batch_size=batch_size, lr=lr,
        min_lr_ratio=min_lr_ratio, warmup_frac=warmup_frac, weight_decay=weight_decay, grad_clip=grad_clip,
        pretrained_lr_ratio=pretrained_lr_ratio, dropout=dropout, seed=seed, divergence=divergence,
        temperature=temperature, beta=beta, alpha=alpha, curriculum=curriculum, divergence_start=divergence_start,
        divergence_end=divergence_end, tail=tail, signal=signal, embed_init=embed_init, hidden_weight=hidden_weight,
        max_steps=max_steps, limit_train=limit_train, eval_limit=eval_limit,
    )
    try:
        path = run_training(data, out, cfg, resume=resume, progress=not quiet)
    except TrainingInterrupted as e:
        typer.secho(str(e), err=True)
        raise typer.Exit(130)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        stats = json.loads((path / "training.json").read_text())
        typer.echo(f"student saved in {path} ({stats['steps']} steps, {stats['wall_s']:.1f} s, {stats['tokens_per_s']:.0f} tokens/s)")


@app.command()
def predict(
    texts: list[str] = typer.Argument(None, help="Texts to label (or use --input)."),
    student: Path = typer.Option(..., help="Student folder (the --out of train) or export folder (of export: no torch)."),
    input: Optional[Path] = typer.Option(None, "--input", help="A file with one text per line ('-' for stdin)."),
    constrain: bool = typer.Option(True, help="Constrain generation to the task's schema (--no-constrain: raw output)."),
    batch_size: int = typer.Option(64, help="Texts decoded together."),
    task: Optional[str] = typer.Option(None, help="Refuse a student that does another task than this one."),
) -> None:
    """Label texts with a trained or exported student; prints one JSON object per input."""
    import json

    from microdistill.data.corpus import read_lines
    from microdistill.serve.answerers import load_answerer

    items = list(texts or []) + (read_lines(input) if input is not None else [])
    if not items:
        fail("nothing to predict: give texts as arguments or --input FILE")
    results = load_answerer(student, task).predict(items, batch_size, constrain=constrain)
    for r in results:
        typer.echo(json.dumps(r, ensure_ascii=False))


@app.command("eval")
def eval_(
    student: Path = typer.Option(..., help="Student folder (the --out of train)."),
    data: Path = typer.Option(..., help="Shard folder the student was trained on; its held-out split is scored."),
    teacher: Optional[str] = typer.Option(None, help="Teacher to time beside the student: preset, HF folder, .gguf or "
                                          "openai:MODEL (default: the shards' teacher, if it loads)."),
    teacher_url: Optional[str] = typer.Option(None, help=TEACHER_URL_HELP + " Default: the shards' server."),
    no_teacher: bool = typer.Option(False, "--no-teacher", help="Do not load or time a teacher."),
    out: Optional[Path] = typer.Option(None, help="Report folder (default: 'eval' beside the student folder)."),
    limit: Optional[int] = typer.Option(None, help="Score at most N held-out examples."),
    timing_inputs: int = typer.Option(16, help="Inputs both models are timed on (the teacher is slow on a CPU)."),
    batch_size: int = typer.Option(64, help="Student batch size while scoring."),
    peers: bool = typer.Option(True, help="Also train and score the peer baselines (TF-IDF and frozen-encoder "
                               "logistic regressions) on the same teacher answers."),
    consistency_inputs: int = typer.Option(100, help="Held-out inputs the timed teacher answers again under "
                                           "meaning-preserving edits: its self-consistency, the ceiling (0: off)."),
    json_out: bool = typer.Option(False, "--json", help="Print report.json to stdout."),
    quiet: bool = typer.Option(False, help="No progress lines."),
) -> None:
    """Agreement with the teacher, speed, size and memory -> report.md, PNG plots and report.json."""
    import json

    from microdistill.evaluate.evaluation import EvalConfig
    from microdistill.flows.eval import make_report

    cfg = EvalConfig(teacher=teacher, teacher_url=teacher_url, time_teacher=not no_teacher, limit=limit, timing_inputs=timing_inputs,
                     batch_size=batch_size, peers=peers, consistency_inputs=consistency_inputs)
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


@app.command()
def extract(
    task: str = typer.Option("reddit-comment", help="Task preset name or YAML file."),
    input: Path = typer.Option(..., "--input", help="Corpus: .txt, .jsonl, .csv, .parquet or a HF datasets folder."),
    teacher: str = typer.Option("qwen2.5-coder-0.5b-instruct", help="Teacher preset (qwen2.5-coder-0.5b-instruct, gemma-3-270m), HF model folder, .gguf file or openai:MODEL."),
    out: Path = typer.Option(..., help="Shard folder to write (re-run the same command to continue it)."),
    limit: Optional[int] = typer.Option(None, help="Extract only the first N inputs that pass the filters."),
    batch_size: int = typer.Option(16, help="Inputs decoded together by the teacher."),
    vocab_size: int = typer.Option(512, help="Size of the kept output vocabulary."),
    calibration: int = typer.Option(64, help="Inputs decoded to choose the kept vocabulary (first run only)."),
    hidden_layer: str = typer.Option("last", help="Teacher layer whose hidden state of each input is stored for hidden-state "
                                     "distillation (first run only): last, middle, a number, or none."),
    dtype: str = typer.Option("float32", help="Teacher dtype (first run only): float32, bfloat16, or auto (bfloat16 "
                              "where this CPU runs it natively and it answers the calibration inputs as float32 does)."),
    field: str = typer.Option("text", help="Text field/column of the corpus."),
    label: list[str] = typer.Option([], help="Human label column for a task field, FIELD=COLUMN (repeatable)."),
    teacher_url: Optional[str] = typer.Option(None, help=TEACHER_URL_HELP),
    teacher_tokenizer: Optional[str] = typer.Option(None, help="That model's tokenizer: preset, folder or .gguf (default: found)."),
    concurrency: int = typer.Option(8, help="Calls in flight to an API teacher."),
    part: Optional[str] = typer.Option(None, help="I/N: worker I of N, all with this --out (default under torchrun: RANK/WORLD_SIZE)."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Label a corpus with the teacher under the task's schema and store its logits as shards."""
    from microdistill.extract import ExtractConfig, extract as run_extract
    from microdistill.extract.parts import Part, from_env

    cfg = ExtractConfig(task=task, teacher=teacher, field=field, labels=_parse_pairs(label, "--label") or None,
                        limit=limit, batch_size=batch_size, vocab_size=vocab_size, calibration=calibration,
                        hidden_layer=hidden_layer, dtype=dtype, teacher_url=teacher_url,
                        teacher_tokenizer=teacher_tokenizer, concurrency=concurrency)
    path = run_extract(input, out, cfg, progress=not quiet, part=Part.parse(part) if part else from_env())
    typer.echo(f"shards: {path}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted; finished work is saved, re-run the same command to continue", err=True)
        sys.exit(130)
    except (UserError, ModuleNotFoundError) as e:
        if user_message(e) is None:
            raise
        fail(user_message(e))  # outside the typer app a typer.Exit would not be handled: exit directly


if __name__ == "__main__":
    main()
