"""What an expected failure says: the one place that decides whether an
exception is the user's to fix (a message) or a bug (a traceback).

Every error class whose message already names the problem, the file and
the way out derives from :class:`UserError` (``ConfigError``,
``DataError``, ``CheckpointRestoreError``, ...). Operating-system errors
are expected too when they are about the machine rather than the code: no
space, a read-only or forbidden path, a missing file; :func:`user_message`
phrases them. ``launch.py`` prints :func:`user_message` as ``error: ...``
and exits 1; anything else keeps its traceback.
"""

import errno
import os
from typing import Iterator, Optional


class UserError(Exception):
  """A failure the user fixes (input, config, files, disk); its message
  names the problem, the file and what to do."""


class NonFiniteError(UserError, FloatingPointError):
  """A loss or parameter became NaN or Inf; the message names the step
  and the last good checkpoint."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or checkpoint the command needs does not exist; the message
  says what produces it."""


class WorkdirBusyError(UserError):
  """Another live process is writing to the same workdir."""


_OS_ADVICE = {
    errno.ENOSPC: ("no space left on {where}", "free space there or choose "
                   "another --workdir; the files written before are intact"),
    errno.EDQUOT: ("disk quota exceeded on {where}", "free space there or "
                   "choose another --workdir; the files written before are "
                   "intact"),
    errno.EROFS: ("{where} is on a read-only file system", "choose a "
                  "writable --workdir"),
    errno.EACCES: ("permission denied: {where}", "choose a --workdir you can "
                   "write to, or fix the permissions"),
    errno.EPERM: ("operation not permitted: {where}", "choose a --workdir "
                  "you can write to, or fix the permissions"),
    errno.ENOENT: ("no such file or directory: {where}", "check the path"),
    errno.ENOTDIR: ("not a directory: {where}", "check the path"),
    errno.EISDIR: ("is a directory, not a file: {where}", "check the path"),
}


def _chain(e: BaseException) -> Iterator[BaseException]:
  """``e`` and its causes (``raise ... from`` and implicit contexts),
  each once: libraries (orbax, TensorStore, TFDS) wrap OS errors."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def os_error(e: BaseException) -> Optional[OSError]:
  """The first OS error of a known kind in ``e``'s chain, if any."""
  for x in _chain(e):
    if isinstance(x, OSError) and x.errno in _OS_ADVICE:
      return x
    # TensorStore and some wrappers keep only the text of the OS error.
    text = str(x)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
      if os.strerror(code) in text:
        return OSError(code, os.strerror(code), _quoted_path(text))
  return None


def _quoted_path(text: str) -> Optional[str]:
  """The first ``"/..."`` or ``'/...'`` path in an error text."""
  for quote in ('"', "'"):
    start = text.find(quote + "/")
    if start >= 0:
      end = text.find(quote, start + 1)
      if end > start:
        return text[start + 1:end]
  return None


def _display_path(path: str) -> str:
  """An orbax temp file as the checkpoint it belonged to."""
  path = str(path)
  head, sep, _ = path.partition(".orbax-checkpoint-tmp")
  return f"{head} (a checkpoint being written)" if sep else path


def user_message(e: BaseException, where: str = "the workdir"
                 ) -> Optional[str]:
  """The one-paragraph message of an expected failure, ``None`` for a bug.

  Args:
    e: the exception that ended the run.
    where: the path to name when an OS error does not (TensorStore's
      often do not): the workdir.

  Returns:
    ``UserError`` messages as they are; OS errors as ``"<problem>: <what
    to do>"`` naming the path; ``None`` for anything else.
  """
  for x in _chain(e):
    if isinstance(x, UserError):
      return " ".join(str(x).split()) if "\n  - " not in str(x) else str(x)
  ose = os_error(e)
  if ose is None:
    return None
  where = _display_path(ose.filename) if ose.filename else where
  if ose.filename2:
    where = f"{where} -> {ose.filename2}"
  problem, advice = _OS_ADVICE[ose.errno]
  return f"{problem.format(where=where)}; {advice}"
