"""The corpus that ships with the package, for the default run and the cost verb's measurement.

    from microdistill.data.samples import sample_corpus
    read_corpus(sample_corpus(), labels=SAMPLE_LABELS)

`sample_comments.jsonl` (README.md beside it says how it was written) holds 1,000 short comments
with a human label for the reddit-comment task's tone, sentiment and toxicity. `probe_texts.txt`
holds 110 short texts of every kind (support messages, reviews, chat, headlines, a few in other
languages) that export answers beside PyTorch: an int8 graph must keep the student's answers on
text unlike the training inputs too.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SAMPLE_LABELS = {"tone": "tone", "sentiment": "sentiment", "toxicity": "toxicity"}  # task field -> column


def sample_corpus() -> Path:
    """The packaged sample comments."""
    return Path(str(resources.files("microdistill").joinpath("data/sample_comments.jsonl")))


def probe_texts() -> list[str]:
    """The packaged probe texts, one per line."""
    path = Path(str(resources.files("microdistill").joinpath("data/probe_texts.txt")))
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
