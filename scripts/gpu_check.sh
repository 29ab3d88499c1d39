#!/usr/bin/env bash
# The GPU check (issue 11, item 8): one prepared run on ONE H100/H200 without Transformer Engine or vLLM,
# under 9 minutes; prints one table (gpu tests, a 0.5B trainer run, logprobs, step and packing benchmarks).
#
# A later session runs it like this:
#   1. On the CPU machine, in the repository root of the checkout the session was started in (the device
#      tool sends that checkout, not a helper's worktree), fetch the wheels the GPU machine lacks into the
#      git-ignored .whl/ (megatron-core 0.19.2, math-verify and its two dependencies, omegaconf; about 2.8 MiB):
#        .venv/bin/python scripts/gpu_check.py --prepare
#      and check it first at tiny shapes on CPU (about a minute on an idle 2-core machine):
#        .venv/bin/python scripts/gpu_check.py --cpu-dry
#   2. Then exactly this device tool call (the stages' budget is 490 s; the rest is start-up margin):
#        run(command="PYTHONUNBUFFERED=1 bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=580)
#      The table is the end of output_tail; $OUT/gpu_check.md, gpu_check.json and gpu_check_logs.txt come
#      back as files (rewritten after every stage, so a cut-off run still returns the stages it finished).
#      Budget: a session has 15 minutes of device time, the machine's start included (a minute or more), so
#      this call leaves time for one short rerun, at once, while the machine is still warm (30 s), of only
#      the stages to look at again (setup always runs), e.g.
#        run(command="PYTHONUNBUFFERED=1 bash scripts/gpu_check.sh --stages trainer --budget 200", carry=[".whl"], timeout_s=240)
#      and give_back otherwise.
#
# Arguments go to scripts/gpu_check.py (--cpu-dry, --stages, --budget, --out, --keep-workdir).
# PYTHON overrides the interpreter (default python3: the GPU machine's, which holds torch).
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
