"""What a data set holds: counts, shapes, intensities, masks, an example grid.

Used by ``launch.py --mode=inspect`` to check a data set before training on
it: are the splits and classes balanced as expected, are intensities in the
expected units (HU for CT), do the masks hold the expected label values, and
do the images look right with their masks on top.
"""

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from medgen_jax import viz
from medgen_jax.data import pipeline

PERCENTILES = (0.5, 1.0, 50.0, 99.0, 99.5)
# Overlay preference: a user segmentation, then the phantom's lesions.
OVERLAY_KEYS = ("mask", "lesion_mask", "tissue")


def builder_arrays(builder, split: str) -> Dict[str, np.ndarray]:
  """All examples of ``split`` of a prepared builder, stacked ``[N, ...]``.

  As :func:`medgen_jax.data.pipeline.read_split`, without preparing the
  builder again (a DICOM folder would re-read every header).
  """
  source = builder.as_data_source(split=split)
  examples = source.__getitems__(list(range(len(source))))
  return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


def channel_stats(x: np.ndarray) -> Dict[str, float]:
  """min/max/mean/std and :data:`PERCENTILES` of one channel (any shape)."""
  x = np.asarray(x, np.float64).reshape(-1)
  out = {"min": float(x.min()), "max": float(x.max()),
         "mean": float(x.mean()), "std": float(x.std())}
  for p, v in zip(PERCENTILES, np.percentile(x, PERCENTILES)):
    out[f"p{p:g}"] = float(v)
  return out


def split_summary(arrays: Mapping[str, np.ndarray],
                  contrasts: Sequence[str],
                  class_names: Sequence[str]) -> Dict[str, Any]:
  """Summary of one split's raw arrays ``{feature: [N, ...]}``."""
  n = len(next(iter(arrays.values())))
  out: Dict[str, Any] = {"examples": int(n)}
  if "label" in arrays:
    counts = np.bincount(arrays["label"].astype(np.int64),
                         minlength=len(class_names))
    out["classes"] = {(class_names[i] if i < len(class_names) else str(i)):
                      int(c) for i, c in enumerate(counts)}
  if "subject_id" in arrays:
    out["subjects"] = int(len(np.unique(arrays["subject_id"])))
  out["features"] = {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)}
                     for k, v in sorted(arrays.items())}
  out["intensity"] = {c: channel_stats(arrays[c.split(":", 1)[0]])
                      for c in dict.fromkeys(contrasts)}
  out["masks"] = {}
  for k in pipeline.MASK_KEYS:
    if k in arrays:
      values, counts = np.unique(arrays[k], return_counts=True)
      with_label = (arrays[k].reshape(n, -1) > 0).any(axis=1)
      out["masks"][k] = {"values": {int(v): int(c)
                                    for v, c in zip(values, counts)},
                         "examples_with_label": int(with_label.sum())}
  return out


def pick_examples(arrays: Mapping[str, np.ndarray], num: int,
                  mask_key: Optional[str]) -> np.ndarray:
  """Up to ``num`` indices spread over the split, half with a mask label.

  Deterministic: evenly spaced, so the grid shows different subjects and
  positions rather than neighbouring slices.
  """
  n = len(next(iter(arrays.values())))
  if mask_key is None:
    return np.unique(np.linspace(0, n - 1, min(num, n)).astype(np.int64))
  labelled = np.flatnonzero((arrays[mask_key].reshape(n, -1) > 0).any(1))
  rest = np.setdiff1d(np.arange(n), labelled)
  k = min(len(labelled), num // 2)
  take = lambda idx, m: idx[np.unique(np.linspace(0, len(idx) - 1, m)
                                      .astype(np.int64))] if m else idx[:0]
  first = take(labelled, k)
  second = take(rest, min(len(rest), num - len(first)))
  return np.sort(np.concatenate([first, second]))


def example_grid(arrays: Mapping[str, np.ndarray], data_cfg,
                 stats: Mapping[str, Any], num: int = 16) -> np.ndarray:
  """RGB grid ``[H', W', 3]`` of normalised examples with masks overlaid.

  One block of rows per contrast; each example's label map (``mask``, or the
  phantom's ``lesion_mask``) is drawn in colour.
  """
  mask_key = next((k for k in OVERLAY_KEYS if k in arrays), None)
  idx = pick_examples(arrays, num, mask_key)
  subset = {k: v[idx] for k, v in arrays.items()}
  model = pipeline.to_model_arrays(subset, data_cfg, stats)
  masks = model.get(mask_key) if mask_key else None
  return viz.image_grid(model["image"], data_cfg.spatial_dims, masks=masks)


def format_summary(name: str, splits: Mapping[str, Dict[str, Any]]) -> str:
  """Human-readable multi-line text of :func:`split_summary` per split."""
  lines: List[str] = [f"Data set {name}"]
  for split, s in splits.items():
    subj = f", {s['subjects']} subjects" if "subjects" in s else ""
    lines.append(f"  {split}: {s['examples']} examples{subj}")
    if "classes" in s:
      lines.append("    classes: " + ", ".join(
          f"{k}={v}" for k, v in s["classes"].items()))
  first = next(iter(splits.values()))
  lines.append("  features:")
  for k, f in first["features"].items():
    lines.append(f"    {k:<14} {str(tuple(f['shape'])):<16} {f['dtype']}")
  lines.append("  intensities (train split):")
  for c, st in first["intensity"].items():
    lines.append(f"    {c:<14} " + "  ".join(
        f"{k}={v:.4g}" for k, v in st.items()))
  for k, m in first["masks"].items():
    vals = ", ".join(f"{v}: {c}" for v, c in m["values"].items())
    lines.append(f"  {k} values (voxels): {vals}; examples with a label: "
                 f"{m['examples_with_label']}/{first['examples']}")
  return "\n".join(lines)
