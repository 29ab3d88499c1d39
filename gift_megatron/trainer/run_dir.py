"""One writer per run directory, and workers that do not outlive their launcher (the README, "One writer per run directory").

Two failures these guard against, both seen in practice:

* Two jobs on one ``run.output_dir`` (a resubmitted job while the first still runs, a sweep with a
  duplicated name) interleave checkpoints and ``metrics.jsonl`` lines. :class:`RunDirLock` makes the second
  job fail at once with an error naming the holder.
* torchrun starts its workers in sessions of their own, so ``kill -9`` of torchrun (a SLURM step killed
  hard, an OOM killer, a user) leaves the workers training, and a resumed job then runs beside them.
  :func:`watch_launcher` makes each worker exit within a fraction of a second of its launcher, with the
  distinctive exit code :data:`LAUNCHER_GONE_EXIT`.

The lock is ``fcntl.flock`` on ``RUN/run.lock``, held by global rank 0 for the whole run. The kernel drops
it when the holding process dies, however it dies, so a killed or requeued job can always resume: there is
no stale lock to clean up. The file also holds a record of the holder (host, pid, start time, SLURM job id),
which the error names, and whose modification time rank 0 refreshes every :data:`HEARTBEAT_S` seconds.

Limits (docs/cluster.md, "One writer per run directory"):

* Local filesystems, NFSv4 and NFSv3 with lockd, GPFS and Lustre mounted with ``-o flock`` lock across
  nodes. Lustre mounted with ``-o localflock`` and BeeGFS without global file locks lock within one node
  only; Lustre without either option refuses flock (ENOSYS). A refused lock is a warning, not an error
  (the run still starts, without the guarantee).
* A node-local lock is caught through the heartbeat: when the lock is granted but the record names a
  holder on another host that has not released it, the start watches the record for
  :data:`STALE_AFTER_S` seconds; if the holder's heartbeat moves, the holder is alive and the lock is not
  shared across nodes, and the start fails. A job requeued onto another node therefore waits up to that
  long after a hard kill of its previous run, unless it is the same SLURM job (a requeue keeps the job id,
  and SLURM never runs two instances of one job).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

LOCK_FILE = "run.lock"
#: Exit code of a worker whose launcher (torchrun) died: distinct from errors (1, 2) and signals (128+n).
LAUNCHER_GONE_EXIT = 86
#: Seconds between refreshes of the holder record's modification time (the heartbeat).
HEARTBEAT_S = 10.0
#: Seconds without a heartbeat after which a holder on another host is taken for dead.
STALE_AFTER_S = 3 * HEARTBEAT_S

# errno values of filesystems that do not implement flock (Lustre without -o flock: ENOSYS; some FUSE and
# SMB mounts: EOPNOTSUPP / EINVAL; NFS without a lock daemon: ENOLCK).
_UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL}


class RunDirLocked(RuntimeError):
    """Another job holds the run directory; the message names it (host, pid, start, SLURM job)."""


def holder_record() -> dict[str, Any]:
    """Who this process is, as written into the lock file."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "started_unix": time.time(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
        "released": False,
    }


def describe(record: dict[str, Any] | None) -> str:
    """``host HOST, pid PID, started ..., SLURM job J`` (or what of it the record has)."""
    if not record:
        return "an unknown process (no holder record)"
    text = f"host {record.get('host', '?')}, pid {record.get('pid', '?')}"
    if record.get("started"):
        text += f", started {record['started']}"
    if record.get("slurm_job_id"):
        text += f", SLURM job {record['slurm_job_id']}"
    return text


def _in_use(run_dir: str, record: dict[str, Any] | None, path: str) -> str:
    return (
        f"run.output_dir {run_dir} is in use by another job ({describe(record)}); wait for it to finish or "
        f"stop it, or choose another run.output_dir (lock file {path})"
    )


def _mtime(path: str) -> int:
    """Modification time through a fresh open: NFS clients revalidate attributes on open (close-to-open
    consistency), where a plain stat may answer from an attribute cache up to a minute old."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.fstat(fd).st_mtime_ns
    finally:
        os.close(fd)


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunDirLock:
    """Exclusive lock on ``run_dir`` for one job (its global rank 0).

        lock = RunDirLock(run_dir).acquire()   # RunDirLocked if another job holds it
        ...
        lock.release()                         # also implied by process exit, however it exits

    Args:
        run_dir: the run's output directory (created if missing).
        stale_after_s: how long to watch a foreign host's record for a heartbeat (see the module doc).
        warn: where warnings go (default: stderr).
    """

    def __init__(
        self,
        run_dir: str,
        *,
        stale_after_s: float = STALE_AFTER_S,
        heartbeat_s: float = HEARTBEAT_S,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self._warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.previous: dict[str, Any] | None = None  # the record found on acquire (a dead or released holder)
        self.enforced = False  # False where the filesystem refused flock

    # --------------------------------------------------------------------------------------------- acquire
    @staticmethod
    def check_free(run_dir: str) -> None:
        """RunDirLocked when a live job holds ``run_dir`` (flock only, no heartbeat wait; nothing created).
        For a launcher, so that a second job stops before it starts any worker."""
        path = os.path.join(run_dir, LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return  # no lock file: no run has held this directory
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirLocked(_in_use(run_dir, RunDirLock._read(fd), path)) from None
        except OSError:
            pass  # unsupported here: the run's own acquire warns about it
        finally:
            os.close(fd)

    def acquire(self) -> RunDirLock:
        os.makedirs(self.run_dir, exist_ok=True)
        # O_RDWR without O_TRUNC: a second job must be able to read the holder's record before failing.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.enforced = True
        except BlockingIOError:
            record = self._read(fd)
            os.close(fd)
            raise RunDirLocked(_in_use(self.run_dir, record, self.path)) from None
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                os.close(fd)
                raise
            self._warn(
                f"warning: the filesystem of {self.run_dir} does not support file locks ({exc.strerror}): "
                "only the lock file's heartbeat stops a second job from writing into this run directory "
                "(docs/cluster.md, 'One writer per run directory')"
            )
        try:
            self.previous = self._read(fd)
            # Also without flock: then the heartbeat is the only guard left.
            self._check_foreign_holder(self.previous)
            self._write(fd, holder_record())
        except BaseException:
            os.close(fd)  # also drops the flock
            raise
        self._fd = fd
        self._beat = threading.Thread(target=self._heartbeat, name="run-dir-heartbeat", daemon=True)
        self._beat.start()
        return self

    def _check_foreign_holder(self, record: dict[str, Any] | None) -> None:
        """The lock was granted: the previous holder is gone, unless flock is local to each node. Decide
        which from what can be known (see the module doc)."""
        if not record or record.get("released"):
            return
        me = holder_record()
        if record.get("host") == me["host"]:
            if (
                isinstance(record.get("pid"), int)
                and record["pid"] != me["pid"]
                and _pid_running(record["pid"])
                and self._beating()
            ):
                raise RunDirLocked(
                    f"run.output_dir {self.run_dir} is in use by another job ({describe(record)}), "
                    "which is running and refreshing its lock file although the file lock was "
                    "granted: this filesystem's locks do not work; stop that job first"
                )
            return  # same host, flock is reliable there: the holder is dead
        if me["slurm_job_id"] and record.get("slurm_job_id") == me["slurm_job_id"]:
            return  # a requeue of the same SLURM job: its previous instance has ended
        if self._beating():
            raise RunDirLocked(
                f"run.output_dir {self.run_dir} is in use by another job ({describe(record)}): its "
                f"lock file is still being refreshed, although the file lock was granted here, so "
                f"this filesystem's locks are local to each node (Lustre localflock, BeeGFS "
                f"without global locks); stop that job first"
            )

    def _beating(self) -> bool:
        """Whether the lock file's modification time moves within ``stale_after_s`` (mtime differences only:
        clocks of different hosts need not agree)."""
        first = _mtime(self.path)
        deadline = time.monotonic() + self.stale_after_s
        while time.monotonic() < deadline:
            time.sleep(min(0.5, self.stale_after_s / 4))
            if _mtime(self.path) != first:
                return True
        return False

    # ------------------------------------------------------------------------------------- record I/O
    @staticmethod
    def _read(fd: int) -> dict[str, Any] | None:
        try:
            raw = os.pread(fd, 1 << 16, 0)
            record = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    @staticmethod
    def _write(fd: int, record: dict[str, Any]) -> None:
        data = (json.dumps(record) + "\n").encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a vanished directory is the run's problem to report, not the heartbeat's

    # --------------------------------------------------------------------------------------------- release
    @property
    def held(self) -> bool:
        return self._fd is not None

    def __del__(self) -> None:  # a Trainer that failed half-way through its construction
        try:
            self.release()
        except Exception:
            pass  # interpreter shutdown: the kernel drops the lock with the process anyway

    def release(self) -> None:
        """Mark the record released (a later start need not wait for a heartbeat) and drop the lock. The
        file itself stays: deleting it would let a third job lock a new file while a second holds the old."""
        if self._fd is None:
            return
        self._stop.set()
        try:
            record = self._read(self._fd) or holder_record()
            record["released"] = True
            self._write(self._fd, record)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


# ------------------------------------------------------------------------------------------- launcher watch
_watching = False


def under_torchrun() -> bool:
    """torchrun (torch.distributed.run / elastic agent) puts TORCHELASTIC_RUN_ID into its workers' env."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def watch_launcher(*, code: int = LAUNCHER_GONE_EXIT, only_under_torchrun: bool = True) -> bool:
    """Exit this process with ``code`` as soon as its parent (the launcher) exits. Returns whether a watch
    was started (once per process; only under torchrun unless ``only_under_torchrun=False``).

    Why a thread and not ``prctl(PR_SET_PDEATHSIG)``: the death signal fires when the *thread* that forked
    us exits, not the process, and it can only kill (SIGKILL) or run a Python handler, which waits for the
    main thread to come back from a blocking collective. A thread blocked in ``poll`` on a pidfd of the
    parent wakes the moment the parent exits and ends the process with ``os._exit`` whatever the main
    thread is doing; where pidfds are missing (Linux < 5.3, macOS) it polls ``os.getppid()``.
    """
    global _watching
    if _watching or (only_under_torchrun and not under_torchrun()):
        return False
    parent = os.getppid()
    if parent == 1:  # already orphaned before we got here: the launcher is gone
        _launcher_gone(parent, code)
    thread = threading.Thread(target=_watch, args=(parent, code), name="launcher-watch", daemon=True)
    thread.start()
    _watching = True
    return True


def _watch(parent: int, code: int) -> None:
    import select

    try:
        fd = os.pidfd_open(parent)
    except (AttributeError, OSError):
        fd = None
    if fd is not None and os.getppid() == parent:  # the pidfd is of our parent, not a recycled pid
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not poller.poll(None):
            pass
    else:
        while os.getppid() == parent:
            time.sleep(0.2)
    _launcher_gone(parent, code)


def _launcher_gone(parent: int, code: int) -> None:
    try:
        rank = os.environ.get("RANK", "?")
        os.write(
            2,
            f"launcher (pid {parent}) exited: worker rank {rank} (pid {os.getpid()}) stops "
            f"with exit code {code}\n".encode(),
        )
    except OSError:
        pass  # the launcher's pipe may be gone with it
    os._exit(code)


def lock_run_dir(run_dir: str, rank: int) -> RunDirLock | None:
    """Collective over the default process group: global rank 0 takes the run directory's lock, and every
    rank raises :class:`RunDirLocked` when it could not (so no rank goes on to write). Returns the lock on
    rank 0, None elsewhere."""
    import torch.distributed as dist

    lock, error = None, None
    if rank == 0:
        try:
            lock = RunDirLock(run_dir).acquire()
        except RunDirLocked as exc:
            error = str(exc)
        else:
            prev = lock.previous
            if prev and not prev.get("released") and prev.get("pid") != os.getpid():
                print(
                    f"run.output_dir {run_dir}: the previous job ({describe(prev)}) ended without releasing "
                    "it (killed or preempted); this job takes over",
                    flush=True,
                )
    if dist.is_initialized():
        from gift_megatron.comm import broadcast_objects

        error = broadcast_objects([error], src=0)[0]  # every rank stops if rank 0 could not take the lock
    if error:
        raise RunDirLocked(error)
    return lock
