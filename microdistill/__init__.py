"""microdistill: distil one narrow LLM call into a tiny, fast student model."""

__version__ = "0.1.0"
