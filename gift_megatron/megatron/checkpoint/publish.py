"""The safe-publish protocol of a checkpoint root: step directory names, atomic publication, ``latest``.

A checkpoint is the directory ``root/step_{step:08d}/``, complete once it holds the manifest
(``gift_checkpoint.json``). It is written under a temporary sibling name (``root/.tmp_...``) and renamed to
its final name only when complete; then ``root/latest`` is replaced (a temp file, fsync, ``os.replace``).
A job killed at any point before that replace leaves ``latest`` naming the previous complete checkpoint;
leftover ``.tmp_*`` entries are never read and are deleted by the next successful publication. This relies
on POSIX ``rename`` being atomic (local disks, NFS, Lustre, GPFS; not object stores) and on one job at a
time publishing into ``root``.

Why a module of its own: these are plain file operations, the part of saving that decides what a crash
leaves behind. It needs no process group and no Megatron-Core (the caller, rank 0, has every rank's files
on disk before it publishes), so it is tested on plain files (tests/test_checkpoint_publish.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from typing import Any

__all__ = [
    "LATEST_NAME",
    "MANIFEST_NAME",
    "STEP_DIR",
    "TMP_PREFIX",
    "checkpoint_path",
    "clean_up",
    "file_sizes",
    "fsync_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "publish",
    "tmp_step_name",
    "write_json_atomic",
    "write_text_atomic",
]

# The package's logger, as before the split into modules: users (and tests) filter on this name.
logger = logging.getLogger("gift_megatron.megatron.checkpoint")

MANIFEST_NAME = "gift_checkpoint.json"
LATEST_NAME = "latest"
#: A complete checkpoint's directory name; the step is group 1.
STEP_DIR = re.compile(r"^step_(\d{8,})$")
#: Every temporary entry of a root starts with this; none is ever read, the next publication deletes them.
TMP_PREFIX = ".tmp_"


def checkpoint_path(root: str | os.PathLike[str], step: int) -> str:
    """The directory of the checkpoint of ``step`` under ``root``: ``root/step_{step:08d}``."""
    return os.path.join(os.fspath(root), f"step_{step:08d}")


def tmp_step_name(step: int, token: str | None = None) -> str:
    """The temporary name under which the checkpoint of ``step`` is written: ``.tmp_step_{step:08d}``, with
    ``_{token}`` appended when given (a fresh token per save, so a stale directory is never reused)."""
    name = f"{TMP_PREFIX}step_{step:08d}"
    return name if token is None else f"{name}_{token}"


def list_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint (a ``step_*`` directory with a manifest), oldest first."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, MANIFEST_NAME)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike[str]) -> str | None:
    """The checkpoint to resume from (``--resume auto``): the one ``root/latest`` names, or None if ``root``
    holds no complete checkpoint.

    If ``latest`` is missing or names something that is not a complete checkpoint (it was edited, or the
    job died between replacing an existing same-step checkpoint and updating ``latest``), the newest
    complete checkpoint is returned instead, with a warning. Checkpoints are not verified file by file
    here; :func:`~gift_megatron.megatron.checkpoint.load_checkpoint` does that.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        return None
    latest_file = os.path.join(root, LATEST_NAME)
    named = None
    if os.path.isfile(latest_file):
        with open(latest_file) as f:
            named = f.read().strip()
        # Only a plain entry name of root is accepted: `latest` must not send a resume elsewhere.
        if STEP_DIR.match(named) and os.path.isfile(os.path.join(root, named, MANIFEST_NAME)):
            return os.path.join(root, named)
    complete = list_checkpoints(root)
    if not complete:
        return None
    if named is not None:
        logger.warning(
            "%s names %r, which is not a complete checkpoint; using the newest complete one, %s",
            latest_file,
            named,
            complete[-1][1],
        )
    return complete[-1][1]


def publish(root: str, tmp: str, final: str) -> None:
    """Make the complete checkpoint in ``tmp`` the one named ``final`` and point ``latest`` at it (rank 0,
    once every rank's files are in ``tmp``); an existing ``final`` is replaced."""
    fsync_dir(tmp)
    replaced = None
    if os.path.exists(final):
        # rename() cannot replace a non-empty directory: move the old one aside first. A crash between the
        # two renames leaves `latest` naming a missing directory, and latest_checkpoint() falls back to
        # the newest complete one.
        replaced = os.path.join(root, f"{TMP_PREFIX}replaced_{os.path.basename(final)}_{uuid.uuid4().hex[:12]}")
        os.rename(final, replaced)
    os.rename(tmp, final)
    fsync_dir(root)
    write_text_atomic(os.path.join(root, LATEST_NAME), os.path.basename(final) + "\n")
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def clean_up(root: str, final: str, keep_last: int | None) -> None:
    """After publishing ``final``: delete stale temporary entries and checkpoints beyond ``keep_last``
    (None: keep all). Only checkpoints up to ``final``'s step count; newer ones are kept."""
    for name in os.listdir(root):
        if name.startswith(TMP_PREFIX):
            _remove(os.path.join(root, name))
    if keep_last is None:
        return
    match = STEP_DIR.match(os.path.basename(final))
    if match is None:
        raise ValueError(f"clean_up: {final} is not a step_* checkpoint directory")
    saved_step = int(match.group(1))
    # Only checkpoints up to this one compete for the K places: newer ones (left by a run that was
    # restarted from an older checkpoint) are not this run's history, and are not deleted.
    older = [path for step, path in list_checkpoints(root) if step <= saved_step and path != final]
    for path in older[: max(0, len(older) - (keep_last - 1))]:
        # Renamed first (atomic), so a crash mid-delete leaves a stale temp entry, not a damaged checkpoint.
        doomed = os.path.join(root, f"{TMP_PREFIX}delete_{os.path.basename(path)}_{uuid.uuid4().hex[:12]}")
        os.rename(path, doomed)
        _remove(doomed)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except OSError:
            pass


def file_sizes(directory: str) -> dict[str, int]:
    """Relative path -> size of every file under ``directory``."""
    sizes = {}
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            full = os.path.join(dirpath, name)
            sizes[os.path.relpath(full, directory)] = os.path.getsize(full)
    return dict(sorted(sizes.items()))


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new content, never a partial one."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f"{TMP_PREFIX}{os.path.basename(path)}_{uuid.uuid4().hex[:12]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    """Persist a directory's entries (renames, new files) where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
