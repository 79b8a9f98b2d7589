"""Helpers of the evaluate and bench stages: the measuring process, the PyTorch model as the ONNX one is fed,
latency statistics, which execution providers run here."""
