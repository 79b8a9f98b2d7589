"""Distilling an embedder into a smaller student: the student keeps some of the teacher's layers (teacher weights,
`toolchain.compile.distill.build_student`) with the same pooling, and learns to give each training text the teacher's
embedding (MSE between the two unit vectors), through the shared short loop."""

from __future__ import annotations

from typing import Any

import torch

from toolchain.compile.distill import build_student
from toolchain.embed.model import Pooled
from toolchain.finetune.loop import fit
from toolchain.runtime import TextEncoder


def student_of(teacher: Pooled, keep: list[int]) -> Pooled:
    """A trainable copy of the teacher embedder with only the encoder layers `keep`."""
    return Pooled(build_student(teacher.encoder, keep), normalize=teacher.normalize)


def distill_embeddings(
    teacher: Pooled, student: Pooled, encoder: TextEncoder, texts: list[str], cfg: dict[str, Any]
) -> dict[str, Any]:
    """Train `student` in place to match the teacher's embeddings of `texts`; the steps, last tenth's loss, seconds.
    The MSE is scaled by the dimension, so that it reads as the mean squared distance between the two vectors."""
    teacher.eval()
    dim = float(teacher.config.hidden_size)

    def batch_loss(rows: list[int]) -> torch.Tensor:
        feeds = encoder.encode([texts[i] for i in rows])
        with torch.no_grad():  # not inference_mode: the loss keeps the target for its backward pass
            want = teacher.embed(feeds)
        return torch.nn.functional.mse_loss(student.embed(feeds), want) * dim

    return fit(student, encoder.lengths(texts), cfg, batch_loss, "embedding MSE")
