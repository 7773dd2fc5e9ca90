"""Signals during a train step wait for the step (see train/interrupts.py)."""

import os
import signal

import pytest

from medgen_jax.train import interrupts as interrupts_lib


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_inside_deferred_block_waits_for_its_end(signum):
  finished = []
  with interrupts_lib.Interrupts() as interrupts:
    with pytest.raises(KeyboardInterrupt, match=f"signal {int(signum)}"):
      with interrupts.deferred():
        os.kill(os.getpid(), signum)
        finished.append("after the signal")  # still runs: held back
    assert finished == ["after the signal"]
    assert interrupts.pending is None
    with interrupts.deferred():  # the signal was consumed, not re-raised
      finished.append("next block")
  assert finished == ["after the signal", "next block"]


def test_signal_outside_deferred_block_raises_at_once():
  with interrupts_lib.Interrupts():
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGTERM)
      for _ in range(1000):  # the handler runs within a few bytecodes
        pass
      raise AssertionError("the signal did not interrupt")


def test_block_that_raises_keeps_its_own_error():
  with interrupts_lib.Interrupts() as interrupts:
    with pytest.raises(FloatingPointError):
      with interrupts.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        raise FloatingPointError("nan loss")


def test_previous_handlers_are_restored():
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  with interrupts_lib.Interrupts():
    assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
  assert {s: signal.getsignal(s) for s in before} == before
