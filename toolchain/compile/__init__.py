"""Helpers of the compile stages (toolchain/stages/): export parity, quantizers and node sensitivity, graph helpers,
the distilled student, the strings-in graph."""
