"""The safe-publish protocol of checkpoint roots (gift_megatron/megatron/checkpoint/publish.py) on plain files.

No process group and no Megatron model: a "checkpoint" here is a directory with a few files and a manifest,
which is all the protocol looks at. What must be on disk after each operation is derived from the
protocol's rules (a checkpoint is complete once ``step_*/gift_checkpoint.json`` exists, ``latest`` names the
last published one, ``.tmp_*`` entries are never read and are removed by the next publication).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from gift_megatron.megatron.checkpoint import publish as pub


def _write_tmp_checkpoint(root, step: int, marker: str, token: str = "t0ken") -> str:
    """A finished temporary checkpoint directory of ``step``, as every rank and then rank 0 leave it."""
    tmp = os.path.join(root, pub.tmp_step_name(step, token))
    os.makedirs(os.path.join(tmp, "shards"))
    with open(os.path.join(tmp, "shards", "__0_0.distcp"), "wb") as f:
        f.write(b"\0" * 10)
    with open(os.path.join(tmp, pub.MANIFEST_NAME), "w") as f:
        json.dump({"format": 1, "step": step, "marker": marker}, f)
    return tmp


def _save(root, step: int, keep_last: int | None = None, marker: str = "") -> str:
    """What save_checkpoint's rank 0 does once the files are written: publish, then clean up."""
    os.makedirs(root, exist_ok=True)
    tmp = _write_tmp_checkpoint(root, step, marker or f"step {step}")
    final = pub.checkpoint_path(root, step)
    pub.publish(str(root), tmp, final)
    pub.clean_up(str(root), final, keep_last)
    return final


def _marker(path) -> str:
    with open(os.path.join(path, pub.MANIFEST_NAME)) as f:
        return json.load(f)["marker"]


def test_names():
    assert pub.checkpoint_path("/r", 12) == os.path.join("/r", "step_00000012")
    assert pub.STEP_DIR.match("step_00000012").group(1) == "00000012"
    assert pub.STEP_DIR.match("step_123456789")  # more than 8 digits: still a step directory
    assert not pub.STEP_DIR.match("step_12")
    assert not pub.STEP_DIR.match(".tmp_step_00000012_abc")
    assert pub.tmp_step_name(3).startswith(pub.TMP_PREFIX)
    assert pub.tmp_step_name(3, "abc") != pub.tmp_step_name(3, "abd")


def test_publish_renames_the_tmp_dir_and_points_latest_at_it(tmp_path):
    root = tmp_path / "run"
    final = _save(root, 5)
    assert final == str(root / "step_00000005")
    assert sorted(os.listdir(root)) == ["latest", "step_00000005"]  # the temporary name is gone
    assert (root / "latest").read_text().strip() == "step_00000005"
    assert sorted(os.listdir(final)) == [pub.MANIFEST_NAME, "shards"]
    assert (root / "step_00000005" / "shards" / "__0_0.distcp").stat().st_size == 10
    assert pub.latest_checkpoint(root) == final
    assert pub.list_checkpoints(root) == [(5, final)]


def test_publish_replaces_an_existing_checkpoint_of_the_same_step(tmp_path):
    root = tmp_path / "run"
    _save(root, 3, marker="old")
    final = _save(root, 3, marker="new")
    assert _marker(final) == "new"
    assert sorted(os.listdir(root)) == ["latest", "step_00000003"]  # the old one, moved aside, is deleted


def test_keep_last_deletes_the_oldest_up_to_this_step(tmp_path):
    root = tmp_path / "run"
    for step in (1, 2, 3, 4):
        _save(root, step, keep_last=2)
    assert sorted(os.listdir(root)) == ["latest", "step_00000003", "step_00000004"]
    assert pub.latest_checkpoint(root) == str(root / "step_00000004")


def test_keep_last_keeps_newer_checkpoints_of_an_earlier_run(tmp_path):
    """A run restarted from step 2 of a run that reached step 9: step 9 is not this run's history."""
    root = tmp_path / "run"
    for step in (1, 2, 9):
        _save(root, step)
    _save(root, 3, keep_last=1)
    assert sorted(os.listdir(root)) == ["latest", "step_00000003", "step_00000009"]
    assert pub.latest_checkpoint(root) == str(root / "step_00000003")  # latest, not the newest step


def test_keep_last_none_keeps_every_checkpoint(tmp_path):
    root = tmp_path / "run"
    for step in (1, 2, 3):
        _save(root, step)
    assert [step for step, _ in pub.list_checkpoints(root)] == [1, 2, 3]


def test_latest_ignores_a_torn_save_and_the_next_save_removes_it(tmp_path, caplog):
    root = tmp_path / "run"
    _save(root, 2)
    # A job killed while saving step 3: its temporary directory holds some shards and no manifest.
    torn = root / pub.tmp_step_name(3, "deadbeef")
    os.makedirs(torn)
    (torn / "__0_0.distcp").write_bytes(b"\0" * 3)
    # And a step directory without a manifest (e.g. copied by hand, incompletely): not a checkpoint.
    os.makedirs(root / "step_00000004")
    assert pub.latest_checkpoint(root) == str(root / "step_00000002")
    assert pub.list_checkpoints(root) == [(2, str(root / "step_00000002"))]

    # `latest` naming the torn directory (or anything outside root) is not followed.
    for named in (torn.name, "step_00000004", "../elsewhere"):
        (root / "latest").write_text(named + "\n")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert pub.latest_checkpoint(root) == str(root / "step_00000002")
        assert "not a complete checkpoint" in caplog.text

    _save(root, 3)
    assert not any(name.startswith(pub.TMP_PREFIX) for name in os.listdir(root))
    assert pub.latest_checkpoint(root) == str(root / "step_00000003")


def test_latest_without_checkpoints(tmp_path):
    assert pub.latest_checkpoint(tmp_path / "missing") is None
    assert pub.list_checkpoints(tmp_path / "missing") == []
    os.makedirs(tmp_path / pub.tmp_step_name(1, "x"))
    assert pub.latest_checkpoint(tmp_path) is None


def test_latest_falls_back_when_the_pointer_is_missing(tmp_path):
    root = tmp_path / "run"
    for step in (1, 7):
        _save(root, step)
    os.remove(root / "latest")
    assert pub.latest_checkpoint(root) == str(root / "step_00000007")


def test_atomic_write_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "latest")
    pub.write_text_atomic(path, "step_00000001\n")
    pub.write_text_atomic(path, "step_00000002\n")
    with open(path) as f:
        assert f.read() == "step_00000002\n"
    assert os.listdir(tmp_path) == ["latest"]

    pub.write_json_atomic(str(tmp_path / "m.json"), {"b": 1, "a": [1, 2]})
    with open(tmp_path / "m.json") as f:
        assert json.load(f) == {"a": [1, 2], "b": 1}


def test_atomic_write_interrupted_before_the_replace_keeps_the_old_content(tmp_path, monkeypatch):
    path = str(tmp_path / "latest")
    pub.write_text_atomic(path, "old\n")

    def crash(src, dst):
        raise OSError("killed before the replace")

    monkeypatch.setattr(pub.os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        pub.write_text_atomic(path, "new\n")
    monkeypatch.undo()
    with open(path) as f:
        assert f.read() == "old\n"
    # What the crash left is a temporary entry, which readers never open and clean_up deletes.
    leftovers = [name for name in os.listdir(tmp_path) if name != "latest"]
    assert len(leftovers) == 1 and leftovers[0].startswith(pub.TMP_PREFIX)


def test_file_sizes_lists_every_file_by_relative_path(tmp_path):
    (tmp_path / "a").write_bytes(b"12345")
    os.makedirs(tmp_path / "d" / "e")
    (tmp_path / "d" / "e" / "f").write_bytes(b"")
    assert pub.file_sizes(str(tmp_path)) == {"a": 5, os.path.join("d", "e", "f"): 0}


def test_publish_imports_no_megatron_and_needs_no_process_group(tmp_path):
    """Run in a fresh interpreter: publishing works with neither Megatron-Core imported nor torch.distributed
    initialized."""
    code = (
        "import sys, os\n"
        "from gift_megatron.megatron.checkpoint import publish as pub\n"
        "root = sys.argv[1]\n"
        "tmp = os.path.join(root, pub.tmp_step_name(1, 'x'))\n"
        "os.makedirs(tmp)\n"
        "open(os.path.join(tmp, pub.MANIFEST_NAME), 'w').write('{}')\n"
        "pub.publish(root, tmp, pub.checkpoint_path(root, 1))\n"
        "pub.clean_up(root, pub.checkpoint_path(root, 1), 1)\n"
        "assert pub.latest_checkpoint(root) == pub.checkpoint_path(root, 1)\n"
        "assert not [m for m in sys.modules if m == 'megatron' or m.startswith('megatron.')], 'megatron imported'\n"
        "import torch.distributed as dist\n"
        "assert not dist.is_initialized()\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]
        ),
    }
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
