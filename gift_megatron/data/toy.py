"""The toy verifiable task of the CPU demo: single-digit addition.

Prompt ``"a+b="`` with digits a, b; answer ``a + b`` (0 to 18). The vocabulary is characters:
``0-9 + - = `` and the specials ``<pad> <eos> <bos>``.

The reward (``toy``, :class:`gift_megatron.rewards.ToyReward`) reads the number the response starts with:
``max(0, 1 - |number - answer| / 10)``, so 1.0 for the exact sum and partial credit for near misses, 0.0
without a number. Why partial credit: with an exact-match reward a tiny model from random weights has to
discover the whole addition table from one bit per sample, which on 2 CPU cores takes far longer than the
demo's 10 minutes (measured: exact-match reward flat at chance, about 0.1, after 200 GRPO steps); the
graded reward lets it first learn "larger operands, larger answer" and then sharpen to exact sums.

    python -m gift_megatron.data.toy --out runs/toy_task    # train.jsonl, eval.jsonl, tokenizer/
"""

from __future__ import annotations

import argparse
import json
import os
import random

CHARS = list("0123456789+-= ")
SPECIALS = ["<pad>", "<eos>", "<bos>"]


def build_tokenizer():
    """A character-level Hugging Face fast tokenizer (tokenizers' WordLevel over single characters)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # every character is a token
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def toy_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        answer = str(a + b)
        wrong = str((a + b + 1 + rng.randrange(18)) % 19)
        rows.append({"id": f"toy-{seed}-{i}", "prompt": f"{a}+{b}=", "answer": answer, "expert": answer,
                     "teachers": [answer, wrong, answer]})
    return rows


def write_toy_task(out_dir: str, *, num_train: int = 2000, num_eval: int = 100, seed: int = 0) -> dict[str, str]:
    """Write ``train.jsonl``, ``eval.jsonl`` and ``tokenizer/`` under ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"train": os.path.join(out_dir, "train.jsonl"), "eval": os.path.join(out_dir, "eval.jsonl"),
             "tokenizer": os.path.join(out_dir, "tokenizer")}
    for split, n, s in (("train", num_train, seed), ("eval", num_eval, seed + 1)):
        tmp = paths[split] + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in toy_rows(n, s):
                fh.write(json.dumps(row) + "\n")
        os.replace(tmp, paths[split])
    build_tokenizer().save_pretrained(paths["tokenizer"])
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-eval", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    for k, v in write_toy_task(a.out, num_train=a.num_train, num_eval=a.num_eval, seed=a.seed).items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
