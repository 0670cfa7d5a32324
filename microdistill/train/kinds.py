"""Each student kind's training set-up (data, model, loss, held-out metrics, saving), under the
names students.KINDS registers: a new kind adds its module here and one line below."""

from __future__ import annotations

from typing import Callable

from microdistill.train.decoder import set_up_decoder
from microdistill.train.heads import set_up_heads
from microdistill.train.setup import Setup

SETUPS: dict[str, Callable[..., Setup]] = {"decoder": set_up_decoder, "heads": set_up_heads}
