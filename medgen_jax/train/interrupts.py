"""Ctrl-C and SIGTERM that never land inside a train step.

A train step donates the old state's buffers to the new one. Python runs a
signal handler between bytecodes, so a ``KeyboardInterrupt`` raised while a
step is being dispatched can leave the trainer holding a state whose buffers
are already deleted, with the new state never assigned: nothing could be
checkpointed. :class:`Interrupts` holds such a signal back until the
step (and its bookkeeping) is done, then raises ``KeyboardInterrupt``; outside
those sections a signal raises at once, as usual, so a long sampling or
evaluation pass stays interruptible.
"""

import contextlib
import signal
import threading
from typing import Iterator, Optional

from absl import logging

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
  """Installs handlers for SIGINT and SIGTERM while used as a context.

  Use ``with interrupts:`` around the loop and ``with interrupts.deferred():``
  around each step. Off the main thread (where Python cannot install signal
  handlers, e.g. a training thread in a notebook) it changes nothing.
  """

  def __init__(self):
    self._previous = {}
    self._depth = 0
    self.pending: Optional[int] = None  # the held-back signal number

  def _handle(self, signum, frame):
    del frame
    if self._depth:
      if self.pending is None:
        logging.warning("Received signal %d; stopping after this step.",
                        signum)
      self.pending = signum
      return
    raise KeyboardInterrupt(f"received signal {signum}")

  def __enter__(self) -> "Interrupts":
    if threading.current_thread() is threading.main_thread():
      for s in _SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  @contextlib.contextmanager
  def deferred(self) -> Iterator[None]:
    """Holds signals back inside the block; raises on leaving it if any came.

    The ``KeyboardInterrupt`` is raised only when the block itself finished
    without an exception, so the caller's state is consistent at that point.
    """
    self._depth += 1
    try:
      yield
    finally:
      self._depth -= 1
    if self.pending is not None and not self._depth:
      signum, self.pending = self.pending, None
      raise KeyboardInterrupt(f"received signal {signum}")
