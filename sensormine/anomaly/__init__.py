"""Anomaly detection: features, ONNX models per device type, registry, batch and stream scoring (docs/anomaly.md)."""
