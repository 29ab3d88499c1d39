"""Layer 5 inputs: prompt datasets (JSONL / Parquet), tokenizers, and the toy task of the CPU demo."""

from gift_megatron.data.prompts import FIELDS, DatasetError, LoadReport, PromptExample, load_prompts, parse_row
from gift_megatron.data.tokenizer import Tokenizer, check_vocab

__all__ = [
    "FIELDS",
    "DatasetError",
    "LoadReport",
    "PromptExample",
    "Tokenizer",
    "check_vocab",
    "load_prompts",
    "parse_row",
]
