"""Benchmarks: `uv run python -m bench.<name>` against the services started by `sensormine services up`."""
