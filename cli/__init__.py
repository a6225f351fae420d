"""The `sensormine` command line and the demo: thin commands over the same use cases as the API routes."""
