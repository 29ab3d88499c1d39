"""gift_megatron: GIFT and GFT post-training objectives for NVIDIA Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="gift_megatron",
    version="0.1.0",
    description="GIFT and GFT post-training objectives for NVIDIA Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["gift_megatron", "gift_megatron.*"]),
    install_requires=[
        "torch>=2.6",
        # 0.16 is the last line that installs on Python 3.11; 0.17+ needs 3.12.
        "megatron-core>=0.16,<0.20",
        # dist_checkpointing.save hangs without psutil, which megatron-core does not declare.
        "psutil",
        "numpy",
        "pyyaml",
        # The config loader (gift_megatron.config, structured configs); 2.3 is the line hydra-core 1.3 allows.
        "omegaconf>=2.3",
        # The trainer's data, rewards and observability layers.
        "safetensors",
        "pyarrow",
        "math-verify",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    entry_points={"console_scripts": ["gift-megatron=gift_megatron.cli:main"]},
    extras_require={
        # Transformer Engine only on CUDA machines: installing it on CPU breaks `import megatron.core`.
        "te": ["transformer-engine[pytorch]>=2.4"],
        "vllm": ["vllm>=0.10.2,<0.34"],
        # nemo-run 0.11 imports leptonai, whose 0.47+ releases break that import.
        "launch": ["nemo-run>=0.11,<0.12", "leptonai<0.47"],
        "hf": ["transformers>=4.51", "safetensors", "sentencepiece"],
        "dev": [
            "pytest",
            "pytest-timeout",
            "hypothesis",
            "transformers>=4.51",
            "safetensors",
            "sentencepiece",
            "nemo-run>=0.11,<0.12",
            "leptonai<0.47",
            "tqdm",
            "rich",
            # make lint: lint and format, types, the layer contract (.importlinter).
            "ruff",
            "pyrefly",
            "import-linter",
        ],
    },
)
