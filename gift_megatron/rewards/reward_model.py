"""A Hugging Face reward model (sequence classification with one output) as a reward function."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from gift_megatron.rewards.base import RewardInput

log = logging.getLogger("gift_megatron.rewards")


class RewardModel:
    """Scores ``(prompt, response)`` with ``AutoModelForSequenceClassification`` (num_labels 1), in batches.

    Formatting: with the reward model's chat template (``chat_template: auto`` and the tokenizer has one,
    or ``true``), the row's chat (its ``messages``, or the prompt as one user turn) followed by the response
    as the assistant turn, tokenized without adding special tokens again (the template writes them);
    otherwise the plain text ``prompt + response`` with the tokenizer's usual special tokens.

    Padding: sequence-classification heads read the score at the last token that is not the pad id, so
    batches are padded with the id the model's config names (the convention it was trained with); when the
    config names none, the tokenizer's pad token (or EOS) becomes the config's, so a batched score equals
    scoring the sequence alone.

    Args: path (model dir, or a hub id that from_pretrained resolves), device (default: cuda when available),
    batch_size, max_length (tokens; longer inputs lose their beginning, keeping the response's end), dtype
    (a torch dtype name), chat_template (``auto`` | true | false).
    """

    def __init__(
        self,
        path: str,
        device: str | None = None,
        batch_size: int = 8,
        max_length: int | None = 4096,
        dtype: str = "float32",
        chat_template: bool | str = "auto",
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.spec = f"reward_model:{path}"
        if path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(path)):
            # A local path (a hub id would not start like this): say so rather than try a download.
            raise ValueError(f"reward {self.spec}: cannot load it: {path} is not a model folder")
        path = os.path.expanduser(path)
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"reward {self.spec}: dtype {dtype!r} is not a torch dtype (e.g. float32, bfloat16)")
        if batch_size < 1:
            raise ValueError(f"reward {self.spec}: batch_size must be >= 1, got {batch_size}")
        from gift_megatron.device import compute_device

        self.device = torch.device(device) if device else compute_device()
        try:
            # Any: transformers' stubs type the loaded tokenizer as Optional and per backend.
            tokenizer: Any = AutoTokenizer.from_pretrained(path)
            self.tokenizer = tokenizer
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype))
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"reward {self.spec}: cannot load it: {exc}") from exc
        self.model.to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"reward {self.spec}: expected a scalar head (num_labels=1), got {self.model.config.num_labels}"
            )
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if chat_template is True and not has_template:
            raise ValueError(f"reward {self.spec}: chat_template: true but its tokenizer has no chat_template")
        if chat_template not in (True, False, "auto"):
            raise ValueError(f"reward {self.spec}: chat_template must be auto, true or false, got {chat_template!r}")
        self.use_chat_template = has_template if chat_template == "auto" else bool(chat_template)
        self._set_padding()
        self.tokenizer.truncation_side = "left"
        self.tokenizer.padding_side = "right"  # positions stay 0..n-1 for every sequence, as when scored alone
        self.batch_size, self.max_length = batch_size, max_length

    def _set_padding(self) -> None:
        tok, config = self.tokenizer, self.model.config
        pad = getattr(config, "pad_token_id", None)
        if pad is None:
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            if pad is None:
                raise ValueError(
                    f"reward {self.spec}: neither the model config nor the tokenizer names a pad or "
                    "EOS token, so batches cannot be padded"
                )
            config.pad_token_id = pad
        if tok.pad_token_id != pad:
            tok.pad_token = tok.convert_ids_to_tokens(pad)

    def format(self, s: RewardInput) -> str:
        """The text the reward model reads for sample ``s``."""
        if not self.use_chat_template:
            return s.prompt + s.response
        chat = (
            s.example.chat
            if s.example is not None and hasattr(s.example, "chat")
            else [{"role": "user", "content": s.prompt}]
        )
        return self.tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": s.response}], tokenize=False)

    @torch.no_grad()
    def __call__(self, samples: Sequence[RewardInput]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(samples), self.batch_size):
            texts = [self.format(s) for s in samples[i : i + self.batch_size]]
            enc = self.tokenizer(
                texts,
                return_tensors="pt",
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                add_special_tokens=not self.use_chat_template,
            )
            out.extend(self.model(**enc.to(self.device)).logits[:, 0].float().cpu().tolist())
        return out
