"""Ablation sweeps: grids of config overrides defined beside the config.

A config file may define ``get_sweep(arg)`` next to ``get_config(arg)``
(same ``arg``). It returns a *sweep*: a list of runs, each a flat dict of
dotted config keys to values, the keys ``--config.<key>=<value>`` would
override on the command line. Build it with the helpers here::

  from medgen_jax import sweep

  def get_sweep(arg=""):
    return sweep.product([
        sweep.values("sample.guidance_scale", [0.0, 1.0, 3.0]),
        sweep.values("seed", [0, 1]),
    ])  # 6 runs: (0.0, 0), (0.0, 1), (1.0, 0), ...

``python -m medgen_jax.sweep`` expands it (:mod:`medgen_jax.sweep.plan`),
runs or emits one ``launch.py`` command per run, and collects the runs'
metrics (:mod:`medgen_jax.sweep.collect`). This module only builds lists
of dicts: configs import it, so it imports nothing heavy.
"""

import builtins
import itertools
from typing import Any, Dict, Iterable, List, Sequence

from medgen_jax import errors

Overrides = Dict[str, Any]
Sweep = List[Overrides]


class SweepError(errors.UserError, ValueError):
  """A sweep that cannot be run: bad helper input, an unknown config key, a
  value the config refuses; the message names the key or the run."""


def _value(v: Any) -> Any:
  # Lists become tuples: config fields hold tuples, and a run's overrides
  # must compare equal to the values the command line gives back.
  return tuple(_value(x) for x in v) if isinstance(v, (list, tuple)) else v


def _key(key: Any) -> str:
  if not isinstance(key, str) or not key or any(
      not part for part in key.split(".")):
    raise SweepError(f"sweep key {key!r} must be a dotted config key such as "
                     "'optim.lr' or 'seed'")
  return key


def values(key: str, vals: Iterable[Any]) -> Sweep:
  """One run per value of ``key``: ``[{key: v0}, {key: v1}, ...]``."""
  key = _key(key)
  if isinstance(vals, (str, bytes, dict)):
    raise SweepError(f"sweep.values({key!r}, ...) takes a list of values, "
                     f"got {vals!r}")
  out = [{key: _value(v)} for v in vals]
  if not out:
    raise SweepError(f"sweep.values({key!r}, ...) got no values")
  return out


def fixed(key: str, value: Any) -> Sweep:
  """One run setting ``key`` to ``value``: in a :func:`product`, every run
  gets it (and run names leave it out, since it does not vary)."""
  return [{_key(key): _value(value)}]


def _sweeps(name: str, sweeps: Sequence[Sweep]) -> List[Sweep]:
  if isinstance(sweeps, dict) or not isinstance(sweeps, (list, tuple)):
    raise SweepError(f"sweep.{name} takes a list of sweeps, got {sweeps!r}")
  out = []
  for s in sweeps:
    if (not isinstance(s, (list, tuple)) or not s
        or not all(isinstance(run, dict) for run in s)):
      raise SweepError(f"sweep.{name}: every entry must be a non-empty list "
                       f"of override dicts (sweep.values(...)), got {s!r}")
    out.append(list(s))
  if not out:
    raise SweepError(f"sweep.{name} got no sweeps")
  return out


def _merge(name: str, runs: Sequence[Overrides]) -> Overrides:
  out: Overrides = {}
  for run in runs:
    shared = sorted(set(out) & set(run))
    if shared:
      raise SweepError(f"sweep.{name}: key(s) {shared} set by more than one "
                       "of its sweeps; set each key in one place")
    out.update(run)
  return out


def product(sweeps: Sequence[Sweep]) -> Sweep:
  """Every combination of ``sweeps``' runs, the last varying fastest (as
  nested for-loops): sizes multiply. A key may appear in only one sweep."""
  sweeps = _sweeps("product", sweeps)
  return [_merge("product", combo) for combo in itertools.product(*sweeps)]


def zip(sweeps: Sequence[Sweep]) -> Sweep:  # pylint: disable=redefined-builtin
  """The i-th runs of ``sweeps`` merged into one run: all must have the
  same number of runs (e.g. a learning rate with its warm-up)."""
  sweeps = _sweeps("zip", sweeps)
  lengths = [len(s) for s in sweeps]
  if len(set(lengths)) > 1:
    keys = [sorted({k for run in s for k in run}) for s in sweeps]
    detail = ", ".join(f"{k} has {n}" for k, n in builtins.zip(keys, lengths))
    raise SweepError(f"sweep.zip needs sweeps of equal length: {detail}; "
                     "use sweep.product for every combination")
  return [_merge("zip", runs) for runs in builtins.zip(*sweeps)]
