"""One tokenizer interface over Hugging Face tokenizers (a model dir with tokenizer files) and
sentencepiece ``.model`` files, with chat templates from the tokenizer."""

from __future__ import annotations

import os
from typing import Any

from gift_megatron.data.prompts import PromptExample


class Tokenizer:
    """encode / decode / special ids / prompt token ids of a dataset row.

    ``encode`` adds no special tokens (responses and demonstrations are appended after the prompt);
    ``prompt_ids`` adds what the model expects at the start (BOS, or the chat template's tokens).
    """

    def __init__(self, backend: Any, kind: str, *, use_chat_template: bool = False, source: str = "") -> None:
        self.backend, self.kind, self.use_chat_template, self.source = backend, kind, use_chat_template, source
        if kind == "hf":
            self.eos_id = backend.eos_token_id
            self.bos_id = backend.bos_token_id
            self.pad_id = backend.pad_token_id if backend.pad_token_id is not None else self.eos_id
            self.vocab_size = len(backend)
            self._add_bos = bool(getattr(backend, "add_bos_token", False)) and self.bos_id is not None
        else:
            self.eos_id = backend.eos_id() if backend.eos_id() >= 0 else None
            self.bos_id = backend.bos_id() if backend.bos_id() >= 0 else None
            pad = backend.pad_id()
            self.pad_id = pad if pad >= 0 else self.eos_id
            self.vocab_size = backend.get_piece_size()
            self._add_bos = self.bos_id is not None
        if self.eos_id is None:
            raise ValueError(f"tokenizer {source}: it defines no EOS token, which generation needs to stop")
        if self.pad_id is None:
            self.pad_id = self.eos_id

    @classmethod
    def load(cls, path: str, *, use_chat_template: bool = False) -> "Tokenizer":
        """A Hugging Face tokenizer dir, or a sentencepiece ``.model`` file."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"data.tokenizer: {path} does not exist")
        if os.path.isfile(path) and path.endswith(".model"):
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor()
            sp.Load(path)
            if use_chat_template:
                raise ValueError(f"data.use_chat_template: sentencepiece model {path} has no chat template")
            return cls(sp, "sentencepiece", source=path)
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"data.tokenizer: cannot load a tokenizer from {path}: {exc}") from exc
        if use_chat_template and not getattr(tok, "chat_template", None):
            raise ValueError(f"data.use_chat_template: the tokenizer in {path} has no chat_template")
        return cls(tok, "hf", use_chat_template=use_chat_template, source=path)

    def encode(self, text: str) -> list[int]:
        if self.kind == "hf":
            return list(self.backend.encode(text, add_special_tokens=False))
        return list(self.backend.EncodeAsIds(text))

    def decode(self, ids: list[int]) -> str:
        if self.kind == "hf":
            return self.backend.decode(ids, skip_special_tokens=True)
        return self.backend.DecodeIds(list(ids))

    def prompt_ids(self, example: PromptExample) -> list[int]:
        """The token ids the model conditions on: the chat template for chat rows (and for plain prompts
        when ``use_chat_template``), otherwise BOS (if the tokenizer uses one) + the prompt."""
        chat = example.messages
        if chat is None and self.use_chat_template:
            chat = (("user", example.prompt),)
        if chat is not None:
            if self.kind != "hf" or not getattr(self.backend, "chat_template", None):
                raise ValueError(f"{example.source}:{example.line}: a chat row needs a tokenizer with a chat "
                                 f"template ({self.source} has none)")
            ids = self.backend.apply_chat_template([{"role": r, "content": c} for r, c in chat],
                                                   add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 may return a BatchEncoding
                ids = ids["input_ids"]
            return list(ids)
        return ([self.bos_id] if self._add_bos else []) + self.encode(example.prompt)

    def save(self, directory: str) -> None:
        """Write the tokenizer files (HF) into ``directory`` (rollout engines load them from there)."""
        if self.kind != "hf":
            raise ValueError("only Hugging Face tokenizers can be saved to a model dir")
        self.backend.save_pretrained(directory)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """The tokenizer's ids must fit the model's (unpadded) vocabulary."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but model.vocab_size is "
                         f"{model_vocab_size}: token ids would index past the embedding")
