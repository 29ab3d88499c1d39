"""One tokenizer interface over Hugging Face tokenizers (a model dir with tokenizer files) and
sentencepiece ``.model`` files, with chat templates from the tokenizer."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from gift_megatron.data.prompts import PromptExample


class Tokenizer:
    """encode / decode / special ids / prompt token ids of a dataset row.

    ``encode`` adds no special tokens, because responses and demonstrations are appended after the prompt;
    ``prompt_ids`` adds what the model expects at the start (BOS, or the chat template's own tokens).
    ``vocab_size`` is one more than the largest id the tokenizer can produce (what the embedding must hold).
    """

    def __init__(
        self,
        backend: Any,
        kind: str,
        *,
        use_chat_template: bool = False,
        source: str = "",
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if kind not in ("hf", "sentencepiece"):
            raise ValueError(f"tokenizer kind must be 'hf' or 'sentencepiece', got {kind!r}")
        self.backend, self.kind, self.source = backend, kind, source
        self.use_chat_template = use_chat_template
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        if kind == "hf":
            eos, pad = backend.eos_token_id, backend.pad_token_id
            self.bos_id = backend.bos_token_id
            # len() counts added tokens; ids can still have gaps, so the largest id decides what fits.
            self.vocab_size = max(len(backend), max(backend.get_vocab().values(), default=-1) + 1)
            self._add_bos = self.bos_id is not None and self._hf_adds_bos()
        else:
            eos = backend.eos_id() if backend.eos_id() >= 0 else None
            self.bos_id = backend.bos_id() if backend.bos_id() >= 0 else None
            pad = backend.pad_id() if backend.pad_id() >= 0 else None
            self.vocab_size = backend.get_piece_size()
            self._add_bos = self.bos_id is not None  # sentencepiece models with a BOS piece (Llama 1/2) expect it
        if eos is None:
            raise ValueError(f"tokenizer {source}: it defines no EOS token, which generation needs to stop")
        self.eos_id: int = eos
        self.pad_id: int = eos if pad is None else pad  # padding is always masked out; any valid id does

    def _hf_adds_bos(self) -> bool:
        # Whether BOS is prepended is decided by the tokenizer's post-processor (Llama: yes, Qwen: no); an
        # `add_bos_token` attribute does not exist on every tokenizer class, so ask the tokenizer itself.
        probe = "a"
        with_special = self.backend.encode(probe, add_special_tokens=True)
        return (
            bool(with_special)
            and with_special[0] == self.bos_id
            and self.backend.encode(probe, add_special_tokens=False)[:1] != [self.bos_id]
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        use_chat_template: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> Tokenizer:
        """A Hugging Face tokenizer dir (``AutoTokenizer.from_pretrained``), or a sentencepiece ``.model`` file.

        use_chat_template: also format plain ``prompt`` rows with the chat template (chat rows always use it).
        chat_template_kwargs: extra variables for the template, e.g. ``{"enable_thinking": False}`` (Qwen3).
        """
        path = str(os.fspath(path))
        if not os.path.exists(path):
            raise FileNotFoundError(f"data.tokenizer: {path} does not exist")
        if os.path.isfile(path):
            if not path.endswith(".model"):
                raise ValueError(
                    f"data.tokenizer: {path} is a file but not a sentencepiece .model; give a "
                    "Hugging Face tokenizer folder or a .model file"
                )
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor()
            try:
                sp.Load(path)
            except (OSError, RuntimeError) as exc:
                raise ValueError(f"data.tokenizer: cannot load sentencepiece model {path}: {exc}") from exc
            if use_chat_template:
                raise ValueError(f"data.use_chat_template: sentencepiece model {path} has no chat template")
            return cls(sp, "sentencepiece", source=path)
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"data.tokenizer: cannot load a tokenizer from {path}: {exc}") from exc
        if use_chat_template and not getattr(tok, "chat_template", None):
            raise ValueError(f"data.use_chat_template: the tokenizer in {path} has no chat_template")
        return cls(
            tok, "hf", use_chat_template=use_chat_template, source=path, chat_template_kwargs=chat_template_kwargs
        )

    @property
    def has_chat_template(self) -> bool:
        return self.kind == "hf" and bool(getattr(self.backend, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without any special token."""
        if self.kind == "hf":
            return list(self.backend.encode(text, add_special_tokens=False))
        return list(self.backend.EncodeAsIds(text))

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` with special tokens (BOS, EOS, padding) left out."""
        if self.kind == "hf":
            return self.backend.decode(list(ids), skip_special_tokens=True)
        return self.backend.DecodeIds(list(ids))

    def prompt_ids(self, example: PromptExample) -> list[int]:
        """The token ids the model conditions on: the chat template (with the generation prompt) for chat
        rows, and for plain prompts when ``use_chat_template``; otherwise BOS (if the tokenizer prepends
        one) followed by the prompt."""
        if example.messages is None and not self.use_chat_template:
            return ([self.bos_id] if self._add_bos and self.bos_id is not None else []) + self.encode(
                example.prompt or ""
            )
        if not self.has_chat_template:
            raise ValueError(
                f"{example.where}: a chat row needs a tokenizer with a chat template ({self.source} "
                "has none); give the row a 'prompt' instead, or a tokenizer with a chat_template"
            )
        # The template writes BOS itself where the model wants it, so nothing is added here.
        return list(
            self.backend.apply_chat_template(
                example.chat, add_generation_prompt=True, tokenize=True, return_dict=False, **self.chat_template_kwargs
            )
        )

    def save(self, directory: str) -> None:
        """Write the tokenizer files (HF) into ``directory`` (rollout engines load them from there)."""
        if self.kind != "hf":
            raise ValueError(f"tokenizer {self.source}: only Hugging Face tokenizers can be saved to a model dir")
        self.backend.save_pretrained(directory)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """The tokenizer's ids must fit the model's (unpadded) vocabulary; the error names both sizes."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{model_vocab_size}: token ids would index past the embedding (wrong tokenizer for "
            "this checkpoint, or model.vocab_size too small)"
        )
