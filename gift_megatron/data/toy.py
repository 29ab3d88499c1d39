"""The toy verifiable task of the CPU demo: single-digit addition.

Prompt ``"a+b="`` with digits a, b. Two variants (``task``):

- ``add`` (default, the demo's): answer ``a + b`` (0 to 18);
- ``add_mod10``: answer ``(a + b) mod 10``, always one digit.

The vocabulary is characters: ``0-9 + - =`` and space, plus the specials ``<pad> <eos> <bos>`` (17 ids).

The reward (``toy``, :class:`gift_megatron.rewards.ToyReward`) reads the integer the decoded response starts
with (leading spaces allowed, anything after the number ignored; the response is the text before EOS with
special tokens removed). Default ``mode: graded``: ``max(0, 1 - |n - answer| / 10)``, 0.0 without a number;
``mode: exact``: 1.0 only for ``n == answer``; ``max_digits: 1`` reads only the first digit.

Why graded by default: with an exact-match reward a tiny model from random weights has to discover the
whole addition table from one bit per sample, which on 2 CPU cores takes far longer than the demo's
10 minutes (measured: exact-match reward flat at chance after 200 GRPO steps); the graded reward lets it
first learn "larger operands, larger answer" and then sharpen to exact sums.

What a policy sampling token ids uniformly scores (up to 3 tokens; tests/test_rewards.py estimates it by
sampling, over the tokenizer's 17 ids and over the demo model's 32 embedding rows):

| task | reward options | random policy |
|---|---|---|
| add | (default: graded) | 0.15-0.20 |
| add_mod10 | mode: exact, max_digits: 1 | 0.05-0.06 (the first character is the answer digit) |
| add_mod10 | (default: graded) | 0.20-0.27 |
| add | mode: exact | 0.015-0.02 (too sparse for the 10-minute demo) |

    python -m gift_megatron.data.toy --out runs/toy_task [--task add_mod10]   # train.jsonl, eval.jsonl, tokenizer/
"""

from __future__ import annotations

import argparse
import json
import os
import random

CHARS = list("0123456789+-= ")
SPECIALS = ["<pad>", "<eos>", "<bos>"]
TASKS = ("add", "add_mod10")


def build_tokenizer():
    """A character-level Hugging Face fast tokenizer (``tokenizers`` WordLevel over single characters).

    Ids: <pad>=0, <eos>=1, <bos>=2, then the characters in CHARS order. It is a real PreTrainedTokenizerFast,
    so ``save_pretrained`` writes tokenizer.json and AutoTokenizer loads it like any model's tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # every character is a token
    core.decoder = decoders.Fuse()  # join characters back without separators
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def _answer(a: int, b: int, task: str) -> int:
    return a + b if task == "add" else (a + b) % 10


def toy_rows(n: int, seed: int, task: str = "add") -> list[dict]:
    """``n`` rows of ``task`` drawn with ``seed``. Each row carries the correct answer as ``expert`` and
    three teachers (right, wrong, right), so GFT groups mix good and bad demonstrations."""
    if task not in TASKS:
        raise ValueError(f"toy task: unknown task {task!r}; choose one of {list(TASKS)}")
    rng = random.Random(seed)
    span = 19 if task == "add" else 10  # number of possible answers
    prefix = "toy" if task == "add" else f"toy-{task}"  # "add" ids as before: its files stay byte-identical
    rows = []
    for i in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        right = _answer(a, b, task)
        wrong = (right + 1 + rng.randrange(span - 1)) % span  # any other possible answer, never the right one
        rows.append(
            {
                "id": f"{prefix}-{seed}-{i}",
                "prompt": f"{a}+{b}=",
                "answer": str(right),
                "expert": str(right),
                "teachers": [str(right), str(wrong), str(right)],
            }
        )
    return rows


def write_toy_task(
    out_dir: str | os.PathLike, *, num_train: int = 2000, num_eval: int = 100, seed: int = 0, task: str = "add"
) -> dict[str, str]:
    """Write ``train.jsonl``, ``eval.jsonl`` (drawn with ``seed`` and ``seed + 1``) and ``tokenizer/`` under
    ``out_dir``; returns their paths under the keys ``train``, ``eval``, ``tokenizer``."""
    if num_train < 1 or num_eval < 0:
        raise ValueError(f"toy task: need num_train >= 1 and num_eval >= 0, got {num_train}, {num_eval}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "train": os.path.join(out_dir, "train.jsonl"),
        "eval": os.path.join(out_dir, "eval.jsonl"),
        "tokenizer": os.path.join(out_dir, "tokenizer"),
    }
    for split, n, s in (("train", num_train, seed), ("eval", num_eval, seed + 1)):
        tmp = paths[split] + ".tmp"  # written whole, then renamed: a rerun never sees half a file
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in toy_rows(n, s, task):
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
    p.add_argument("--task", choices=TASKS, default="add")
    a = p.parse_args()
    for k, v in write_toy_task(a.out, num_train=a.num_train, num_eval=a.num_eval, seed=a.seed, task=a.task).items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
