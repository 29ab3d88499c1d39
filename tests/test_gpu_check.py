"""scripts/gpu_check.py: the prepared one-GPU check. Its GPU run cannot happen in CI, so the CPU dry run
(the same stages at tiny shapes) runs end to end here, and the stage runner's promises are pinned directly:
a failing stage is reported and the check goes on, a stage's timeout kills it and its children, the total
budget caps the stages, and host syncs are counted per phase from torch's sync-debug warnings."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


gc = _load()


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.timeout(960)
def test_cpu_dry_run_runs_every_stage_and_writes_the_table(tmp_path):
    """About a minute on an idle 2-core machine (imports dominate); generous limits for a loaded one."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    run = subprocess.run(
        [sys.executable, SCRIPT, "--cpu-dry", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=930,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["setup", "gpu-tests", "trainer", "logprobs", "step", "packing"]
    assert all(s["status"] == "ok" for s in stages.values()), stages
    rows = {name: {what: value for what, value in s["rows"]} for name, s in stages.items()}
    skipped = [value for what, value in stages["gpu-tests"]["rows"] if what == "skipped"]
    assert skipped and all("CUDA GPU" in value for value in skipped), skipped  # CUDA is hidden in a dry run
    assert "step 5" in rows["trainer"] and "tokens/s" in rows["trainer"] and "eval reward" in rows["trainer"]
    assert {"ours", "megatron", "naive", "bandwidth bound"} <= set(rows["logprobs"])
    assert "of the bound" in rows["logprobs"]["ours"]
    assert {"plain", "sft", "gft", "gift", "goal"} <= set(rows["step"])
    assert {"plan a", "plan c", "step a", "step b", "step c"} <= set(rows["packing"])
    assert "computed/real 1.000" in rows["packing"]["step c"]
    table = (out / "gpu_check.md").read_text()
    assert table in run.stdout  # the same table on stdout and in the file
    for name in stages:
        assert f"| {name} | ok (" in table
    assert (out / "gpu_check_logs.txt").stat().st_size > 0


def test_recipe_is_a_half_billion_llama_on_one_rank():
    from gift_megatron.config import check_world_size, load_config

    cfg = load_config(os.path.join(ROOT, gc.TRAINER_CONFIG))
    assert 0.45e9 < cfg.model.parameter_count() < 0.55e9
    assert cfg.precision.dtype == "bf16" and cfg.train.steps == 5 and cfg.data.eval_files
    assert cfg.rollout.engine == "hf"
    assert check_world_size(cfg, 1) == 1
    assert max(gc.TIMEOUTS["gpu"].values()) < gc.BUDGET_S and sum(gc.TIMEOUTS["gpu"].values()) <= gc.BUDGET_S


# ------------------------------------------------------------------------------------- the stage runner
def _py(code: str, *extra: str) -> list[str]:
    return [sys.executable, "-c", code, *extra]


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_failing_stage_is_reported_and_the_next_stages_run(tmp_path):
    grandchild_pid = tmp_path / "grandchild.pid"
    hang = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(grandchild_pid)!r}, 'w').write(str(child.pid))\n"
        "print('hanging on purpose', flush=True)\n"
        "time.sleep(120)\n"
    )
    good = (
        "import json, sys\n"
        "json.dump({'rows': [['answer', '42'], ['deadline', sys.argv[2]]], 'error': None}, open(sys.argv[1], 'w'))\n"
    )
    stages = [
        gc.Stage("boom", _py("import sys; print('working'); sys.exit('broken on purpose')"), 60),
        gc.Stage("hang", _py(hang), 3),
        gc.Stage("fine", _py(good, "{result}", "{deadline}"), 60),
    ]
    start = time.monotonic()
    results = gc.run_stages(stages, budget=200, env=dict(os.environ), workdir=str(tmp_path))
    elapsed = time.monotonic() - start
    by_name = {r["name"]: r for r in results}
    assert [r["name"] for r in results] == ["boom", "hang", "fine"]
    assert by_name["boom"]["status"] == "FAILED" and "broken on purpose" in by_name["boom"]["error"]
    assert by_name["hang"]["status"] == "TIMEOUT" and "3 s timeout" in by_name["hang"]["error"]
    assert "hanging on purpose" in by_name["hang"]["error"]  # the last log line says where it hung
    assert by_name["hang"]["seconds"] < 20 and elapsed < 60
    assert by_name["fine"]["status"] == "ok" and by_name["fine"]["rows"][0] == ["answer", "42"]
    deadline = float(by_name["fine"]["rows"][1][1])  # the stage is told when it will be killed
    assert start + 50 < deadline - (time.time() - time.monotonic()) < start + elapsed + 61
    # The timeout killed the stage's whole process group, not only the stage process.
    pid = int(grandchild_pid.read_text())
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid), f"the hung stage's child {pid} outlived the timeout"
    table = gc.render_table(results, "t")
    assert "| boom | FAILED (" in table and "| hang | TIMEOUT (" in table and "| fine | ok (" in table
    assert "broken on purpose" in table


def test_the_budget_caps_and_then_skips_stages(tmp_path):
    stages = [gc.Stage("slow", _py("import time; time.sleep(120)"), 100), gc.Stage("late", _py("print('never')"), 100)]
    start = time.monotonic()
    results = gc.run_stages(stages, budget=6, env=dict(os.environ), workdir=str(tmp_path))
    assert time.monotonic() - start < 30
    assert results[0]["status"] == "TIMEOUT" and results[0]["timeout"] <= 6
    assert results[1]["status"] == "SKIPPED" and "budget is spent" in results[1]["error"]


def test_a_stage_that_raises_keeps_its_rows_and_reports_the_error(tmp_path, monkeypatch):
    def broken(res, ctx):
        res.add("measured", "before the failure")
        raise RuntimeError("apply_rope_fusion needs Transformer Engine")

    monkeypatch.setitem(gc.STAGES, "setup", broken)
    path = str(tmp_path / "r.json")
    rc = gc.stage_main("setup", path, gc.Context(dry=True, workdir=str(tmp_path), site=str(tmp_path)))
    data = json.loads(open(path).read())
    assert rc == 1
    assert data["rows"] == [["measured", "before the failure"]]
    assert data["error"] == "RuntimeError: apply_rope_fusion needs Transformer Engine"


def test_table_cells_cannot_break_the_markdown_table():
    table = gc.render_table(
        [{"name": "s", "status": "FAILED", "seconds": 1.0, "rows": [["a|b", "x\ny"]], "error": "e|f"}], "t"
    )
    body = [l for l in table.splitlines() if l.startswith("| s |") or l.startswith("|  |")]
    assert all(l.count("|") - l.count("\\|") == 5 for l in body), body


def test_junit_outcomes_are_read(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="assert 1 == 2">tb</failure></testcase>'
        '<testcase classname="tests.test_b" name="test_te"><skipped message="could not import te"/></testcase>'
        "</testsuite></testsuites>"
    )
    r = gc.parse_junit(str(xml))
    assert r["passed"] == [("tests/test_a.py::test_ok", "")]
    assert r["failed"] == [("tests/test_a.py::test_bad", "assert 1 == 2")]
    assert r["skipped"] == [("tests/test_b.py::test_te", "could not import te")]


def test_a_pytest_run_cut_at_the_deadline_still_reports_the_finished_tests():
    text = (
        "tests/test_a.py::test_one PASSED                                       [ 20%]\n"
        "tests/test_a.py::test_two[gift] SKIPPED (needs 2 CUDA GPUs)            [ 40%]\n"
        "tests/test_a.py::test_three FAILED                                     [ 60%]\n"
        "tests/test_b.py::test_slow \n"
    )
    r, running = gc.parse_verbose(text)
    assert r == {
        "passed": [("tests/test_a.py::test_one", "")],
        "skipped": [("tests/test_a.py::test_two[gift]", "needs 2 CUDA GPUs")],
        "failed": [("tests/test_a.py::test_three", "")],
    }
    assert running == "tests/test_b.py::test_slow"


# ------------------------------------------------------------------------------------------ sync counting
def test_sync_warnings_are_counted_per_phase_and_site_and_others_pass_through():
    counter = gc.SyncCounter()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # as outside pytest: a warning shows once per source line
        counter.install()
        try:
            with counter.phase("update"):
                for _ in range(3):  # one source line, three syncs: all must count
                    warnings.warn(gc.SYNC_WARNING)
                with counter.phase("metrics"):
                    # As torch reports a sync met inside its own Python code: the site is whoever called it.
                    import torch

                    warnings.warn_explicit(gc.SYNC_WARNING, UserWarning, torch.__file__, 1)
            warnings.warn("an unrelated warning")
        finally:
            counter.uninstall()
    assert counter.counts == {"update": 3, "metrics": 1}
    assert sum(counter.sites.values()) == 4 and all("test_gpu_check.py:" in s for s in counter.sites)
    assert counter.owners == {"other": 4}
    assert [str(w.message) for w in seen] == ["an unrelated warning"]


def test_the_trainer_step_proxy_counts_prepare_and_update_and_forwards_the_rest():
    class FakeStep:
        device = "cuda:0"

        def prepare(self, mbs):
            warnings.warn(gc.SYNC_WARNING)
            return mbs

        def __call__(self, mbs, prepared=False):
            warnings.warn(gc.SYNC_WARNING)
            warnings.warn(gc.SYNC_WARNING)
            return prepared

    class FakeTrainer:
        def __init__(self):
            self.train_step = FakeStep()

        def sync_weights(self):
            warnings.warn(gc.SYNC_WARNING)

    counter, timings, missing = gc.SyncCounter(), {}, []
    trainer = FakeTrainer()
    gc._instrument(trainer, counter, timings, missing)
    counter.install()
    try:
        assert trainer.train_step.prepare([1]) == [1]
        assert trainer.train_step([1], prepared=True) is True
        trainer.sync_weights()
    finally:
        counter.uninstall()
    assert trainer.train_step.device == "cuda:0"
    assert counter.counts == {"prepare": 1, "update": 2, "weight sync": 1}
    assert set(missing) == {"rollout", "rollout_metrics", "evaluate", "save"}
    assert len(timings["weight sync"]) == 1


def test_prepare_finds_every_requirement_on_the_machine_or_among_the_carried_wheels():
    provided = set(map(gc._norm, gc.CARRIED)) | gc.GPU_PACKAGES
    missing = [r for r in gc._install_requires() if gc._requirement_name(r) not in provided]
    assert not missing
    pins = gc._pins()
    assert pins["megatron-core"] == "0.19.2"
