"""`python -m microdistill` is the `microdistill` command; torchrun needs this form:

    torchrun --nproc-per-node 2 -m microdistill train --data shards/ --out student/
"""

from microdistill.cli import main

main()
