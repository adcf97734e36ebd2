"""`python -m loadgen ...`: the same commands as `splitserve bench ...`."""

from loadgen.cli import app

app(prog_name="python -m loadgen")
