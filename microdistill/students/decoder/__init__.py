"""The decoder student: a small Gemma-style decoder over the kept output vocabulary, for any task.

    microdistill train --data runs/demo/shards --out runs/demo/student --student decoder

    config.py   its shape and size presets (no torch)
    model.py    the model: RMSNorm, RoPE, GeGLU, a KV cache
    data.py     shard records in its indices, padded batches
    folder.py   save / load its folder; LoadedDecoder, the loaded student
    predict.py  batched, KV-cached, schema-constrained generation; held-out metrics
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from microdistill.students.kind import Kind


def _load(path: Path, config: dict[str, Any]):
    from microdistill.students.decoder.folder import load_decoder

    return load_decoder(path, config)


KIND = Kind(name="decoder", summary="any output, free text included: a Gemma-style decoder over the kept vocabulary",
            serves=lambda task: None, load=_load, reads=("input_embeddings",))
