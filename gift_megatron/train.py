"""``python -m gift_megatron.train CONFIG.yaml [key=value ...]``: the same as ``gift-megatron train``."""

import sys

from gift_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
