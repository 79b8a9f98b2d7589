"""Classification by generation: a prompt template around the text, the label words the model must answer with, and
the rule that reads a generated answer back into a label.

LoRA tuning trains on prompt + label word (+ end-of-turn), with the loss on the answer tokens only, through the one
training loop (`train_classifier(loss_fn=...)`); evaluation generates greedily and parses the answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from toolchain.runtime import parse_label

DEFAULT_TEMPLATE = "Is the sentiment of this movie review positive or negative? Answer with one word.\nReview: {text}"


@dataclass(frozen=True)
class PromptTask:
    labels: list[str]  # the label words, in label order ("negative", "positive")
    template: str = DEFAULT_TEMPLATE
    chat: bool = True  # wrap the prompt in the tokenizer's chat template (instruct models)
    max_new_tokens: int = 4
    stop_strings: list[str] = field(default_factory=lambda: ["\n"])

    def prompt(self, tokenizer: Any, text: str) -> str:
        body = self.template.format(text=text)
        if not self.chat:
            return body
        messages = [{"role": "user", "content": body}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def answer(self, tokenizer: Any, label: int) -> str:
        """What the tuned model should generate for a label: the word, then the end of its turn."""
        return self.labels[label] + (end_of_turn(tokenizer) if self.chat else "")

    def parse(self, generated: str) -> int | None:
        """The label whose word comes first in the answer (whole words, case ignored), else None. A tuned model answers
        with the word itself; an untuned one writes a sentence ("The sentiment of this review is positive"), which
        is read the same way, so that the two are compared fairly."""

        return parse_label(generated, self.labels)

    def affixes(self, tokenizer: Any) -> tuple[str, str]:
        """(prefix, suffix) with prompt(text) == prefix + template.format(text=text) + suffix: the chat template
        rendered once, so that an app builds prompts without jinja or transformers."""
        if not self.chat:
            return "", ""
        marker = "\x00BODY\x00"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False
        )
        prefix, suffix = rendered.split(marker)
        return prefix, suffix


def end_of_turn(tokenizer: Any) -> str:
    """The marker that closes an assistant turn in the tokenizer's chat template ("<|im_end|>" for SmolLM2), read
    from a rendered conversation: a GGUF file's eos_token metadata is not always the end of turn."""
    marker = "\x00ANSWER\x00"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    after = rendered.split(marker, 1)[1]
    special = sorted(tokenizer.all_special_tokens, key=len, reverse=True)
    for token in special:
        if after.startswith(token):
            return token
    return after.split("\n", 1)[0] or (tokenizer.eos_token or "")


def training_texts(
    task: PromptTask, tokenizer: Any, texts: list[str], labels: np.ndarray
) -> tuple[list[str], list[int]]:
    """prompt + answer strings and, per row, how many tokens the answer has (the positions the loss covers)."""
    full, answer_tokens = [], []
    for text, label in zip(texts, labels, strict=True):
        answer = task.answer(tokenizer, int(label))
        full.append(task.prompt(tokenizer, text) + answer)
        answer_tokens.append(len(tokenizer(answer, add_special_tokens=False)["input_ids"]))
    return full, answer_tokens


def answer_loss(
    answer_tokens: list[int],
) -> Callable[[torch.nn.Module, dict[str, torch.Tensor], list[int]], torch.Tensor]:
    """A loss_fn for train_classifier: next-token cross-entropy on each row's answer tokens only (the last
    `answer_tokens[row]` real tokens of a right-padded row)."""

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor], rows: list[int]) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = model(input_ids=ids, attention_mask=mask).logits
        target = torch.full_like(ids, -100)
        lengths = mask.sum(-1)
        for i, row in enumerate(rows):
            end = int(lengths[i])
            start = max(1, end - answer_tokens[row])
            target[i, start:end] = ids[i, start:end]
        # position t predicts token t+1
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target[:, 1:].reshape(-1), ignore_index=-100
        )

    return loss_fn
