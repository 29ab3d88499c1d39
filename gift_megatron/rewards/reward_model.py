"""A Hugging Face reward model (sequence classification with one output) as a reward function."""

from __future__ import annotations

from typing import Sequence

import torch

from gift_megatron.rewards.base import RewardInput


class RewardModel:
    """Scores ``(prompt, response)`` with ``AutoModelForSequenceClassification`` (num_labels 1), in batches.

    The pair is formatted with the reward model's chat template when it has one (user: prompt,
    assistant: response), else as ``prompt + response``. Args: path (model dir), device, batch_size,
    max_length (tokens; longer inputs are truncated from the left, keeping the response's end).
    """

    def __init__(self, path: str, device: str | None = None, batch_size: int = 8, max_length: int = 4096,
                 dtype: str = "float32") -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=getattr(torch, dtype)).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise ValueError(f"reward reward_model:{path}: cannot load it: {exc}") from exc
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward reward_model:{path}: expected a scalar head (num_labels=1), got "
                             f"{self.model.config.num_labels}")
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.max_length = batch_size, max_length

    def format(self, s: RewardInput) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.response}], tokenize=False)
        return s.prompt + s.response

    @torch.no_grad()
    def __call__(self, samples: Sequence[RewardInput]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(samples), self.batch_size):
            texts = [self.format(s) for s in samples[i:i + self.batch_size]]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length).to(self.device)
            out.extend(self.model(**enc).logits[:, 0].float().cpu().tolist())
        return out
