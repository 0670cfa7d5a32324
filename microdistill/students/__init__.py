"""Students: the small models that learn the teacher's task.

    decoder.py  a Gemma-style decoder over the kept output vocabulary (any output schema)
    data.py     shard records in a student's indices, and padded batches
    saved.py    the self-contained student folder: save / load without the training code
"""
