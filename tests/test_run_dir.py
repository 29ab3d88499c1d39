"""One writer per run directory; workers exit when their launcher dies (gift_megatron/trainer/run_dir.py).

The lock tests run in this process against real processes holding (and dying with) the lock. The end-to-end
test runs a real 2-rank job, starts a second job on its directory, kills torchrun with SIGKILL and measures
how long its workers outlive it, then resumes.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from gift_megatron.trainer.run_dir import LAUNCHER_GONE_EXIT, LOCK_FILE, RunDirLock, RunDirLocked
from tests.test_train_e2e import CONFIG, ROOT, data_overrides, torchrun, toy_task  # noqa: F401 (fixture)

PY = sys.executable


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")  # the workers import this checkout
    return env


def _holder(run_dir: str) -> subprocess.Popen:
    """Another process that takes the lock and keeps it until it is killed."""
    code = (
        "import sys, time; from gift_megatron.trainer.run_dir import RunDirLock; "
        f"RunDirLock({run_dir!r}).acquire(); print('locked', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([PY, "-c", code], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.timeout(60)
def test_second_holder_fails_naming_the_first_and_a_dead_holders_lock_is_taken_over(tmp_path):
    run = str(tmp_path / "run")
    holder = _holder(run)
    try:
        t0 = time.monotonic()
        with pytest.raises(RunDirLocked) as info:
            RunDirLock(run).acquire()
        # At once, by the file lock (the heartbeat check, which would also catch it, watches for 30 s).
        assert time.monotonic() - t0 < 3.0
        message = str(info.value)
        assert f"host {socket.gethostname()}, pid {holder.pid}" in message, message
        assert run in message and "in use by another job" in message
    finally:
        holder.kill()  # SIGKILL: no chance to release; the kernel drops the flock with the process
        holder.wait()
    t0 = time.monotonic()
    lock = RunDirLock(run).acquire()
    try:
        assert time.monotonic() - t0 < 2.0  # same host, holder dead: no heartbeat wait
        assert lock.enforced and lock.previous["pid"] == holder.pid and not lock.previous["released"]
        with open(os.path.join(run, LOCK_FILE)) as fh:
            assert json.load(fh)["pid"] == os.getpid()
    finally:
        lock.release()
    with open(os.path.join(run, LOCK_FILE)) as fh:
        assert json.load(fh)["released"] is True
    RunDirLock(run).acquire().release()  # a released lock is free at once


def _lock_on_every_rank(rank, world, run):
    from gift_megatron.trainer.run_dir import lock_run_dir

    try:
        lock_run_dir(run, rank)
    except RunDirLocked as exc:
        return str(exc)
    return None


@pytest.mark.timeout(120)
def test_every_rank_stops_when_rank_0_cannot_take_the_lock(tmp_path):
    """Rank 0 takes the lock and tells the others: no rank goes on to write (ranks != 0 never touch the
    lock file themselves, so without the broadcast they would carry on)."""
    from tests.multiproc import run_ranks

    run = str(tmp_path / "run")
    holder = _holder(run)
    try:
        errors = run_ranks(_lock_on_every_rank, 2, run, timeout=90)
    finally:
        holder.kill()
        holder.wait()
    assert errors[0] and errors[0] == errors[1] and f"pid {holder.pid}" in errors[0], errors


def _foreign_record(run: str, **extra) -> None:
    os.makedirs(run, exist_ok=True)
    record = {"host": "node-elsewhere", "pid": 4242, "started": "earlier", "slurm_job_id": "777", "released": False}
    with open(os.path.join(run, LOCK_FILE), "w") as fh:
        json.dump({**record, **extra}, fh)


@pytest.mark.timeout(60)
def test_lock_granted_while_another_hosts_holder_still_beats_is_refused(tmp_path, monkeypatch):
    """A node-local flock (Lustre localflock, BeeGFS) grants the lock to a second node: the holder's
    heartbeat on the record betrays it. Without a heartbeat the record is stale and is taken over; a requeue
    of the same SLURM job takes over at once."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = str(tmp_path / "run")
    _foreign_record(run)
    stop = threading.Event()

    def beat():
        while not stop.wait(0.1):
            os.utime(os.path.join(run, LOCK_FILE))

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    try:
        with pytest.raises(RunDirLocked, match="host node-elsewhere, pid 4242.*local to each node"):
            RunDirLock(run, stale_after_s=1.0).acquire()
    finally:
        stop.set()
        beater.join()
    t0 = time.monotonic()
    lock = RunDirLock(run, stale_after_s=1.0).acquire()  # no heartbeat: the holder is dead
    assert 0.9 < time.monotonic() - t0 < 5.0
    lock.release()

    _foreign_record(run)
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    t0 = time.monotonic()
    RunDirLock(run, stale_after_s=30.0).acquire().release()
    assert time.monotonic() - t0 < 2.0


def test_a_filesystem_without_flock_warns_and_runs(tmp_path, monkeypatch):
    """Lustre without -o flock answers ENOSYS: the run starts, with a warning that nothing is enforced."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    said = []
    lock = RunDirLock(str(tmp_path / "run"), warn=said.append).acquire()
    assert not lock.enforced and lock.held
    assert len(said) == 1 and "does not support file locks" in said[0]
    lock.release()


# ------------------------------------------------------------------------------------------- end to end
# Runs torchrun as a child of a subreaper, so that the workers torchrun leaves behind become its children
# and their exit codes and exit times can be collected after torchrun is SIGKILLed.
HARNESS = textwrap.dedent("""
    import ctypes, json, os, signal, subprocess, sys, time
    PR_SET_CHILD_SUBREAPER = 36
    assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    cmd, metrics, go, out, log = json.loads(sys.argv[1])
    with open(log, "w") as fh:
        launcher = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

    def steps():
        try:
            with open(metrics) as fh:
                return [json.loads(line)["step"] for line in fh if line.strip()]
        except (OSError, ValueError):
            return []

    def workers():
        found = []
        for p in os.listdir("/proc"):
            try:
                with open(f"/proc/{p}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == launcher.pid:
                        found.append(int(p))
            except (OSError, ValueError, IndexError):
                pass
        return found

    deadline = time.time() + 240
    while time.time() < deadline and launcher.poll() is None and max(steps(), default=0) < 2:
        time.sleep(0.1)
    pids = workers()
    with open(out + ".running", "w") as fh:
        json.dump({"workers": pids, "launcher_rc": launcher.poll()}, fh)
    while not os.path.exists(go) and time.time() < deadline:
        time.sleep(0.1)
    os.kill(launcher.pid, signal.SIGKILL)
    t0 = time.monotonic()
    exits, pending = {}, set(pids)
    while pending:
        if time.monotonic() - t0 > 20:  # the workers outlived their launcher: stop them here
            for p in pending:
                os.kill(p, signal.SIGKILL)
                os.waitpid(p, 0)
                exits[p] = ("survived", 20.0)
            break
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.01)
        elif pid in pending:
            exits[pid] = (os.waitstatus_to_exitcode(status), time.monotonic() - t0)
            pending.discard(pid)
    with open(out, "w") as fh:
        json.dump({"workers": pids, "exits": {str(k): v for k, v in exits.items()}}, fh)
""")


def _steps(run_dir: str) -> list[int]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line)["step"] for line in fh]


@pytest.mark.timeout(420)
def test_second_job_fails_at_once_and_sigkill_of_torchrun_stops_its_workers_then_resume(toy_task, tmp_path):
    run = str(tmp_path / "run")
    common = data_overrides(toy_task) + [
        f"run.output_dir={run}",
        "train.steps=400",
        "run.save_interval=2",
        "train.eval_interval=0",
        "train.eval_prompts=4",
        "run.plots=false",
        "run.resume=auto",
    ]
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    go, out, log = str(tmp_path / "go"), str(tmp_path / "exits.json"), str(tmp_path / "job_a.log")
    job_a = subprocess.Popen(
        [PY, str(harness), json.dumps([torchrun(common), os.path.join(run, "metrics.jsonl"), go, out, log])],
        cwd=ROOT,
        env=_env(),
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while not os.path.exists(out + ".running") and time.time() < deadline and job_a.poll() is None:
            time.sleep(0.2)
        with open(out + ".running") as fh:
            running = json.load(fh)
        with open(log) as fh:
            assert running["launcher_rc"] is None and len(running["workers"]) == 2, (running, fh.read()[-3000:])
        with open(os.path.join(run, LOCK_FILE)) as fh:
            holder = json.load(fh)
        assert holder["pid"] in running["workers"] and holder["host"] == socket.gethostname()

        # A second job on the same directory (the CLI's own launcher) stops at once, naming the holder.
        t0 = time.monotonic()
        second = subprocess.run(
            [PY, "-m", "gift_megatron.train", CONFIG, "--nproc-per-node", "2", *common],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        took = time.monotonic() - t0
        assert second.returncode == 2, (second.returncode, second.stdout[-2000:], second.stderr[-3000:])
        named = f"in use by another job (host {holder['host']}, pid {holder['pid']}"
        assert second.stderr.count(named) == 1, second.stderr  # once: rank 0 says it, rank 1 is quiet
        # One line, from the launcher before any worker starts (no torchrun table, no traceback).
        assert len(second.stderr.splitlines()) == 1 and second.stderr.startswith("error: "), second.stderr
        print(f"\nsecond job on a locked run dir: refused after {took:.1f} s (interpreter and imports included)")

        # The resume below needs a complete checkpoint: on a loaded machine step 2's save may still be under
        # way when the metrics line of step 2 appears.
        latest = os.path.join(run, "checkpoints", "latest")
        deadline = time.time() + 120
        while not os.path.exists(latest) and time.time() < deadline and job_a.poll() is None:
            time.sleep(0.2)
        # SIGKILL of torchrun: its workers (in sessions of their own) must stop, with LAUNCHER_GONE_EXIT.
        open(go, "w").close()
        job_a.wait(timeout=60)
        with open(out) as fh:
            result = json.load(fh)
    finally:
        if job_a.poll() is None:
            os.killpg(job_a.pid, signal.SIGKILL)
    exits = result["exits"]
    assert sorted(map(int, exits)) == sorted(result["workers"]), result
    latencies = [t for _, t in exits.values()]
    print(
        f"workers exited {', '.join(f'{t:.3f} s' for t in latencies)} after torchrun's SIGKILL "
        f"(codes {[c for c, _ in exits.values()]})"
    )
    assert all(code == LAUNCHER_GONE_EXIT for code, _ in exits.values()), exits
    assert max(latencies) < 5.0, exits

    # The dead job's lock is taken over and the run resumes from its last checkpoint: no duplicate steps.
    before = _steps(run)
    with open(os.path.join(run, "checkpoints", "latest")) as fh:
        ckpt = int(fh.read().strip().rsplit("_", 1)[-1])
    assert max(before) >= ckpt >= 2
    # Two steps past the checkpoint (train.steps may change on resume; the LR is constant here). The resumed
    # job also scores every response 0, so that its groups are all degenerate: the run warns after 2 steps.
    zero = tmp_path / "zero_reward.py"
    zero.write_text("def zero(samples):\n    return [0.0] * len(samples)\n")
    resumed = subprocess.run(
        torchrun(common + [f"train.steps={ckpt + 2}", f"reward.name={zero}:zero", "run.warn_degenerate_steps=2"]),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
        start_new_session=True,
    )
    assert resumed.returncode == 0, (resumed.stdout[-3000:], resumed.stderr[-3000:])
    assert "ended without releasing it" in resumed.stdout and f"pid {holder['pid']}" in resumed.stdout
    assert "resumed from" in resumed.stdout, resumed.stdout
    steps = _steps(run)
    assert steps == list(range(0, ckpt + 3)), (before, ckpt, steps)
    # The summary reports the eval reward from the run's real start (step 0, written by the killed job).
    with open(os.path.join(run, "metrics.jsonl")) as fh:
        step0 = json.loads(fh.readline())
    assert f"eval reward:     {step0['eval/reward']:.3f} at step 0 ->" in resumed.stdout, resumed.stdout
    assert f"(2 steps this job, resumed at step {ckpt})" in resumed.stdout, resumed.stdout
    warned = [line for line in resumed.stdout.splitlines() if line.startswith("warning: nothing is learning")]
    assert len(warned) == 1 and f"last 2 steps ({ckpt + 1}-{ckpt + 2})" in warned[0], resumed.stdout
