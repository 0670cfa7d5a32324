"""The corpora that ship with the package, for `run` without --input and the cost verb's measurement.

    from microdistill.data.samples import SAMPLES, sample_corpus
    read_corpus(sample_corpus(), labels=SAMPLE_LABELS)
    path, labels = SAMPLES["agent-tool"]

README.md beside them says how each was written. `sample_comments.jsonl` holds 3,100 short
comments, the first 1,000 with a human label for the reddit-comment task's tone, sentiment and
toxicity (null for the rest);
`sample_requests.jsonl` holds requests to an assistant for the agent-tool task, written by the
default teacher (`microdistill synthesize`), each with the tool it was asked to write one for
(not a label: what the teacher then answers is the target). `probe_texts.txt`
holds 110 short texts of every kind (support messages, reviews, chat, headlines, a few in other
languages) that export answers beside PyTorch: an int8 graph must keep the student's answers on
text unlike the training inputs too.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SAMPLE_LABELS = {"tone": "tone", "sentiment": "sentiment", "toxicity": "toxicity"}  # task field -> column
FILES = {"reddit-comment": ("sample_comments.jsonl", SAMPLE_LABELS), "agent-tool": ("sample_requests.jsonl", {})}


def _packaged(name: str) -> Path:
    return Path(str(resources.files("microdistill").joinpath(f"data/{name}")))


SAMPLES = {task: (_packaged(name), labels) for task, (name, labels) in FILES.items()}  # preset -> corpus, labels


def sample_corpus() -> Path:
    """The packaged sample comments (the default task's corpus)."""
    return SAMPLES["reddit-comment"][0]


def probe_texts() -> list[str]:
    """The packaged probe texts, one per line."""
    path = Path(str(resources.files("microdistill").joinpath("data/probe_texts.txt")))
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
