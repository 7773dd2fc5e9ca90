"""Input pipeline: split -> normalise -> deterministic batches -> mesh.

Medical training sets are small (hundreds to tens of thousands of slices), so a
split is read once from its TFDS data source into host memory and batches are
gathered by index. The order is a pure function of ``(shuffle_seed, step)``:
a resumed run sees exactly the batches it would have seen, with no iterator
state to checkpoint. A background thread keeps the next batches on device.
"""

import contextlib
import dataclasses
import errno
import fcntl
import functools
import importlib
import os
import queue
import threading
from typing import Dict, Iterator, Mapping, Optional, Tuple

import jax
import ml_collections
import numpy as np
from absl import logging

from medgen_jax.data import builder_lib
from medgen_jax.data import preprocess
from medgen_jax.train import sharding as sharding_lib

Arrays = Dict[str, np.ndarray]
NORMALIZATIONS = ("minmax", "zscore", "none")
# Label maps passed through to the model arrays: the phantom's tissue classes
# and lesions, and a user data set's segmentation.
MASK_KEYS = ("lesion_mask", "tissue", "mask")


def builder_module(name: str):
  """``medgen_jax.data.builders.<name>``, which exposes ``prepare(data_cfg)``."""
  try:
    return importlib.import_module(f"medgen_jax.data.builders.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"medgen_jax.data.builders.{name}":
      raise
    raise ValueError(f"unknown data.dataset {name!r}") from None


@contextlib.contextmanager
def build_lock(data_cfg: ml_collections.ConfigDict) -> Iterator[None]:
  """Holds ``<data_dir>/.<dataset>.build.lock`` for the block, so that two
  processes (jobs of a sweep, notebooks, test workers) do not build the
  same data set into the same directory at once; the second waits and
  then finds it built. Where the file system cannot lock, it builds
  without."""
  data_dir = os.path.abspath(os.path.expanduser(str(data_cfg.data_dir)))
  os.makedirs(data_dir, exist_ok=True)
  path = os.path.join(data_dir, f".{data_cfg.dataset}.build.lock")
  with open(path, "a", encoding="utf-8") as f:
    try:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        logging.info("%s: another process is building a %s data set; "
                     "waiting for it", data_dir, data_cfg.dataset)
        fcntl.flock(f, fcntl.LOCK_EX)
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
    yield


def prepare(data_cfg: ml_collections.ConfigDict):
  """The built TFDS data set of ``data_cfg`` (built first if missing, by
  one process at a time: :func:`build_lock`).

  A built data set whose files are damaged (a truncated shard after a disk
  fault) is removed and rebuilt from its sources, with a warning.
  """
  with build_lock(data_cfg):
    return _prepare(data_cfg)


def _prepare(data_cfg: ml_collections.ConfigDict):
  module = builder_module(data_cfg.dataset)
  builder = module.prepare(data_cfg)
  problem = builder_lib.damage(builder)
  if problem is None:
    return builder
  version_dir = os.fspath(builder.data_dir)
  logging.warning("%s: the built data set is damaged (%s); rebuilding it "
                  "from its sources", version_dir, problem)
  builder_lib.discard(version_dir)
  builder = module.prepare(data_cfg)
  problem = builder_lib.damage(builder)
  if problem is not None:
    raise builder_lib.DataError(
        f"{version_dir}: rebuilt, still unreadable ({problem}); check the "
        "disk and data.data_dir")
  return builder


def read_split(data_cfg: ml_collections.ConfigDict, split: str) -> Arrays:
  """All examples of ``split`` as stacked numpy arrays ``{key: [N, ...]}``.

  Builds the data set first if it is not in ``data_cfg.data_dir``.
  """
  builder = prepare(data_cfg)
  if split not in builder.info.splits:
    raise ValueError(f"split {split!r} not in data set {builder.info.name} "
                     f"(has {sorted(builder.info.splits)})")
  source = builder.as_data_source(split=split)
  examples = source.__getitems__(list(range(len(source))))
  return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


def normalization_kind(data_cfg: ml_collections.ConfigDict,
                       contrast: str) -> str:
  """``data.contrast_normalization[contrast]``, else ``data.normalization``."""
  per = data_cfg.get("contrast_normalization") or {}
  kind = per.get(contrast, data_cfg.normalization)
  if kind not in NORMALIZATIONS:
    raise ValueError(f"data.normalization must be one of {NORMALIZATIONS}, "
                     f"got {kind!r} for contrast {contrast!r}")
  return kind


def contrast_values(split: Arrays, contrast: str,
                    data_cfg: ml_collections.ConfigDict) -> np.ndarray:
  """One channel as float32: feature ``contrast`` (``"ct:bone"`` reads
  ``ct``), clipped to its CT window if it has one (``data.windows``)."""
  x = split[contrast.split(":", 1)[0]].astype(np.float32)
  window = preprocess.window_bounds(data_cfg.get("windows", {}), contrast)
  return x if window is None else np.clip(x, *window)


def normalization_stats(train: Arrays,
                        data_cfg: ml_collections.ConfigDict
                        ) -> Dict[str, Tuple[float, float]]:
  """Per-contrast ``(offset, scale)`` from the TRAINING split only.

  ``minmax``: the clip percentiles (or the contrast's CT window) map to
  [-1, 1]; ``zscore``: mean and std; ``none``: identity. Stored with
  checkpoints so samples can be mapped back to signal units and evaluation
  uses the same transform.
  """
  stats = {}
  for c in data_cfg.contrasts:
    kind = normalization_kind(data_cfg, c)
    x = contrast_values(train, c, data_cfg).astype(np.float64)
    window = preprocess.window_bounds(data_cfg.get("windows", {}), c)
    if kind == "minmax" and window:
      # A CT window is the intensity range of interest: map it to [-1, 1].
      stats[c] = ((window[0] + window[1]) / 2, (window[1] - window[0]) / 2)
    elif kind == "minmax":
      lo, hi = np.percentile(x, data_cfg.clip_percentiles)
      stats[c] = (float((lo + hi) / 2), float(max(hi - lo, 1e-8) / 2))
    elif kind == "zscore":
      stats[c] = (float(x.mean()), float(max(x.std(), 1e-8)))
    else:
      stats[c] = (0.0, 1.0)
  return stats


def to_model_arrays(split: Arrays, data_cfg: ml_collections.ConfigDict,
                    stats: Mapping[str, Tuple[float, float]]) -> Arrays:
  """Stacks contrasts as channels and normalises.

  Returns:
    ``image`` float32 ``[N, *spatial, C]`` (C = number of contrasts, in
    ``data_cfg.contrasts`` order), ``label`` int32 ``[N]``, and the masks the
    data set has (``lesion_mask``, ``tissue``, ``mask``) as uint8
    ``[N, *spatial]``.
  """
  chans = []
  for c in data_cfg.contrasts:
    offset, scale = stats[c]
    x = (contrast_values(split, c, data_cfg) - offset) / scale
    if normalization_kind(data_cfg, c) == "minmax":
      x = np.clip(x, -1.0, 1.0)
    chans.append(x)
  out = {"image": np.stack(chans, axis=-1).astype(np.float32)}
  if "label" in split:
    out["label"] = split["label"].astype(np.int32)
  for k in MASK_KEYS:
    if k in split:
      out[k] = split[k].astype(np.uint8)
  return out


def denormalize(image: np.ndarray, contrasts, stats) -> np.ndarray:
  """Inverse of the normalisation: ``[..., C]`` back to signal units.

  Channels beyond ``len(contrasts)`` (appended masks) are dropped.
  """
  image = np.asarray(image)[..., :len(contrasts)]
  offsets = np.asarray([stats[c][0] for c in contrasts], np.float32)
  scales = np.asarray([stats[c][1] for c in contrasts], np.float32)
  return np.asarray(image) * scales + offsets


def append_mask_channels(arrays: Arrays, mask_keys) -> np.ndarray:
  """``image`` with binary masks appended as channels in {-1, 1}.

  A generator trained on ``[contrasts..., mask]`` samples images together
  with their segmentation (any non-zero label counts as foreground).

  Returns:
    ``[N, *spatial, C + len(mask_keys)]`` float32.
  """
  image = arrays["image"]
  if not mask_keys:
    return image
  missing = [k for k in mask_keys if k not in arrays]
  if missing:
    raise ValueError(f"data.mask_channels {missing} are not masks of this "
                     f"data set (has {sorted(k for k in arrays if k not in ('image', 'label'))})")
  masks = [np.where(arrays[k] > 0, 1.0, -1.0).astype(np.float32)
           for k in mask_keys]
  return np.concatenate([image, np.stack(masks, axis=-1)], axis=-1)


def split_mask_channels(image: np.ndarray, num_contrasts: int
                        ) -> Tuple[np.ndarray, np.ndarray]:
  """Inverse of :func:`append_mask_channels` for generated images.

  Returns:
    the contrasts ``[N, *spatial, num_contrasts]`` and the masks
    ``[N, *spatial, M]`` as uint8 {0, 1} (threshold at 0).
  """
  image = np.asarray(image)
  return (image[..., :num_contrasts],
          (image[..., num_contrasts:] > 0).astype(np.uint8))


def subject_subset(subject_ids: np.ndarray, fraction: float,
                   seed: int) -> np.ndarray:
  """Rows of a random ``fraction`` of the subjects (at least one subject).

  One permutation per seed, truncated: for a fixed seed the subsets are
  nested (the 10% subjects are among the 25%), so a curve over fractions
  adds data instead of redrawing it.

  Returns:
    sorted row indices ``[M]`` into ``subject_ids [N]``.
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"subject fraction must be in (0, 1], got {fraction}")
  subjects = np.unique(subject_ids)
  n = max(1, int(round(fraction * len(subjects))))
  chosen = np.random.default_rng([seed, 7919]).permutation(subjects)[:n]
  return np.flatnonzero(np.isin(subject_ids, chosen))


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


@dataclasses.dataclass(frozen=True)
class Batcher:
  """Deterministic, resumable batches from in-memory arrays.

  Batch ``step`` holds positions ``[step*B, (step+1)*B)`` of an endless
  stream made of one fresh permutation per epoch, so any step can be produced
  directly. In multi-host runs each process gathers its own slice.

  With ``unpaired`` (unpaired translation, e.g. CycleGAN), every batch also
  has ``image_b``: for each example, an image from a second, independent
  stream whose subject differs (``arrays["subject_id"]``), so the two
  domains never come from one subject.
  """

  arrays: Arrays
  batch_size: int
  seed: int
  keys: Tuple[str, ...] = ("image", "label")
  process_index: int = 0
  process_count: int = 1
  unpaired: bool = False

  def __post_init__(self):
    if self.batch_size % self.process_count:
      raise ValueError(f"batch size {self.batch_size} not divisible by "
                       f"{self.process_count} processes")
    if self.unpaired:
      subjects = self.arrays.get("subject_id")
      if subjects is None or len(subjects) < 2:
        raise ValueError("unpaired batches need subject ids and at least 2 "
                         "examples")
      if len(np.unique(subjects)) < 2:
        logging.warning("unpaired batches from one subject: the partners "
                        "are its other slices, not other subjects")

  @property
  def num_examples(self) -> int:
    return len(self.arrays["image"])

  def _stream(self, step: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(epochs, offsets)`` of this process's positions at ``step``."""
    n, b = self.num_examples, self.batch_size
    local = b // self.process_count
    pos = step * b + self.process_index * local + np.arange(local)
    return np.divmod(pos, n)

  def indices(self, step: int) -> np.ndarray:
    """Example indices ``[B_local]`` of this process for ``step``."""
    epochs, offsets = self._stream(step)
    out = np.empty(len(offsets), np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = _epoch_permutation(self.seed, int(e), self.num_examples)[
          offsets[sel]]
    return out

  def partner_indices(self, step: int, idx: np.ndarray) -> np.ndarray:
    """For each example ``idx``, one of another subject: the same position
    of an independent stream, moved along that stream past examples of the
    same subject (past the example itself when there is one subject)."""
    n = self.num_examples
    subjects = self.arrays["subject_id"]
    # With a single subject, the partner is another of its examples.
    ids = subjects if len(np.unique(subjects)) > 1 else np.arange(n)
    epochs, offsets = self._stream(step)
    out = np.empty(len(idx), np.int64)
    for i, (e, o) in enumerate(zip(epochs, offsets)):
      perm = _epoch_permutation(self.seed + 1_000_003, int(e), n)
      j = 0
      while ids[perm[(o + j) % n]] == ids[idx[i]]:
        j += 1
      out[i] = perm[(o + j) % n]
    return out

  def batch(self, step: int) -> Arrays:
    idx = self.indices(step)
    out = {k: self.arrays[k][idx] for k in self.keys if k in self.arrays}
    if self.unpaired:
      out["image_b"] = self.arrays["image"][self.partner_indices(step, idx)]
    return out


def prefetch_to_mesh(batcher: Batcher, start: int, stop: int,
                     mesh: jax.sharding.Mesh,
                     size: int = 2) -> Iterator[Dict[str, jax.Array]]:
  """Yields global sharded batches for steps ``start..stop-1``.

  A daemon thread gathers and transfers up to ``size`` batches ahead, so the
  host work overlaps device compute.
  """
  sharding = sharding_lib.batch_sharding(mesh)
  q: "queue.Queue" = queue.Queue(maxsize=size)
  stop_event = threading.Event()

  def produce():
    try:
      for step in range(start, stop):
        if stop_event.is_set():
          return
        q.put(sharding_lib.global_batch(batcher.batch(step), sharding))
      q.put(None)
    except BaseException as e:  # surfaced in the consumer thread.
      q.put(e)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is None:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop_event.set()
    while not q.empty():
      q.get_nowait()


def check_labels(labels: np.ndarray, num_classes: int, dataset: str) -> None:
  """Rejects class labels outside ``[0, num_classes)``, naming the value."""
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if bad.size:
    raise ValueError(f"label value {int(bad[0])} outside [0, data.num_classes="
                     f"{num_classes}) in data set {dataset!r} ({bad.size} "
                     "examples)")


@dataclasses.dataclass(frozen=True)
class TrainData:
  """What the trainer needs from the data: the batcher and the transform."""

  batcher: Batcher
  stats: Dict[str, Tuple[float, float]]
  image_shape: Tuple[int, ...]


def make_train_data(data_cfg: ml_collections.ConfigDict,
                    keys: Tuple[str, ...] = ("image", "label"),
                    split: Optional[str] = None) -> TrainData:
  """Reads the training split, computes normalisation and a Batcher."""
  raw = read_split(data_cfg, split or data_cfg.train_split)
  # Statistics from the whole split, so a subject subset shares the
  # intensity scale of every other run on the same data set.
  stats = normalization_stats(raw, data_cfg)
  fraction = data_cfg.get("subject_fraction", 1.0)
  if fraction < 1.0:
    rows = subject_subset(raw["subject_id"], fraction,
                          data_cfg.get("subject_seed", 0))
    raw = {k: v[rows] for k, v in raw.items()}
  arrays = to_model_arrays(raw, data_cfg, stats)
  arrays["image"] = append_mask_channels(arrays, data_cfg.get("mask_channels",
                                                              ()))
  unpaired = bool(data_cfg.get("unpaired", False))
  if unpaired:
    arrays["subject_id"] = np.asarray(raw["subject_id"])
  if data_cfg.batch_size % jax.device_count():
    raise ValueError(f"data.batch_size={data_cfg.batch_size} must be "
                     f"divisible by the {jax.device_count()} devices")
  batcher = Batcher(arrays, data_cfg.batch_size, data_cfg.shuffle_seed, keys,
                    jax.process_index(), jax.process_count(), unpaired)
  if "label" in arrays:
    check_labels(arrays["label"], data_cfg.num_classes, data_cfg.dataset)
  return TrainData(batcher, stats, arrays["image"].shape[1:])
