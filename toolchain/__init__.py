"""Edge toolchain: fine-tune a transformers model, export it to ONNX, quantize, benchmark, ship a bundle."""

__version__ = "0.1.0"
