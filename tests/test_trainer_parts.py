"""Pieces of the trainer that need no process group: packing groups into micro-batches, metrics, plots."""

from __future__ import annotations

import json
import os

import pytest
import torch

from gift_megatron.trainer.batch import Member, micro_batches, pack
from gift_megatron.trainer.metrics import MetricsLogger, plot_run, read_metrics


def test_pack_shifts_labels_and_masks_exactly_the_response():
    members = [
        Member(0, [5, 6, 7], [8, 9, 2], "rollout", reward=1.0),
        Member(0, [5, 6, 7], [4, 2], "expert"),
        Member(3, [1], [2], "teacher", reward=-0.5),
    ]
    b = pack(members, seq_length=6, pad_id=0)
    assert b["tokens"].shape == (3, 6) and b["labels"].shape == (3, 6) and b["loss_mask"].shape == (3, 6)
    for i, m in enumerate(members):
        full = m.prompt_ids + m.response_ids
        # Position t predicts labels[t]; the mask selects exactly the positions whose label is a response token.
        predicted = [int(b["labels"][i, t]) for t in range(6) if b["loss_mask"][i, t] > 0]
        assert predicted == m.response_ids
        assert b["tokens"][i, : len(full)].tolist() == full[:6]
        assert b["labels"][i, : len(full) - 1].tolist() == full[1:]
    assert b["rewards"].tolist() == [1.0, 0.0, -0.5] and b["group_ids"].tolist() == [0, 0, 3]
    assert [len(mb["tokens"]) for mb in micro_batches(b, 1)] == [1, 1, 1]
    with pytest.raises(ValueError, match="not a multiple of train.micro_batch_size"):
        micro_batches(b, 2)


def test_pack_errors_name_the_member():
    with pytest.raises(ValueError, match=r"group 4 rollout member: prompt \(3\) \+ response \(5\) tokens exceed"):
        pack([Member(4, [1, 2, 3], [1, 1, 1, 1, 2], "rollout")], seq_length=6, pad_id=0)
    with pytest.raises(ValueError, match="group 1 expert member: empty response"):
        pack([Member(1, [1, 2], [], "expert")], seq_length=6, pad_id=0)


def test_metrics_resume_drops_steps_after_the_checkpoint_and_plots(tmp_path):
    run = str(tmp_path)
    logger = MetricsLogger(run, enabled=True, tensorboard=True, progress=False)
    for step in range(1, 6):
        logger.log(
            step,
            {
                "loss": 1.0 / step,
                "rollout/reward_mean": step / 10,
                "kl/reference": step * 0.01,
                "response/length_mean": 3.0,
                "gift/beta_x_mean": 2.0,
                "gift/beta_x_median": 1.5,
            },
        )
    logger.close()
    with open(os.path.join(run, "metrics.jsonl"), "a") as fh:
        fh.write('{"step": 6, "loss": 0.1')  # the half-written line of a killed job
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]
    resumed = MetricsLogger(run, enabled=True, resume_step=3, tensorboard=False, progress=False)
    resumed.log(4, {"loss": 0.9})
    resumed.close()
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["loss"] == 0.9
    assert os.listdir(os.path.join(run, "tensorboard"))
    files = plot_run(run)
    names = sorted(os.path.basename(f) for f in files)
    assert names == ["gift_beta.png", "kl.png", "loss.png", "response_length.png", "reward.png", "summary.png"]
    for f in files:
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics"):
        plot_run(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "other": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no plottable metrics"):
        plot_run(str(tmp_path))


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(str(tmp_path / "run"), enabled=False)
    logger.log(1, {"loss": torch.tensor(1.0).item()})
    logger.close()
    assert not (tmp_path / "run").exists()
