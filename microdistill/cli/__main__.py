"""`python -m microdistill.cli`: the `microdistill` command."""

from microdistill.cli import main

main()
