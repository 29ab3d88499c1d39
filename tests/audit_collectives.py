"""Run the trainer with every torch.distributed collective recorded: ``python -m tests.audit_collectives
CONFIG [key=value ...]`` under torchrun, with GIFT_AUDIT_OUT=DIR.

Each rank writes DIR/rank{R}.json: one record per outermost collective call with the op, the first caller
outside torch (file:line), whether that caller is gift_megatron code other than ``gift_megatron/comm.py``
(a bypass of the comm helpers), and for tensor collectives the tensors' devices against the device the
group's backend takes (``gift_megatron.comm.group_device``). Used by tests/test_device_discipline.py.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import threading

import torch
import torch.distributed as dist

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gift_megatron")
COMM = os.path.join(PACKAGE, "comm.py")
TORCH = os.path.dirname(os.path.abspath(torch.__file__))

# Tensor collectives: (name, positional index of the group argument or None when keyword-only).
TENSOR_OPS = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "send",
    "recv",
    "isend",
    "irecv",
    "gather",
    "scatter",
    "reduce",
    "all_to_all_single",
    "all_to_all",
    "reduce_scatter",
    "batch_isend_irecv",
)
OBJECT_OPS = (
    "all_gather_object",
    "broadcast_object_list",
    "send_object_list",
    "recv_object_list",
    "gather_object",
    "scatter_object_list",
    "barrier",
    "new_group",
)

_state = threading.local()
records: list[dict] = []


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(TORCH):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{os.path.abspath(frame.f_code.co_filename)}:{frame.f_lineno}"


def _tensors(args, kwargs):
    found = []
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            found.extend(t for t in v if isinstance(t, torch.Tensor))
    return found


def _wrap(name: str, fn):
    @functools.wraps(fn)
    def recorded(*args, **kwargs):
        if getattr(_state, "inside", False):  # a collective torch runs inside another one
            return fn(*args, **kwargs)
        where = _caller()
        path = where.rsplit(":", 1)[0]
        rec = {"op": name, "caller": where, "bypass": path.startswith(PACKAGE) and path != COMM}
        if name in TENSOR_OPS:
            from gift_megatron.comm import group_device

            group = kwargs.get("group")
            want = group_device(group)
            rec["devices"] = sorted({str(t.device) for t in _tensors(args, kwargs)})
            rec["group_device"] = str(want)
            rec["wrong_device"] = any(t.device != want for t in _tensors(args, kwargs))
        records.append(rec)
        _state.inside = True
        try:
            return fn(*args, **kwargs)
        finally:
            _state.inside = False

    return recorded


def install() -> None:
    for name in TENSOR_OPS + OBJECT_OPS:
        if hasattr(dist, name):
            setattr(dist, name, _wrap(name, getattr(dist, name)))


def _dump() -> None:
    out = os.environ.get("GIFT_AUDIT_OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"rank{os.environ.get('RANK', '0')}.json"), "w") as fh:
            json.dump(records, fh)


if __name__ == "__main__":
    install()
    atexit.register(_dump)
    from gift_megatron.cli import main

    code = main(["train", *sys.argv[1:]])
    _dump()
    sys.exit(code)
