"""Small helpers for config checks: each appends a message naming the key.

Used by the central validator (:mod:`medgen_jax.config_check`) and by every
method's and network's own ``config_errors``; imports nothing of the
package, so any layer can use it.
"""

from typing import Any, Iterable, List, Mapping, Sequence, Tuple


def one_of(errors: List[str], key: str, value: Any,
           allowed: Iterable[Any]) -> None:
  allowed = tuple(allowed)
  if value not in allowed:
    errors.append(f"{key}={value!r} must be one of {allowed}")


def positive(errors: List[str], key: str, value: Any,
             allow_zero: bool = False) -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
      value >= 0 if allow_zero else value > 0)
  if not ok:
    kind = "non-negative" if allow_zero else "positive"
    errors.append(f"{key}={value!r} must be a {kind} number")


def in_range(errors: List[str], key: str, value: Any, lo: float,
             hi: float) -> None:
  """``lo <= value < hi``."""
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not (ok and lo <= value < hi):
    errors.append(f"{key}={value!r} must be in [{lo}, {hi})")


def section_keys(errors: List[str], section: str, given: Mapping[str, Any],
                 known: Iterable[str], owner: str) -> bool:
  """Unknown and missing keys of ``config.<section>`` for ``owner`` (a
  method or network) that reads exactly ``known``; ``False`` when any
  is missing (value checks would then fail on the missing key)."""
  known = tuple(known)
  unknown = sorted(set(given) - set(known))
  if unknown:
    errors.append(f"{section}: {owner} has no key(s) {unknown}; its keys "
                  f"are {sorted(known)}")
  missing = sorted(set(known) - set(given))
  if missing:
    errors.append(f"{section} is missing {owner}'s key(s) {missing}")
  return not missing


def differences(here: Mapping[str, Any], there: Mapping[str, Any],
                keys: Sequence[str]) -> List[Tuple[str, Any, Any]]:
  """``(key, value here, value there)`` for each of ``keys`` where two
  config sections differ; lists and tuples compare by their items (a JSON
  round trip turns tuples into lists)."""
  out = []
  for k in keys:
    a, b = here.get(k), there.get(k)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
      a, b = list(a or ()), list(b or ())
    if a != b:
      out.append((k, a, b))
  return out
