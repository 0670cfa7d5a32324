"""Inputs written by the teacher, for a task with few or no real ones.

    microdistill synthesize --task support-ticket --n 500 --out tickets.jsonl
    microdistill extract --task support-ticket --input tickets.jsonl --out runs/tickets/shards

The teacher is shown the task's description and its few-shot examples and asked for one new
input at a time, each steered to one value of one enum field in turn (so every value gets
inputs, not only the common ones), sampled at --temperature. What it writes is cleaned and
filtered by the task's input rules as a corpus is, and an input whose character 4-grams overlap
an example's or an already kept input's by --similarity or more (Jaccard) is dropped as a near
duplicate. Each kept input is one JSON line {"text", "written_for": {field: value}}.

Resumable: kept inputs are appended to `OUT.partial` after every batch, and a new run with the
same --out continues from them; the finished file replaces OUT in one step.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

from microdistill.core.console import progress, say
from microdistill.core.files import atomic_write_bytes
from microdistill.core.task import EnumField, Task, load_task
from microdistill.data.corpus import Item, filter_inputs, normalise
from microdistill.flows.config import SynthesizeConfig, SynthesizeError

ATTEMPTS = 4  # the teacher is asked at most this many times --n inputs before synthesize gives up


def steers(task: Task) -> list[dict[str, str]]:
    """One {field: value} per value of every enum field, the fields interleaved ([{}] without enums)."""
    columns = [[{f.name: v} for v in f.values] for f in task.output.fields if isinstance(f, EnumField)]
    rows = [s for group in itertools.zip_longest(*columns) for s in group if s is not None]
    return rows or [{}]


def request(task: Task, steer: dict[str, str]) -> list[dict[str, str]]:
    """The conversation that asks the teacher for one new input of `task`, steered to `steer`: the
    task's examples come first as turns that asked for their own answers and got their inputs."""
    def ask(want: dict[str, Any]) -> str:
        said = " and ".join(f'{k} is "{v}"' for k, v in want.items())
        return f"Write one new input{f' where the {said}' if said else ''}."

    about = task.description.strip() or task.prompt.system.strip()
    turns = [{"role": "system", "content": (
        f"You write realistic, varied example inputs for this task: {about} Reply with the input text only: "
        "no quotes, no answer, no explanation.")}]
    for ex in task.prompt.examples:
        turns += [{"role": "user", "content": ask({k: ex.output[k] for k in steer if k in ex.output})},
                  {"role": "assistant", "content": ex.input}]
    return turns + [{"role": "user", "content": ask(steer)}]


def parse(reply: str) -> str:
    """The input in a teacher's reply: its first non-empty line, without a list mark, a label, quotes
    or an answer it went on to give ("... -> {...}"); "" where it wrote an answer, not an input."""
    line = next((x.strip() for x in reply.splitlines() if x.strip()), "")
    line = re.sub(r"^(?:[-*•]|\d+[.)])\s*", "", line)
    line = re.sub(r"^(?:input|text|message|comment)\s*:\s*", "", line, flags=re.I)
    line = line.split(" -> ")[0].strip().strip('"“”\'').strip()
    return "" if line.startswith(("{", "[")) else line


def grams(text: str, n: int = 4) -> frozenset[str]:
    t = normalise(text)
    return frozenset(t[i:i + n] for i in range(max(len(t) - n + 1, 1)))


def near(a: frozenset[str], b: frozenset[str], similarity: float) -> bool:
    return len(a & b) >= similarity * len(a | b)


def synthesize(cfg: SynthesizeConfig, out: Path, progress_bar: bool = True) -> dict:
    """Write cfg.n inputs of cfg.task with cfg.teacher into `out` (JSON lines); returns counts."""
    from microdistill.teachers import load_teacher

    out = Path(out)
    task = load_task(cfg.task)
    if not task.prompt.examples:
        raise SynthesizeError(f"task {task.name!r} has no prompt examples: the teacher needs a few to see what an "
                              "input looks like; add prompt.examples to its YAML")
    if out.is_dir():
        raise SynthesizeError(f"--out {out}: is a folder; give a .jsonl file to write")
    if out.exists():
        raise SynthesizeError(f"--out {out}: already exists; choose another file (nothing was written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    kept = earlier(partial, progress_bar)
    teacher = load_teacher(cfg.teacher, cfg.teacher_url, progress=progress_bar)
    seen = [grams(ex.input) for ex in task.prompt.examples] + [grams(k["text"]) for k in kept]
    plan = itertools.cycle(steers(task))
    for _ in range(len(kept)):
        next(plan)  # a continued run asks where the last one stopped
    asked = rejected = similar = 0
    bar, job = progress(progress_bar, "writing inputs", cfg.n)
    with bar, open(partial, "a", encoding="utf-8") as sink:
        bar.update(job, completed=len(kept))
        while len(kept) < cfg.n and asked < ATTEMPTS * cfg.n:
            batch = [next(plan) for _ in range(min(cfg.batch_size, ATTEMPTS * cfg.n - asked))]
            replies = teacher.write([request(task, s) for s in batch], cfg.max_tokens, cfg.temperature,
                                    cfg.seed * 1_000_003 + asked)
            asked += len(batch)
            for steer, reply in zip(batch, replies):
                text = parse(reply)
                passed = passes(task, teacher, text)
                if passed is None:
                    rejected += 1
                    continue
                g = grams(passed)
                if any(near(g, s, cfg.similarity) for s in seen):
                    similar += 1
                    continue
                seen.append(g)
                kept.append({"text": passed, "written_for": steer})
                sink.write(json.dumps(kept[-1], ensure_ascii=False) + "\n")
                if len(kept) == cfg.n:
                    break
            sink.flush()
            os.fsync(sink.fileno())
            bar.update(job, completed=len(kept), rate=f"{len(kept)}/{asked} kept")
    if not kept:
        raise SynthesizeError(f"the teacher wrote nothing usable for {task.name!r} in {asked} tries ({rejected} failed "
                              f"the task's input rules, {similar} near-duplicates); try a higher --temperature or "
                              "another --teacher")
    atomic_write_bytes(out, "".join(json.dumps(k, ensure_ascii=False) + "\n" for k in kept).encode())
    partial.unlink()
    report = {"task": task.name, "written": len(kept), "asked": asked, "failed_input_rules": rejected,
              "near_duplicates": similar, "out": str(out)}
    if len(kept) < cfg.n:
        say(f"only {len(kept)} of {cfg.n} inputs after {asked} tries ({rejected} failed the input rules, "
            f"{similar} near-duplicates)", True)
    return report


def earlier(partial: Path, progress_bar: bool) -> list[dict]:
    """What a stopped run kept (its OUT.partial), to continue from. A last line cut by a kill is
    dropped from the file too, so the next line appended does not join it."""
    if not partial.exists():
        return []
    kept, cut = [], False
    for line in partial.read_text(encoding="utf-8").splitlines():
        try:
            kept.append(json.loads(line))
        except ValueError:
            cut = True
    if cut:
        atomic_write_bytes(partial, "".join(json.dumps(k, ensure_ascii=False) + "\n" for k in kept).encode())
    if kept:
        say(f"continuing {partial}: {len(kept)} inputs already written", progress_bar)
    return kept


def passes(task: Task, teacher, text: str) -> str | None:
    """`text` cleaned as the task's corpus would be, or None where its input rules drop it."""
    from microdistill.data.corpus import CorpusError

    if not text:
        return None
    try:
        items, _ = filter_inputs([Item(text=text)], task, teacher.tokenizer, source="teacher")
    except CorpusError:  # nothing left: the one text was dropped
        return None
    return items[0].text
