"""The corpus that ships with the package, for the default run and the cost verb's measurement.

    from microdistill.data.samples import sample_corpus
    read_corpus(sample_corpus(), labels=SAMPLE_LABELS)

`sample_comments.jsonl` (README.md beside it says how it was written) holds 1,000 short comments
with a human label for the reddit-comment task's tone, sentiment and toxicity.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SAMPLE_LABELS = {"tone": "tone", "sentiment": "sentiment", "toxicity": "toxicity"}  # task field -> column


def sample_corpus() -> Path:
    """The packaged sample comments."""
    return Path(str(resources.files("microdistill").joinpath("data/sample_comments.jsonl")))
