"""The one error type a user can act on.

Every module raises a subclass of `UserError` for bad input (a file, an option, a folder); the
message is one line that says what was wrong, where, and what to do. The CLI prints such an
error as `error: ...` and exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input a user can fix; the message is one line for them."""
