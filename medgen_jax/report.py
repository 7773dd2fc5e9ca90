"""Study report: ``report.md`` and ``report.html`` with tables, plots, grids.

The report is built as a list of blocks (heading, paragraph, table, image,
code) rendered twice, to Markdown and to self-contained-looking HTML (images
are files beside it), so both always say the same thing.
"""

import html
import json
import os
from typing import Any, Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import matplotlib.ticker  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from medgen_jax import jsonl  # pylint: disable=wrong-import-position
from medgen_jax import viz  # pylint: disable=wrong-import-position
from medgen_jax.data.pipeline import MASK_KEYS  # pylint: disable=wrong-import-position
from medgen_jax.eval import tasks as tasks_lib  # pylint: disable=wrong-import-position
from medgen_jax.eval import metric_validation  # pylint: disable=wrong-import-position
from medgen_jax.methods import base as methods_base  # pylint: disable=wrong-import-position

Block = Tuple[str, Any]
FIGURES = "figures"

METRIC_HELP = {
    "auc": "area under the ROC curve (lesion present vs absent); 0.5 = chance",
    "accuracy": "fraction of test slices classified correctly",
    "balanced_accuracy": "mean of per-class recall (robust to class "
                         "imbalance); 0.5 = chance for 2 classes",
    "dice": "Dice overlap of predicted and true lesion voxels pooled over "
            "all test slices; 1 = perfect",
    "dice_per_image": "mean Dice over test slices that contain a lesion",
    "hd95": "95th-percentile symmetric surface distance in pixels, mean over "
            "lesioned test slices where the model predicted a lesion "
            "(lower is better)",
    "hd95_missed": "lesioned test slices where the model predicted nothing",
    "ssim": "structural similarity of translated and true target images "
            "(data range 2 on the normalised scale); 1 = identical",
    "psnr": "peak signal-to-noise ratio in dB (data range 2)",
    "mae": "mean absolute error on the normalised [-1, 1] scale",
    "mae_foreground": "mean absolute error inside the target's non-background",
    "seg_dice": "lesion Dice of a segmenter trained on real target-contrast "
                "images, run on the translated images",
    "seg_dice_real": "the same segmenter's Dice on the real target images "
                     "(the ceiling for seg_dice)",
}


def fmt(x: float, digits: int = 3) -> str:
  if x is None or not np.isfinite(x):
    return "n/a"
  return f"{x:.{digits}f}"


def fmt_ci(s: Dict[str, float], digits: int = 3) -> str:
  """``mean [low, high]`` (or just the mean for one seed), with a paired
  difference's ``p``."""
  if not np.isfinite(s.get("ci_low", np.nan)):
    return fmt(s["mean"], digits)
  p = s.get("p", np.nan)
  return (f"{fmt(s['mean'], digits)} [{fmt(s['ci_low'], digits)}, "
          f"{fmt(s['ci_high'], digits)}]" +
          (f" p={p:.2g}" if np.isfinite(p) else ""))


# ----------------------------------------------------------- rendering ----


def render_markdown(blocks: Sequence[Block]) -> str:
  out: List[str] = []
  for kind, value in blocks:
    if kind in ("h1", "h2", "h3"):
      out.append("#" * int(kind[1]) + " " + value)
    elif kind == "p":
      out.append(value)
    elif kind == "ul":
      out += [f"- {item}" for item in value]
    elif kind == "table":
      header, rows = value
      out.append("| " + " | ".join(header) + " |")
      out.append("|" + "---|" * len(header))
      out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    elif kind == "img":
      path, caption = value
      out.append(f"![{caption}]({path})\n\n*{caption}*")
    elif kind == "code":
      out.append("```\n" + value.rstrip() + "\n```")
    else:
      raise ValueError(f"unknown block kind {kind!r}")
    out.append("")
  return "\n".join(out)


def _inline_html(text: str) -> str:
  """Escapes text and renders ``**bold**`` pairs."""
  parts = html.escape(text).split("**")
  return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def render_html(blocks: Sequence[Block], title: str) -> str:
  body: List[str] = []
  for kind, value in blocks:
    if kind in ("h1", "h2", "h3"):
      body.append(f"<{kind}>{_inline_html(value)}</{kind}>")
    elif kind == "p":
      body.append(f"<p>{_inline_html(value)}</p>")
    elif kind == "ul":
      body.append("<ul>" + "".join(f"<li>{_inline_html(item)}</li>"
                                   for item in value) + "</ul>")
    elif kind == "table":
      header, rows = value
      head = "".join(f"<th>{_inline_html(h)}</th>" for h in header)
      trs = "".join("<tr>" + "".join(f"<td>{_inline_html(str(c))}</td>"
                                     for c in r) + "</tr>" for r in rows)
      body.append(f"<table><thead><tr>{head}</tr></thead>"
                  f"<tbody>{trs}</tbody></table>")
    elif kind == "img":
      path, caption = value
      body.append(f"<figure><img src='{html.escape(path)}' "
                  f"alt='{html.escape(caption)}'><figcaption>"
                  f"{_inline_html(caption)}</figcaption></figure>")
    elif kind == "code":
      body.append(f"<pre>{html.escape(value)}</pre>")
  style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;"
           "line-height:1.4}table{border-collapse:collapse;margin:1em 0}"
           "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
           "th{background:#f0f0f0}img{max-width:100%;image-rendering:"
           "pixelated}figcaption{color:#555;font-size:90%}"
           "pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:80%}")
  return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
          f"{html.escape(title)}</title><style>{style}</style></head><body>"
          + "\n".join(body) + "</body></html>\n")


# ------------------------------------------------------------- figures ----


def plot_task(results: List[Dict[str, Any]], task: str, metric: str,
              path: str) -> None:
  """Metric vs real-data fraction, one line per arm, 95% CI error bars."""
  rows = [r for r in results if r["task"] == task]
  arms = list(dict.fromkeys(r["arm"] for r in rows))
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
  for i, arm in enumerate(arms):
    pts = sorted((r["fraction"], r["metrics"][metric]) for r in rows
                 if r["arm"] == arm)
    x = np.array([p[0] for p in pts]) * (1 + 0.02 * (i - len(arms) / 2))
    y = np.array([p[1]["mean"] for p in pts])
    lo = np.array([p[1]["ci_low"] for p in pts])
    hi = np.array([p[1]["ci_high"] for p in pts])
    err = np.where(np.isfinite(lo), [y - lo, hi - y], 0.0)
    style = "--" if "only" in arm else "-"
    ax.errorbar(x, y, yerr=err, marker="o", linestyle=style, capsize=3,
                label=arm)
  ax.set_xscale("log")
  fractions = sorted({r["fraction"] for r in rows})
  ax.set_xticks(fractions)
  ax.set_xticklabels([f"{f:g}" for f in fractions])
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  if np.isfinite(tasks_lib.metric_range(metric)[1]):
    # One seed has no interval (NaN bounds): the axis starts at 0 then.
    lo = min([0.0] + [r["metrics"][metric]["ci_low"] for r in rows
                      if np.isfinite(r["metrics"][metric]["ci_low"])])
    ax.set_ylim(lo - 0.02, 1.02)
  ax.set_xlabel("fraction of real training subjects")
  ax.set_ylabel(metric + ("" if tasks_lib.higher_is_better(metric)
                          else " (lower is better)"))
  ax.set_title(f"{task}: held-out real test set, mean and 95% CI over seeds")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def real_vs_synthetic_grid(real: Dict[str, np.ndarray],
                           synthetic: Dict[str, np.ndarray], channel: int,
                           spatial_dims: int, path: str,
                           per_class: int = 8) -> None:
  """Rows: real class 0, synthetic class 0, real class 1, synthetic class 1,
  ... (``per_class`` each), lesion masks overlaid where present."""
  images, masks = [], []
  mask_key = next((k for k in MASK_KEYS if k in synthetic and k in real),
                  None)
  for k in np.unique(real["label"]):
    for src in (real, synthetic):
      idx = np.flatnonzero(src["label"] == k)[:per_class]
      if len(idx) == 0:
        continue
      idx = np.resize(idx, per_class)
      images.append(src["image"][idx, ..., channel:channel + 1])
      if mask_key:
        masks.append(src[mask_key][idx] if mask_key in src
                     else np.zeros(src["image"][idx].shape[:-1], np.uint8))
  grid = viz.image_grid(np.concatenate(images), spatial_dims,
                        masks=np.concatenate(masks) if masks else None,
                        ncol=per_class)
  viz.save_png(grid, path)


def closest_pairs_grid(synthetic: np.ndarray, train: np.ndarray,
                       pairs: Sequence[Tuple[int, int]], spatial_dims: int,
                       path: str) -> None:
  """Top row: synthetic images; bottom row: their nearest training image."""
  if not pairs:
    return
  s = np.stack([synthetic[i] for i, _ in pairs])
  t = np.stack([train[j] for _, j in pairs])
  grid = viz.image_grid(np.concatenate([s, t])[..., :1], spatial_dims,
                        ncol=len(pairs))
  viz.save_png(grid, path)


# -------------------------------------------------------------- report ----


def _result_tables(results, task: str) -> List[Block]:
  rows = [r for r in results if r["task"] == task]
  if not rows:
    return []
  metric = rows[0]["primary"]
  fractions = sorted({r["fraction"] for r in rows})
  arms = list(dict.fromkeys(r["arm"] for r in rows))
  cell = {(r["arm"], r["fraction"]): r for r in rows}
  higher = tasks_lib.higher_is_better(metric)
  best = {}
  for f in fractions:
    vals = [(cell[(a, f)]["metrics"][metric]["mean"], a) for a in arms
            if (a, f) in cell]
    vals = [v for v in vals if np.isfinite(v[0])]
    if vals:
      best[f] = (max if higher else min)(vals)[1]
  header = ["arm"] + [f"{f:g} of real" for f in fractions]
  table = []
  for a in arms:
    row = [a]
    for f in fractions:
      r = cell.get((a, f))
      txt = fmt_ci(r["metrics"][metric]) if r else "-"
      row.append(f"**{txt}**" if best.get(f) == a else txt)
    table.append(row)
  delta_header = ["arm"] + [f"Δ at {f:g}" for f in fractions]
  delta = []
  for a in arms:
    if a == "real":
      continue
    delta.append([a] + [fmt_ci(cell[(a, f)]["delta_vs_real"])
                        if (a, f) in cell and "delta_vs_real" in cell[(a, f)]
                        else "-" for f in fractions])
  subjects = ["real subjects per seed"] + [
      "/".join(str(n) for n in cell[("real", f)]["real_subjects"])
      if ("real", f) in cell else "-" for f in fractions]
  blocks: List[Block] = [
      ("h3", f"{task}: {metric} ({METRIC_HELP.get(metric, '')})"),
      ("table", (header, table + [subjects])),
      ("p", f"Paired difference to the real-only arm (same seeds, same real "
            f"subjects, same initialisation), mean [95% CI] and the paired "
            f"t-test's p; an interval that excludes 0 is a difference the "
            f"seeds support. Intervals are taken on a scale on which the "
            f"metric's range is unbounded (logit for [0, 1] metrics, log "
            f"for non-negative ones), so they stay inside it."),
      ("table", (delta_header, delta)),
  ]
  others = [m for m in rows[0]["metrics"] if m != metric]
  if others:
    hdr = ["arm", "fraction"] + others
    detail = [[r["arm"], f"{r['fraction']:g}"] +
              [fmt_ci(r["metrics"][m], 3) for m in others] for r in rows]
    blocks += [("p", "All metrics of this task (mean [95% CI]): " +
                "; ".join(f"{m}: {METRIC_HELP.get(m, m)}" for m in others)),
               ("table", (hdr, detail))]
  return blocks


def _family_blocks(summary) -> List[Block]:
  """One table per task: each generator (with its family and its metrics)
  as the real+generator arm's paired difference to real-only and to
  real+classical, per real-data fraction."""
  config, results = summary["config"], summary["results"]
  gm = summary.get("generator_metrics", {})
  fractions = sorted({r["fraction"] for r in results})
  cell = {(r["task"], r["arm"], r["fraction"]): r for r in results}
  blocks: List[Block] = [("h2", "Families side by side")]
  for task in config.study.tasks:
    rows = []
    for name, gen in config.generators.items():
      family = methods_base.FAMILIES.get(gen.method.name, gen.method.name)
      m = gm.get(name, {})
      row = [f"{name} ({family})", fmt(m.get("fid"), 2),
             fmt(1000 * m.get("kid", {}).get("mean", np.nan), 1),
             fmt(m.get("precision"), 2), fmt(m.get("recall"), 2)]
      for f in fractions:
        r = cell.get((task, f"real+{name}", f), {})
        row += [fmt_ci(r["delta_vs_real"]) if "delta_vs_real" in r else "-",
                fmt_ci(r["delta_vs_classical"])
                if "delta_vs_classical" in r else "-"]
      rows.append(row)
    if not rows:
      continue
    metric = next((r["primary"] for r in results if r["task"] == task), "")
    header = ["generator (family)", "FID ↓", "KID×1000 ↓", "precision",
              "recall"]
    for f in fractions:
      header += [f"Δ vs real at {f:g}", f"Δ vs real+classical at {f:g}"]
    blocks += [("h3", f"{task} ({metric})"), ("table", (header, rows))]
    blocks.append(("p", _classical_check(cell, task, metric, fractions)))
  blocks.append(("p", (
      "Each cell: the real+generator arm minus the real-only (or the "
      "real+classical) arm, same seeds, mean [95% CI] and paired t-test p; "
      "generator metrics on the in-domain features (see below).")))
  return blocks


def _classical_check(cell, task: str, metric: str, fractions) -> str:
  """Whether real+classical is at least as good as real-only with all the
  real data, the baseline's sanity check."""
  full = max(fractions) if fractions else None
  d = cell.get((task, "real+classical", full), {}).get("delta_vs_real")
  if d is None:
    return f"Check of the classical baseline ({task}): no real+classical arm."
  sign = 1 if tasks_lib.higher_is_better(metric) else -1
  worse = _outcome(d, sign) == "worse"  # the whole interval on that side
  verdict = ("worse than real-only: at this training budget the classical "
             "augmentation costs more than it adds; read the "
             "'Δ vs real+classical' columns against a weak baseline"
             if worse else "not worse than real-only")
  return (f"Check of the classical baseline ({task}, {full:g} of the real "
          f"data): real+classical − real = {fmt_ci(d)}: {verdict}.")


def _strength_blocks(chosen: Dict[str, Any]) -> List[Block]:
  """The classical augmentation strengths tried on validation."""
  if not chosen:
    return []
  rows = [[task, c["metric"]] +
          [f"×{g:g}: {fmt(v)}" + (" ←" if g == c["chosen"] else "")
           for g, v in zip(c["strengths"], c["scores"])]
          for task, c in chosen.items()]
  width = max(len(c["strengths"]) for c in chosen.values())
  return [("p", "Classical augmentation strength, chosen on the validation "
                "split (one seed of real+classical on all real subjects per "
                "multiplier of every augmentation probability; ← the one "
                "every classical arm uses):"),
          ("table", (["task", "metric"] + [f"try {i + 1}"
                                           for i in range(width)], rows))]


def _training_note(config, results) -> str:
  """How the downstream models were trained and chosen."""
  parts = []
  for name, t in config.study.tasks.items():
    steps = [sel["step"] for r in results if r["task"] == name
             for sel in r.get("selected", [])]
    chosen = (f"; each seed keeps its parameters with the best score on the "
              f"'{config.data.eval_split}' split, checked every "
              f"{t.steps_per_call} steps (selected steps: median "
              f"{int(np.median(steps))}, range {min(steps)}-{max(steps)})"
              if steps else "; the last step's parameters are scored")
    parts.append(f"{name}: {t.steps} steps, batch {t.batch_size}{chosen}")
  return ("Every arm of a task gets the same training budget. " +
          ". ".join(parts) + ".")


def _extra_seeds_note(sc, results) -> str:
  """Which cells got more seeds because a decision was close."""
  arms: Dict[Tuple[str, float], List[str]] = {}
  for r in results:
    if r.get("extra_seeds"):
      arms.setdefault((r["task"], r["fraction"]), []).append(r["arm"])
  if not arms:
    return ""
  low, high = sc.decision_band
  return (f" (+{sc.extra_seeds} for the synthetic arms whose paired "
          f"p-value to real or real+classical lay in [{low:g}, {high:g}], "
          "and for those two baselines: "
          + "; ".join(f"{t} at {f:g}: {', '.join(a)}"
                      for (t, f), a in sorted(arms.items())) + ")")


def _outcome(d: Dict[str, float], sign: int) -> str:
  """``better``/``worse`` when the paired interval excludes 0 on that
  side, else ``level``."""
  lo, hi = sign * d.get("ci_low", np.nan), sign * d.get("ci_high", np.nan)
  if np.isfinite(lo) and np.isfinite(hi):
    if min(lo, hi) > 0:
      return "better"
    if max(lo, hi) < 0:
      return "worse"
  return "level"


def _verdict(results, task: str) -> str:
  """One honest sentence per task from the paired deltas."""
  rows = [r for r in results if r["task"] == task and "delta_vs_real" in r]
  if not rows:
    return ""
  metric = rows[0]["primary"]
  sign = 1 if tasks_lib.higher_is_better(metric) else -1
  by_outcome: Dict[str, List[str]] = {"better": [], "worse": [], "level": []}
  for r in rows:
    by_outcome[_outcome(r["delta_vs_real"], sign)].append(
        f"{r['arm']} at {r['fraction']:g}")
  wins, losses, ties = (by_outcome[k] for k in ("better", "worse", "level"))
  parts = [f"**{task}** ({metric}): "]
  parts.append(f"better than real-only with 95% confidence: "
               f"{', '.join(wins) if wins else 'none'}; ")
  parts.append(f"worse: {', '.join(losses) if losses else 'none'}; ")
  parts.append(f"not distinguishable from real-only with these seeds: "
               f"{len(ties)} of {len(rows)} cells.")
  return "".join(parts)


def family_verdicts(config, results) -> List[str]:
  """One plain sentence per generator and task: does its real+generator
  arm beat real-only, and the tuned real+classical arm, at each real-data
  fraction, as far as the seeds support."""
  out = []
  for name, gen in config.generators.items():
    family = methods_base.FAMILIES.get(gen.method.name, gen.method.name)
    for task in config.study.tasks:
      rows = sorted((r for r in results if r["task"] == task and
                     r["arm"] == f"real+{name}" and "delta_vs_real" in r),
                    key=lambda r: r["fraction"])
      if not rows:
        continue
      metric = rows[0]["primary"]
      sign = 1 if tasks_lib.higher_is_better(metric) else -1
      clauses, seen, all_level = [], set(), True
      for r in rows:
        vs_real = _outcome(r["delta_vs_real"], sign)
        vs_cls = (_outcome(r["delta_vs_classical"], sign)
                  if "delta_vs_classical" in r else None)
        seen.add(vs_real)
        where = f"at {r['fraction']:g} of the real data"
        level = vs_real == "level" and vs_cls in ("level", None)
        all_level = all_level and level
        if level:
          clauses.append(f"{where} no difference to real-only"
                         f"{' or real+classical' if vs_cls else ''} that "
                         "the seeds support")
          continue
        part = (f"{where} {vs_real} than real-only "
                f"({fmt_ci(r['delta_vs_real'])})" if vs_real != "level" else
                f"{where} level with real-only "
                f"({fmt_ci(r['delta_vs_real'])})")
        if vs_cls:
          word = ("level with" if vs_cls == "level" else
                  f"{vs_cls} than")
          part += (f" and {word} real+classical "
                   f"({fmt_ci(r['delta_vs_classical'])})")
        clauses.append(part)
      overall = ("mixed" if {"better", "worse"} <= seen else
                 "helps" if "better" in seen else
                 "hurts" if "worse" in seen else "no supported effect")
      if all_level:
        fractions = " or ".join(f"{r['fraction']:g}" for r in rows)
        clauses = [f"no difference to real-only or real+classical that the "
                   f"seeds support, at {fractions} of the real data"]
      out.append(f"**{name}** ({family}), {task} ({metric}): {overall} — "
                 + "; ".join(clauses) + ".")
  return out


def _memorized(m: Dict[str, Any]) -> str:
  """Flagged fraction (pixel space) with the audit's chance rate and p."""
  if "memorized_fraction" not in m:
    return "-"
  pix = m.get("memorization", {}).get("pixels", {})
  return (f"{fmt(m['memorized_fraction'])} (chance "
          f"{fmt(pix.get('quantile', np.nan), 2)}, p={pix.get('p_value', np.nan):.2g})")


# Below this held-out AUC the features barely tell the classes apart.
WEAK_ENCODER_AUC = 0.7


def _weak_encoder(card: Dict[str, Any]) -> str:
  auc = card["held_out_scores"].get("auc", np.nan)
  if np.isfinite(auc) and auc < WEAK_ENCODER_AUC:
    return ("; these features barely separate the classes, so the metrics "
            "below cannot see a generator that gets a class wrong")
  return ""


def _generator_blocks(summary) -> List[Block]:
  gm = summary["generator_metrics"]
  blocks: List[Block] = [("h2", "Generators: realism, diversity, "
                                "memorization")]
  card = summary["encoder_card"]
  blocks.append(("p", (
      f"Feature space: {card['description']} (feature dim "
      f"{card['feature_dim']}; held-out AUC {fmt(card['held_out_scores'].get('auc'))}; "
      f"train fingerprint {card['settings']['train_fingerprint']}"
      f"{_weak_encoder(card)}). "
      "Every FID/KID/precision/recall/density/coverage/memorization number "
      "below uses these features, computed against the real test subjects. "
      "The 'real (reference)' row compares real validation subjects with "
      "the real test subjects: the value a perfect generator could reach "
      "with this many images.")))
  header = ["generator", "FID ↓", "KID×1000 ↓", "precision ↑", "recall ↑",
            "density ↑", "coverage ↑", "MS-SSIM ↓ (diversity)",
            "collapse ↓", "memorized ↓", "label agreement ↑"]
  rows = []
  for name, m in gm.items():
    kid = m.get("kid", {})
    rows.append([name, fmt(m.get("fid"), 2),
                 f"{fmt(1000 * kid.get('mean', np.nan), 2)} ± "
                 f"{fmt(1000 * kid.get('std', np.nan), 2)}",
                 fmt(m.get("precision")), fmt(m.get("recall")),
                 fmt(m.get("density")), fmt(m.get("coverage")),
                 fmt(m.get("ms_ssim")), fmt(m.get("mode_collapse"), 2),
                 _memorized(m),
                 fmt(m.get("label_agreement")) if "label_agreement" in m
                 else "-"])
  blocks.append(("table", (header, rows)))
  blocks.append(("p", (
      "FID/KID: distance between real and synthetic feature distributions; "
      "precision: share of synthetic images inside the real manifold "
      "(realism); recall: share of real images inside the synthetic "
      "manifold (coverage of modes); density/coverage: their outlier-robust "
      "versions; MS-SSIM: mean pairwise MS-SSIM among images of the set "
      "(lower = more diverse; compare with the real row); collapse: how "
      "far that MS-SSIM has moved from the real images' towards 1 "
      "(identical images), flagged above 0.5; memorized: share "
      "of synthetic images closer (in pixels) to a training image than all "
      "but the given quantile ('chance') of real held-out images are; a "
      "generator that does not copy is flagged at about that rate, and p is "
      "the binomial test of the excess (a small p is a privacy red flag); "
      "label agreement: share of synthetic "
      "images whose generated lesion mask agrees with the class they were "
      "sampled for.")))
  for name, m in gm.items():
    if "closest_pairs_png" in m:
      blocks.append(("img", (m["closest_pairs_png"], (
          f"{name}: the synthetic images closest to a training image (top) "
          f"and that training image (bottom)"))))
  return blocks


def _metric_validation_blocks(validation: Dict[str, Any]) -> List[Block]:
  """The metrics on real held-out images degraded on purpose: whether each
  moves as a worse generator should."""
  columns = list(metric_validation.METRICS)
  header = ["degradation", "strength"] + columns
  rows = []
  for name, r in validation.items():
    for i, s in enumerate(r["strengths"]):
      cells = []
      for m in columns:
        v = r["metrics"].get(m)
        txt = fmt(v[i]) if v is not None else "-"
        if m in r["monotone"] and i == len(r["strengths"]) - 1:
          txt += " ✓" if r["monotone"][m] else " ✗"
        cells.append(txt)
      rows.append([name if i == 0 else "", f"{s:g}"] + cells)
  failed = metric_validation.failures(validation)
  return [
      ("h3", "Do the metrics see known degradations?"),
      ("p", ("Real validation images (subsampled to the test split's class "
             "shares) degraded on purpose and scored like a synthetic set: "
             "blur (sigma px), noise (sigma), intensity shift, a share of "
             "the rarer class dropped, a share collapsed onto one image per "
             "class, a share replaced by training images. ✓/✗ in the last "
             "row of each degradation: whether a metric meant to detect it "
             "worsened monotonically beyond its chance variation. " +
             ("Every expected move was seen." if not failed else
              "Not seen: " + ", ".join(failed) + "; read those metrics "
              "with that in mind."))),
      ("table", (header, rows)),
  ]


def write(summary: Dict[str, Any]) -> Dict[str, str]:
  """Writes ``report.md``, ``report.html`` and figures; returns their paths."""
  config = summary["config"]
  workdir = summary["workdir"]
  results = summary["results"]
  fig_dir = os.path.join(workdir, FIGURES)
  os.makedirs(fig_dir, exist_ok=True)
  sc = config.study
  tasks = list(sc.tasks)
  blocks: List[Block] = [("h1", "Generative augmentation study")]
  total = sum(summary["timings"].values())
  blocks.append(("p", (
      f"Data: {config.data.dataset} ({config.data.spatial_dims}D, "
      f"{config.data.res}px, contrasts {'+'.join(config.data.contrasts)}). "
      f"Generators: {', '.join(summary['generators'])} "
      f"({sc.generator_data} training data). Tasks: {', '.join(tasks)}. "
      f"Real-data fractions: {', '.join(f'{f:g}' for f in sc.fractions)}; "
      f"{sc.num_seeds} seeds per cell{_extra_seeds_note(sc, results)}; "
      f"synthetic share of each batch in "
      f"mixed arms: {sc.synthetic_ratio:g}. All scores are on the held-out "
      f"real '{sc.test_split}' split (subjects never seen in training). "
      f"Run time {total / 60:.1f} min.")))
  if sc.generator_data == "full":
    blocks.append(("p", (
        "Protocol note: each generator was trained on all real training "
        "subjects, so at fractions below 1 the synthetic arms carry "
        "information from subjects the real-only arm does not see (the "
        "shared-generator scenario). Use generator_data=per_fraction for "
        "the strict protocol.")))
  if summary.get("data_notes"):
    blocks.append(("p", "Fitted to the data set: " +
                   "; ".join(summary["data_notes"]) + "."))
  blocks += _family_blocks(summary)
  blocks.append(("h2", "Verdict"))
  blocks.append(("p", (
      "Per generator and task (95% paired intervals; 'level' means the "
      "seeds support no difference):")))
  blocks.append(("ul", family_verdicts(config, results)))
  for t in tasks:
    v = _verdict(results, t)
    if v:
      blocks.append(("p", v))
  blocks.append(("h2", "Downstream results"))
  blocks.append(("p", _training_note(config, results)))
  blocks += _strength_blocks(summary.get("classical_strength") or {})
  for t in tasks:
    rows = [r for r in results if r["task"] == t]
    if not rows:
      continue
    png = os.path.join(fig_dir, f"{t}_{rows[0]['primary']}.png")
    plot_task(results, t, rows[0]["primary"], png)
    blocks += _result_tables(results, t)
    blocks.append(("img", (os.path.relpath(png, workdir),
                           f"{t}: {rows[0]['primary']} vs real-data fraction "
                           "per arm")))
  # Real vs synthetic grids.
  blocks.append(("h2", "Real vs synthetic images"))
  real_train = summary["real"][config.data.train_split]
  channel = list(config.data.contrasts).index(
      "flair" if "flair" in config.data.contrasts else
      config.data.contrasts[0])
  for name, syn in summary["synthetic"].items():
    png = os.path.join(fig_dir, f"real_vs_{name}.png")
    real_vs_synthetic_grid(real_train, syn, channel, config.data.spatial_dims,
                           png)
    blocks.append(("img", (os.path.relpath(png, workdir), (
        f"{config.data.contrasts[channel]}, rows alternate real / {name} "
        "per class (no lesion, then lesion); lesion masks in colour"))))
  gm = summary["generator_metrics"]
  for name, m in gm.items():
    pairs = m.get("closest_pairs")
    if pairs and name in summary["synthetic"]:
      png = os.path.join(fig_dir, f"closest_{name}.png")
      closest_pairs_grid(summary["synthetic"][name]["image"],
                         real_train["image"], pairs[:8],
                         config.data.spatial_dims, png)
      m["closest_pairs_png"] = os.path.relpath(png, workdir)
  blocks += _generator_blocks(summary)
  if summary.get("metric_validation"):
    blocks += _metric_validation_blocks(summary["metric_validation"])
  blocks.append(("h2", "Run time"))
  blocks.append(("table", (["stage", "seconds"],
                           [[k, f"{v:.1f}"] for k, v in
                            summary["timings"].items()] +
                           [["total", f"{total:.1f}"]])))
  blocks.append(("h2", "Config"))
  blocks.append(("code", json.dumps(config.to_dict(), indent=1,
                                    sort_keys=True, default=str)))
  md_path = os.path.join(workdir, "report.md")
  html_path = os.path.join(workdir, "report.html")
  for path, text in ((md_path, render_markdown(blocks)),
                     (html_path, render_html(blocks, "medgen_jax study"))):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  return {"markdown": md_path, "html": html_path}


def summary_table(results: List[Dict[str, Any]]) -> str:
  """Plain-text table of the primary metric per task, arm and fraction."""
  lines = []
  for task in dict.fromkeys(r["task"] for r in results):
    rows = [r for r in results if r["task"] == task]
    metric = rows[0]["primary"]
    fractions = sorted({r["fraction"] for r in rows})
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    cell = {(r["arm"], r["fraction"]): r for r in rows}
    width = max(len(a) for a in arms) + 2
    lines.append(f"{task} — {metric}, mean [95% CI] over seeds, held-out "
                 "test subjects")
    lines.append(" " * width + "".join(f"{f'{f:g} of real':>24}"
                                       for f in fractions))
    for a in arms:
      lines.append(f"{a:<{width}}" + "".join(
          f"{fmt_ci(cell[(a, f)]['metrics'][metric]):>24}"
          if (a, f) in cell else f"{'-':>24}" for f in fractions))
    lines.append("")
  return "\n".join(lines)


def load_results(workdir: str) -> List[Dict[str, Any]]:
  """The study's ``results.jsonl`` as a list (for notebooks)."""
  return jsonl.read(os.path.join(workdir, "results.jsonl"))

