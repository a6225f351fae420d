"""ONNX anomaly models and scoring (the alerts-and-ML issue); empty until it lands."""
