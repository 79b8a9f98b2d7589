"""Decoder language models (issue 8, in progress): GGUF sources, export with the KV cache, parity over decode steps,
int4/int8 weights. The light runtime's `DecoderGenerator` generates from the exported graph without torch."""
