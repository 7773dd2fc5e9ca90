"""One writer per workdir: an advisory lock held for a whole command.

Two runs writing one workdir interleave their checkpoints and append every
metrics line twice. ``launch.py`` holds ``<workdir>/.lock`` (``flock``) for
train, sample, eval, inspect and the study; a second command on the same
workdir stops at once with the holder's pid, host, command and start time.
The kernel releases a ``flock`` when its process dies, so a run killed with
SIGKILL leaves no stale lock: the next run takes over and says so (the
holder's record is still in the file). Only the primary process of a
multi-process run takes the lock; the others stop with it when it cannot.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Any, Dict, Iterator, Optional

from absl import logging

from medgen_jax import errors

LOCK_NAME = ".lock"


def _record(fd: int) -> Optional[Dict[str, Any]]:
  """The holder record in the lock file, ``None`` if empty or unreadable."""
  os.lseek(fd, 0, os.SEEK_SET)
  raw = os.read(fd, 65536)
  if not raw.strip():
    return None
  try:
    out = json.loads(raw)
  except ValueError:
    return None
  return out if isinstance(out, dict) else None


def _describe(rec: Optional[Dict[str, Any]]) -> str:
  if not rec:
    return "another process"
  return (f"pid {rec.get('pid')} on {rec.get('host')} ({rec.get('command')}, "
          f"started {rec.get('started')})")


def _every_process_agrees(ok: bool) -> bool:
  """Whether ``ok`` holds on every process of the run: a collective that
  all processes must reach (just ``ok`` in a one-process run)."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  flags = multihost_utils.process_allgather(np.int32(ok))
  return bool(np.asarray(flags).all())


def _lock(fd: int, path: str, workdir: str) -> bool:
  """Takes the lock on ``fd``: True, or False where the file system cannot
  lock; raises WorkdirBusyError while a live process holds it."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    raise errors.WorkdirBusyError(
        f"{os.path.abspath(workdir)} is in use by "
        f"{_describe(_record(fd))}; wait for it to finish or stop it, or "
        "choose another --workdir (two writers would interleave "
        "checkpoints and metrics)") from None
  except OSError as e:
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
      raise
    # Some network file systems have no flock: run, but say so.
    logging.warning("%s: this file system cannot lock (%s); make sure no "
                    "other run writes to this workdir", path, e.strerror)
    return False
  return True


@contextlib.contextmanager
def hold(workdir: str, command: str, primary: bool = True) -> Iterator[None]:
  """Holds the workdir's lock for the ``with`` block.

  In a multi-process run every process calls this at the same point: the
  primary takes the lock, and all of them stop if it could not (instead of
  the others going on alone and waiting for it in their first collective).

  Args:
    workdir: the run directory (created if missing).
    command: what the holder does, for the message of a second writer
      (e.g. ``"--mode=train"``).
    primary: whether this process takes the lock (process 0 of a
      multi-process run); the others run unlocked.

  Raises:
    errors.WorkdirBusyError: a live process holds the lock.
  """
  if not primary:
    if not _every_process_agrees(True):
      raise errors.WorkdirBusyError(
          f"{os.path.abspath(workdir)}: process 0 could not take the "
          "workdir's lock (its error says why); this process stops with it")
    yield
    return
  fd = None
  try:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    locked = _lock(fd, path, workdir)
  except BaseException:
    _every_process_agrees(False)
    if fd is not None:
      os.close(fd)
    raise
  _every_process_agrees(True)
  try:
    if not locked:
      yield
      return
    previous = _record(fd)
    if previous:
      logging.warning("%s: the previous holder, %s, ended without releasing "
                      "it (killed?); taking over", path, _describe(previous))
    rec = {"pid": os.getpid(), "host": socket.gethostname(),
           "command": command, "argv": sys.argv,
           "started": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(rec).encode())
    try:
      yield
    finally:
      # Emptied, not deleted: deleting races with a waiter that opened the
      # old file and would then lock a name nobody else sees.
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)
