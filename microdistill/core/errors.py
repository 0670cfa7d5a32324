"""The one error type a user can act on.

Every module raises a subclass of `UserError` for bad input (a file, an option, a folder); the
message is one line that says what was wrong, where, and what to do. The CLI prints such an
error as `error: ...` and exits 2, and so does a verb that needs torch when only the runtime
(`pip install microdistill`, no torch) is installed; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input a user can fix; the message is one line for them."""


# What `pip install 'microdistill[train]'` adds to the runtime-only install, by import name.
TRAIN_ONLY = frozenset({"torch", "transformers", "safetensors", "accelerate", "xgrammar", "gguf", "pyarrow",
                        "matplotlib", "sklearn", "onnx"})


def user_message(e: BaseException) -> str | None:
    """The one line to show for an error a user can fix, or None for a bug (keep its traceback):
    a UserError's message, or what to install when a command needs what the runtime-only
    install leaves out."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in TRAIN_ONLY:
        return f"this command needs {e.name}, which the runtime-only install leaves out; run pip install 'microdistill[train]'"
    return None
