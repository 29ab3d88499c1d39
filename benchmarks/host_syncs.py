"""Host synchronizations per micro-batch and per trainer step, counted on the CPU.

On a GPU every ``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``, ``nonzero``, ``unique`` or boolean-mask
index of a device tensor makes the host wait for the GPU stream. A CPU run cannot time that, but it can
count those calls: a torch function mode sees each of them, and the first caller outside torch says whose
it is (ours in gift_megatron/, Megatron-Core's, or others'). On a CPU every tensor is a host tensor, so
host-side bookkeeping of the trainer is counted too; the ObjectiveStep numbers are of tensors that live on
the GPU in a CUDA run.

    python benchmarks/host_syncs.py [--steps 2] [--sizes 4 16]

One process, the toy task, 128 members per step (16 prompts x 8), micro-batches of each size given. Prints
the table and a line per goal: no host sync per member in the step, i.e. ours per micro-batch is the same
for every micro-batch size.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

import torch
from torch.overrides import TorchFunctionMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
PACKAGE = os.path.join(ROOT, "gift_megatron")

SYNC_METHODS = {
    "item",
    "tolist",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "nonzero",
    "unique",
    "masked_select",
    "numpy",
    "cpu",
    "unique_consecutive",
    "argwhere",
}


class SyncCounter(TorchFunctionMode):
    """Counts the calls that would synchronize with a GPU stream, by who made them."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        sync = name in SYNC_METHODS or (name == "__getitem__" and len(args) > 1 and _bool_index(args[1]))
        if sync:
            self.counts[_owner()] += 1
        return func(*args, **(kwargs or {}))


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _owner() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(TORCH_DIR) and not path.endswith("host_syncs.py"):
            if path.startswith(PACKAGE):
                return "ours"
            return "megatron" if "/megatron/core/" in path else "other"
        frame = frame.f_back
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 16], help="micro-batch sizes (members)")
    args = p.parse_args()
    os.environ.setdefault("GIFT_MEGATRON_DEVICE", "cpu")

    from gift_megatron.config import load_config
    from gift_megatron.data.toy import write_toy_task
    from gift_megatron.trainer.loop import Trainer

    tmp = tempfile.mkdtemp(prefix="gift_syncs_")
    write_toy_task(os.path.join(tmp, "toy"), num_train=64, num_eval=8, seed=0)
    rows = []
    cases = [
        (o, opt, size)
        for size in args.sizes
        for o, opt in (("gift", "{reference: frozen}"), ("gift", "{reference: rollout}"), ("grpo", "{}"))
    ]
    for objective, options, size in cases:
        task = os.path.join(tmp, "toy")
        cfg = load_config(
            os.path.join(ROOT, "examples", "tiny_cpu_gift.yaml"),
            [
                f"data.train_files=[{task}/train.jsonl]",
                f"data.eval_files=[{task}/eval.jsonl]",
                f"data.tokenizer={task}/tokenizer",
                "run.progress=false",
                "run.tensorboard=false",
                "run.plots=false",
                f"run.output_dir={tmp}/run_{objective}_{len(rows)}",
                f"train.micro_batch_size={size}",
                f"objective.name={objective}",
                f"objective.options={options}",
                "optimizer.use_distributed_optimizer=false",
            ],
        )
        trainer = Trainer(cfg)
        try:
            step_counter, trainer_counter = SyncCounter(), SyncCounter()
            inner = trainer.train_step.__call__
            n_micro = [0]

            def counted_step(mbs, _inner=inner, **kwargs):
                n_micro[0] += len(mbs)
                with step_counter:
                    return _inner(mbs, **kwargs)

            trainer.train_step = _Wrapped(trainer.train_step, counted_step)
            trainer.train_one_step()  # warm-up: first-call caches
            step_counter.counts.clear()
            n_micro[0] = 0
            with trainer_counter:
                for _ in range(args.steps):
                    trainer.train_one_step()
            per_mb = {k: v / max(n_micro[0], 1) for k, v in step_counter.counts.items()}
            per_step = {k: v / args.steps for k, v in trainer_counter.counts.items()}
            rows.append((f"{objective} {options}", size, per_mb, per_step))
        finally:
            trainer.close()

    print("\nhost syncs (counted on CPU): per micro-batch inside ObjectiveStep, per step in the whole trainer step")
    print(
        f"{'objective':<28}{'mb size':>8}{'step: ours/mb':>15}{'step: all/mb':>14}{'trainer: ours/step':>20}"
        f"{'trainer: all/step':>19}"
    )
    for name, size, per_mb, per_step in rows:
        print(
            f"{name:<28}{size:>8}{per_mb.get('ours', 0):>15.2f}{sum(per_mb.values()):>14.2f}"
            f"{per_step.get('ours', 0):>20.1f}{sum(per_step.values()):>19.1f}"
        )
    by_name = collections.defaultdict(list)
    for name, size, per_mb, _ in rows:
        by_name[name].append((size, per_mb.get("ours", 0)))
    for name, points in by_name.items():
        (s0, c0), (s1, c1) = min(points), max(points)
        # Per-step syncs (statistics, metrics) spread over fewer micro-batches at the larger size, so the
        # per-micro-batch count may rise a little; a per-member sync would multiply it by s1 / s0.
        holds = c1 <= c0 * 1.5 + 1
        print(
            f"goal: {name}: no per-member host sync in the step ({c0:.2f}/mb at {s0} members, {c1:.2f}/mb at "
            f"{s1}) -> {'holds' if holds else 'does not hold'}"
        )


class _Wrapped:
    """The trainer's ObjectiveStep with its __call__ counted; every other attribute is the step's."""

    def __init__(self, step, call) -> None:
        self._step, self._call = step, call

    def __call__(self, mbs, **kwargs):
        return self._call(mbs, **kwargs)

    def __getattr__(self, name):
        return getattr(self._step, name)


if __name__ == "__main__":
    main()
