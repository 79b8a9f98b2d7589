"""Compile stages: export to ONNX, fuse the graph, quantize."""
