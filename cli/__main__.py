"""`python -m cli ...`: the same as the `sensormine` command."""

from cli.main import app

app()
