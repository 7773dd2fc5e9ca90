"""A sweep's runs in one table, and plots of a metric against a swept value.

Reads, for every run of ``W/sweep.json`` (failed, cut and not yet started
runs included, with their status):
  metrics.jsonl           training and evaluator lines: the last value of
                          each metric per split, as ``train/loss``,
                          ``eval/generative/fid``, ...
  results.jsonl           a study's cells: the mean over the study's seeds,
                          as ``<task>/<arm>/f<fraction>/<metric>``
  generator_metrics.json  a study's generators: ``generators/<name>/fid``, ...

and writes ``W/sweep_table.csv`` (every metric), ``W/sweep_table.md`` (the
headline metrics) and ``W/sweep_<metric>_vs_<param>.png``.
"""

import csv
import dataclasses
import fnmatch
import io
import json
import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from medgen_jax import jsonl
from medgen_jax.sweep import SweepError
from medgen_jax.sweep import plan as plan_lib

TABLE_CSV = "sweep_table.csv"
TABLE_MD = "sweep_table.md"
DONE = "done"
# Metrics sweep_table.md shows besides every train/* column and each study
# task's primary metric (the CSV has them all).
HEADLINE = ("fid", "kid_mean", "precision", "recall", "psnr", "ssim", "mae",
            "dice", "auc")
REFERENCE_ROW = "real (reference)"  # generator_metrics.json's real baseline


@dataclasses.dataclass
class Row:
  """One run.

  Attributes:
    name: the run's name (its directory under the sweep's workdir).
    overrides: its swept and fixed values.
    status: ``done``, ``failed (exit N)``, ``interrupted``, ``incomplete``
      (running, or killed hard), ``outdated`` (its record is of another
      command than the manifest's) or ``pending`` (not started).
    note: a failed run's last error line, or why a run is outdated.
    step: the last training step logged (``None`` if none).
    metrics: column -> value.
    headline: the columns sweep_table.md shows.
  """

  name: str
  overrides: Dict[str, Any]
  status: str
  note: str = ""
  step: Optional[int] = None
  metrics: Dict[str, float] = dataclasses.field(default_factory=dict)
  headline: Tuple[str, ...] = ()


@dataclasses.dataclass
class Collected:
  """What :func:`collect` read and wrote."""

  rows: List[Row]
  swept: List[str]
  columns: List[str]
  csv: str
  md: str
  plots: List[str]


def _number(v: Any) -> Optional[float]:
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return None
  return float(v)


def run_metrics(run_dir: str) -> Tuple[Dict[str, float], List[str],
                                       Optional[int]]:
  """``(metrics, headline columns, last train step)`` of one run's files."""
  metrics: Dict[str, float] = {}
  headline: List[str] = []
  step = None
  for r in jsonl.read(os.path.join(run_dir, "metrics.jsonl")):
    split = str(r.get("split", "train"))
    if split == "train" and isinstance(r.get("step"), int):
      step = max(step or 0, r["step"])
    for k, v in r.items():
      if k not in ("step", "split") and _number(v) is not None:
        metrics[f"{split}/{k}"] = _number(v)
        if split == "train" or k in HEADLINE:
          headline.append(f"{split}/{k}")
  for r in jsonl.read(os.path.join(run_dir, "results.jsonl")):
    try:
      cell = f"{r['task']}/{r['arm']}/f{plan_lib.format_value(r['fraction'])}"
      for m, s in r["metrics"].items():
        metrics[f"{cell}/{m}"] = float(s["mean"])
        if m == r.get("primary"):
          headline.append(f"{cell}/{m}")
    except (KeyError, TypeError, ValueError, AttributeError):
      continue  # a line of another layout: not a study cell
  gen = jsonl.read_json(os.path.join(run_dir, "generator_metrics.json"))
  for name, ms in (gen.get("metrics") or {}).items():
    if name == REFERENCE_ROW or not isinstance(ms, dict):
      continue
    for k, v in ms.items():
      if isinstance(v, dict) and _number(v.get("mean")) is not None:
        k, v = f"{k}_mean", v["mean"]
      if _number(v) is not None:
        metrics[f"generators/{name}/{k}"] = _number(v)
        if k in HEADLINE:
          headline.append(f"generators/{name}/{k}")
  return metrics, list(dict.fromkeys(headline)), step


def _status_from_files(run_dir: str) -> str:
  """The status of a run with no exit record (started by hand or from the
  SLURM script and still running, or killed hard)."""
  config = jsonl.read_json(os.path.join(run_dir, "config.json"))
  if config.get("kind") == "study":
    return DONE if os.path.exists(os.path.join(run_dir, "report.md")) \
        else "incomplete"
  num_steps = (config.get("train") or {}).get("num_steps")
  if isinstance(num_steps, int):
    from medgen_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
    steps = checkpoint.steps_on_disk(run_dir)
    if steps and steps[-1] >= num_steps:
      return DONE
  return "incomplete"


def run_status(run_dir: str, command: Optional[str] = None
               ) -> Tuple[str, str]:
  """``(status, note)`` of one run (see :class:`Row`); ``command``:
  the manifest's, when the run's record may be of an earlier one."""
  if not os.path.isdir(run_dir):
    return "pending", ""
  record = plan_lib.read_record(run_dir)
  if "returncode" not in record:
    return _status_from_files(run_dir), ""
  if command and record.get("command", command) != command:
    return "outdated", "ran another command (e.g. other fixed overrides)"
  rc = record["returncode"]
  if rc is None:
    return "incomplete", ""
  if rc == 0:
    return DONE, ""
  if rc == plan_lib.INTERRUPTED:
    return "interrupted", ""
  if not isinstance(rc, int):
    return "incomplete", ""
  error = str(record.get("error", ""))
  if not error and record.get("slurm_job"):
    error = f"see slurm-{record['slurm_job']}.out"
  return f"failed ({plan_lib.describe_returncode(rc)})", error


def read_rows(workdir: str) -> Tuple[List[Row], List[str]]:
  """Every run of the sweep in ``workdir``, in sweep order, and the swept
  keys."""
  manifest = plan_lib.read_manifest(workdir)
  rows = []
  # The manifest's keys are sorted by name; "index" keeps the sweep's order.
  runs = sorted(manifest["runs"].items(),
                key=lambda kv: (kv[1].get("index", 0), kv[0]))
  for name, entry in runs:
    run_dir = os.path.join(workdir, name)
    status, note = run_status(run_dir, entry.get("command"))
    metrics, headline, step = run_metrics(run_dir)
    rows.append(Row(name, dict(entry.get("overrides") or {}), status, note,
                    step, metrics, tuple(headline)))
  return rows, list(manifest.get("swept") or [])


def _column_rank(column: str) -> int:
  return {"train": 0, "eval": 1, "generators": 2}.get(column.split("/")[0], 3)


def _cell(v: Any) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return "nan" if math.isnan(v) else f"{v:.5g}"
  return plan_lib.format_value(v)


def _table(rows: List[Row], swept: List[str], columns: List[str]
           ) -> Tuple[List[str], List[List[str]]]:
  head = ["run", *swept, "status", "step", *columns]
  with_note = any(r.note for r in rows)
  head += ["note"] if with_note else []
  body = []
  for r in rows:
    line = [r.name, *[_cell(r.overrides.get(k)) for k in swept], r.status,
            _cell(r.step), *[_cell(r.metrics.get(c)) for c in columns]]
    body.append(line + ([r.note] if with_note else []))
  return head, body


def write_tables(workdir: str, rows: List[Row], swept: List[str],
                 extra_md: Sequence[str] = ()) -> Tuple[str, str, List[str]]:
  """Writes sweep_table.csv (every metric) and sweep_table.md (headline
  metrics and ``extra_md``); returns their paths and the CSV's metric
  columns."""
  # Sources in a fixed order; within one, the order the files list them
  # (a study's arms as its report lists them).
  columns = sorted(dict.fromkeys(c for r in rows for c in r.metrics),
                   key=_column_rank)
  shown = {c for r in rows for c in r.headline} | set(extra_md)
  md_columns = [c for c in columns if c in shown]
  head, body = _table(rows, swept, columns)
  buf = io.StringIO()
  csv.writer(buf, lineterminator="\n").writerows([head, *body])
  csv_path = os.path.join(workdir, TABLE_CSV)
  _write(csv_path, buf.getvalue())
  head, body = _table(rows, swept, md_columns)
  esc = lambda s: s.replace("|", "\\|")  # pylint: disable=unnecessary-lambda-assignment
  lines = ["| " + " | ".join(esc(h) for h in head) + " |",
           "|" + "|".join("---" for _ in head) + "|"]
  lines += ["| " + " | ".join(esc(c) for c in line) + " |" for line in body]
  md_path = os.path.join(workdir, TABLE_MD)
  _write(md_path, "\n".join(lines) + "\n")
  return csv_path, md_path, columns


def _write(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


# -------------------------------------------------------------- plots ----


def is_seed(key: str) -> bool:
  """Swept keys averaged over in plots: ``seed``, ``*.seed``, ``*_seed``."""
  last = key.split(".")[-1]
  return last == "seed" or last.endswith("_seed")


def default_metrics(columns: Sequence[str], rows: List[Row]) -> List[str]:
  """FID and KID of every evaluator, each study task's primary metric per
  fraction (one line per arm), or else the training loss."""
  out = [p for p in ("eval/*/fid", "eval/*/kid_mean")
         if fnmatch.filter(columns, p)]
  for c in dict.fromkeys(c for r in rows for c in r.headline):
    parts = c.split("/")
    if len(parts) == 4 and parts[0] not in ("train", "eval", "generators"):
      out.append(f"{parts[0]}/*/{parts[2]}/{parts[3]}")
  if not out and "train/loss" in columns:
    out.append("train/loss")
  return list(dict.fromkeys(out))


def resolve_param(param: str, swept: Sequence[str]) -> str:
  """A swept key from its full name or its short label."""
  if param in swept:
    return param
  labels = plan_lib.short_labels(list(swept))
  found = [k for k, label in labels.items() if label == param]
  if len(found) == 1:
    return found[0]
  raise SweepError(f"--param={param} is not a swept key; swept: "
                   f"{', '.join(swept) or 'none'}")


def _safe(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9.+=-]+", "_", text.replace("*", "all")).strip("_")


def _line_label(column: str, pattern: str) -> str:
  """The part of ``column`` the pattern's ``*`` matched (the arm, the
  evaluator), or the column itself."""
  if "*" not in pattern:
    return column
  head, tail = pattern.split("*")[0], pattern.split("*")[-1]
  return column[len(head):len(column) - len(tail)] or column


@dataclasses.dataclass(frozen=True)
class Series:
  """One line of a plot.

  Attributes:
    label: the metric column (what its glob matched) and the values of the
      other swept non-seed keys.
    x: positions on the x axis (the swept values, or their indices when
      they are not numbers).
    mean, sd: mean and standard deviation (ddof=1; 0 for one run) over the
      runs at each position, i.e. over seeds.
    n: runs at each position.
  """

  label: str
  x: Tuple[float, ...]
  mean: Tuple[float, ...]
  sd: Tuple[float, ...]
  n: Tuple[int, ...]


def plot_series(rows: List[Row], swept: Sequence[str], metric: str,
                param: str) -> Tuple[List[Series], List[Any], bool]:
  """The lines of a plot of ``metric`` (a column glob) against ``param``:
  one per matching column and per combination of the other swept non-seed
  keys, from finished runs only, seeds pooled.

  Returns:
    ``(series, the x values in axis order, whether they are numbers)``.
  """
  done = [r for r in rows if r.status == DONE]
  columns = list(dict.fromkeys(c for r in done for c in r.metrics
                               if fnmatch.fnmatchcase(c, metric)))
  others = [k for k in swept if k != param and not is_seed(k)]
  labels = plan_lib.short_labels(list(swept))
  key = lambda r, keys: json.dumps([r.overrides.get(k) for k in keys])  # pylint: disable=unnecessary-lambda-assignment
  xs = list(dict.fromkeys(key(r, [param]) for r in rows))
  values = [json.loads(x)[0] for x in xs]
  numeric = all(_number(v) is not None for v in values)
  if numeric:
    order = sorted(range(len(values)), key=lambda i: values[i])
    xs, values = [xs[i] for i in order], [values[i] for i in order]
  positions = values if numeric else list(range(len(values)))
  out = []
  for column in columns:
    for group in dict.fromkeys(key(r, others) for r in done):
      pts = []
      for x, pos in zip(xs, positions):
        ys = [r.metrics[column] for r in done
              if key(r, [param]) == x and key(r, others) == group
              and np.isfinite(r.metrics.get(column, np.nan))]
        if ys:
          pts.append((float(pos), float(np.mean(ys)),
                      float(np.std(ys, ddof=1)) if len(ys) > 1 else 0.0,
                      len(ys)))
      if not pts:
        continue
      label = _line_label(column, metric)
      if others:
        label += " (" + ", ".join(
            f"{labels[k]}={plan_lib.format_value(v)}"
            for k, v in zip(others, json.loads(group))) + ")"
      out.append(Series(label, *(tuple(p) for p in zip(*pts))))
  return out, values, numeric


def plot_metric(rows: List[Row], swept: Sequence[str], metric: str,
                param: str, path: str) -> bool:
  """Writes the plot of :func:`plot_series` to ``path`` (mean and standard
  deviation over seeds as error bars); False, and nothing written, when no
  finished run has the metric."""
  lines, values, numeric = plot_series(rows, swept, metric, param)
  if not lines:
    return False
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
  for s in lines:
    ax.errorbar(s.x, s.mean, yerr=s.sd, marker="o", capsize=3, label=s.label)
  if not numeric:
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels([plan_lib.format_value(v) for v in values])
  elif min(values) > 0 and max(values) >= 10 * min(values):
    ax.set_xscale("log")  # learning rates, weight decays, ...
  seeds = [k for k in swept if is_seed(k)]
  over = (f"mean and sd over {', '.join(seeds)}" if seeds
          else "one run per point")
  ax.set_title(f"{metric} vs {param} ({over})", fontsize=9)
  ax.set_xlabel(param)
  ax.set_ylabel(metric)
  ax.grid(alpha=0.3)
  if len(lines) > 1 or lines[0].label != metric:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True


def plot_path(workdir: str, metric: str, param: str,
              swept: Sequence[str]) -> str:
  label = plan_lib.short_labels(list(swept))[param]
  return os.path.join(workdir, f"sweep_{_safe(metric)}_vs_{_safe(label)}.png")


def collect(workdir: str, metrics: Sequence[str] = (),
            params: Sequence[str] = ()) -> Collected:
  """Reads every run of the sweep in ``workdir`` and writes its table and
  plots.

  Args:
    workdir: the sweep's workdir (with ``sweep.json``).
    metrics: column globs to plot (``eval/generative/fid``,
      ``segmentation/*/f0.1/dice``); default :func:`default_metrics`.
    params: swept keys (or their short labels) on the x axis; default every
      swept key that is not a seed.

  Raises:
    SweepError: no sweep manifest, an unknown ``param``, or a requested
      metric no run has (the tables are written first).
  """
  rows, swept = read_rows(workdir)
  csv_path, md_path, columns = write_tables(workdir, rows, swept)
  params = ([resolve_param(p, swept) for p in params] if params
            else [k for k in swept if not is_seed(k)])
  missing = [m for m in metrics if not fnmatch.filter(columns, m)]
  if missing:
    raise SweepError(
        f"no run has a metric matching {missing} (tables written to "
        f"{md_path}); metrics: {', '.join(columns[:30]) or 'none yet'}"
        + (" ..." if len(columns) > 30 else ""))
  metrics = list(metrics) or default_metrics(columns, rows)
  if metrics:
    # Plotted metrics are shown in the markdown table too.
    write_tables(workdir, rows, swept,
                 [c for c in columns for m in metrics
                  if fnmatch.fnmatchcase(c, m)])
  plots = []
  for param in params:
    for metric in metrics:
      path = plot_path(workdir, metric, param, swept)
      if plot_metric(rows, swept, metric, param, path):
        plots.append(path)
  return Collected(rows, swept, columns, csv_path, md_path, plots)
