"""JSON-lines files (``metrics.jsonl``, ``results.jsonl``) that survive kills,
and single JSON files written the same way.

A process killed mid-write leaves a cut last line; readers skip such lines
and rewrites go through a temporary file, so a file is never half-rewritten.
"""

import json
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

Record = Dict[str, Any]


def _lines(path: str) -> Iterator[Tuple[str, Record]]:
  """``(raw line, record)`` pairs of ``path``, skipping cut or empty lines."""
  if not os.path.exists(path):
    return
  # errors="replace": bytes garbled by a disk fault fail json, not open.
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut by a kill mid-write.
      if isinstance(record, dict):
        yield line, record


def read(path: str) -> List[Record]:
  """Every complete record of ``path`` (none if it does not exist)."""
  return [record for _, record in _lines(path)]


def rewrite(path: str, keep: Callable[[Record], bool],
            append: Optional[Record] = None) -> None:
  """Keeps the lines whose record passes ``keep`` (verbatim), then adds
  ``append``; atomically."""
  kept = [line if line.endswith("\n") else line + "\n"
          for line, record in _lines(path) if keep(record)]
  if append is not None:
    kept.append(json.dumps(append, sort_keys=True) + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


def write_json(path: str, obj: Any, default: Callable[[Any], Any] = str
               ) -> None:
  """``obj`` as indented, key-sorted JSON, atomically (through a temporary
  file): a kill leaves the old file or the new one."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=default)
  os.replace(tmp, path)


def read_json(path: str) -> Dict[str, Any]:
  """The JSON object in ``path``; ``{}`` when it is absent, unreadable or
  not an object (for caches, which are then computed again)."""
  try:
    with open(path) as f:
      obj = json.load(f)
  except (OSError, ValueError):
    return {}
  return obj if isinstance(obj, dict) else {}
