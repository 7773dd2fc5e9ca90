"""Evaluators, looked up by type name from ``config.evals``.

Every entry of the config's ``evals`` section is one evaluator::

  c.evals.generative = dict(type="generative", every_steps=500,
                            num_samples=256)
  c.evals.val_loss = dict(type="loss", every_steps=100)

``type`` picks a registered :class:`EvaluatorType` (:data:`TYPES`);
``every_steps`` > 0 runs it during training every that many steps and at the
final step (0: only with ``launch.py --mode=eval``); every other field is the
type's own and falls back to its default. An evaluator is built once from
``(config, name, fields, workdir, real data)`` (loading or training whatever
it needs, e.g. the in-domain encoder) and then maps a method and its state to
a :class:`Result`: flat scalar metrics for ``metrics.jsonl`` and TensorBoard,
details for the JSON record, and the card that says which extractor and
preprocessing produced the numbers.

Evaluators draw from their own fixed PRNG keys (``seed``), never from the
trainer's, so running them does not change training, and the numbers of
different steps are computed from the same noise.
"""

import dataclasses
import functools
import hashlib
import json
import os
import time
import types
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np
from absl import logging

from medgen_jax import jsonl
from medgen_jax import sampling
from medgen_jax.data import pipeline
from medgen_jax.eval import defaults
from medgen_jax.eval import features as feature_metrics
from medgen_jax.eval import inception
from medgen_jax.methods import base as methods
from medgen_jax.train import state as state_lib

Arrays = Dict[str, np.ndarray]
PyTree = Any
JSONL = "metrics.jsonl"
EVAL_DIR = "eval"


@dataclasses.dataclass(frozen=True)
class Result:
  """What one evaluation produced.

  Attributes:
    metrics: flat ``{name: float}``; written to ``metrics.jsonl`` and
      TensorBoard.
    details: JSON-ready extras (counts, audit summaries, closest pairs).
    card: which extractor, weights and preprocessing produced the numbers.
  """

  metrics: Dict[str, float]
  details: Dict[str, Any]
  card: Dict[str, Any]


# (method, state) -> Result.
EvalFn = Callable[[Any, PyTree], Result]


@dataclasses.dataclass(frozen=True)
class EvaluatorType:
  """A registered kind of evaluator.

  Attributes:
    factory: ``(config, name, fields, workdir, real) -> EvalFn``.
    defaults: the type's fields and their defaults (besides ``type`` and
      ``every_steps``); a dict value is a sub-section merged key by key.
    check: ``(config, name, fields) -> [error, ...]`` on resolved fields.
    doc: one line for listings.
  """

  factory: Callable[..., EvalFn]
  defaults: Mapping[str, Any]
  check: Callable[[ml_collections.ConfigDict, str, ml_collections.ConfigDict],
                  List[str]]
  doc: str


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """A built evaluator: ``evaluator(method, state) -> Result``."""

  name: str
  type: str
  every_steps: int
  fields: ml_collections.ConfigDict
  fn: EvalFn

  def due(self, step: int, final_step: int) -> bool:
    """Whether training runs it after ``step``."""
    return self.every_steps > 0 and (step % self.every_steps == 0 or
                                     step == final_step)

  def __call__(self, method, state: PyTree) -> Result:
    return self.fn(method, state)


# ----------------------------------------------------------- real data ----


@dataclasses.dataclass(frozen=True)
class RealData:
  """The real splits evaluators compare with, read once and shared.

  Images are normalised exactly like the generator's training data (the
  statistics of the whole training split); ``image`` holds the contrasts
  only, masks stay separate keys (``lesion_mask``, ...).
  """

  config: ml_collections.ConfigDict

  @functools.cached_property
  def _raw(self) -> Dict[str, Arrays]:
    d = self.config.data
    return {s: pipeline.read_split(d, s)
            for s in sorted({d.train_split, d.eval_split})}

  def raw(self, split: str) -> Arrays:
    if split in self._raw:
      return self._raw[split]
    return pipeline.read_split(self.config.data, split)

  @functools.cached_property
  def stats(self) -> Dict[str, Tuple[float, float]]:
    d = self.config.data
    return pipeline.normalization_stats(self.raw(d.train_split), d)

  def arrays(self, split: str) -> Arrays:
    """``image [N, *spatial, C]`` (contrasts), ``label``, masks."""
    return pipeline.to_model_arrays(self.raw(split), self.config.data,
                                    self.stats)

  @functools.cached_property
  def train(self) -> Arrays:
    """The whole training split (what the in-domain encoder learns)."""
    return self.arrays(self.config.data.train_split)

  @functools.cached_property
  def generator_train(self) -> Arrays:
    """The training images the generator saw (``data.subject_fraction``):
    the reference of the memorization audit."""
    d = self.config.data
    fraction = d.get("subject_fraction", 1.0)
    if fraction >= 1.0:
      return self.train
    rows = pipeline.subject_subset(self.raw(d.train_split)["subject_id"],
                                   fraction, d.get("subject_seed", 0))
    return {k: v[rows] for k, v in self.train.items()}

  @functools.cached_property
  def heldout(self) -> Arrays:
    """``data.eval_split``: the real distribution synthetic sets are scored
    against."""
    return self.arrays(self.config.data.eval_split)

  def model_inputs(self, split: str) -> Arrays:
    """``split`` as the method sees it in training (mask channels
    appended to ``image``)."""
    arrays = self.arrays(split)
    arrays["image"] = pipeline.append_mask_channels(
        arrays, self.config.data.get("mask_channels", ()))
    return arrays


# ------------------------------------------------------------ sampling ----


def sample_set(method, state: PyTree, config: ml_collections.ConfigDict,
               num: int, batch_size: int, rng: jax.Array,
               labels: Optional[np.ndarray] = None,
               mask_source: Optional[np.ndarray] = None) -> Arrays:
  """``num`` samples through :func:`medgen_jax.sampling.draw` (labels
  given for a conditional generator, none otherwise; a mask-conditioned
  generator draws for the masks of ``mask_source``, model inputs)."""
  cond = {} if labels is None else {"label": labels}
  if sampling.needs(method, "mask"):
    if mask_source is None:
      raise methods.CapabilityError(
          f"{type(method).__name__} needs real masks to sample")
    cond["mask"] = sampling.masks_for(mask_source, config.data, num)
  return sampling.draw(method, state, config.data, num, rng, batch_size,
                       cond or None, desc="eval samples")


def _conditional_labels(config, fields, real: RealData) -> Optional[np.ndarray]:
  if not sampling.conditional(config.data):
    return None
  heldout = real.heldout.get("label") if fields.labels == "heldout" else None
  return sampling.labels_for(fields.labels, fields.num_samples,
                             int(config.data.num_classes), heldout)


def _sampling_card(config, fields, num: int) -> Dict[str, Any]:
  s = config.sample
  labels = fields.labels if config.data.cond == "label" else "unconditional"
  sampler = {k: s[k] for k in ("sampler", "steps", "eta", "guidance_scale",
                                "guidance_per_class")
             if k in s}
  return dict(num=num, seed=fields.seed, labels=labels, sampler=sampler,
              params="EMA parameters when the method keeps them")


# ----------------------------------------------------------- generative ----


# Counts and settings of set_metrics that are not metrics.
_DETAIL_KEYS = ("pr_k", "num_real", "num_synthetic")


def split_scalars(raw: Mapping[str, Any], detail_keys: Sequence[str] = ()
                  ) -> Tuple[Dict[str, float], Dict[str, Any]]:
  """Flat scalar metrics (``kid: {mean, std}`` -> ``kid_mean``,
  ``kid_std``) and everything else (nested structures, ``detail_keys``)."""
  metrics, details = {}, {}

  def scalar(v):
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)

  for k, v in raw.items():
    if k in detail_keys:
      details[k] = v
    elif scalar(v):
      metrics[k] = float(v)
    elif isinstance(v, Mapping) and v and all(scalar(x) for x in v.values()):
      metrics.update({f"{k}_{n}": float(x) for n, x in v.items()})
    else:
      details[k] = v
  return metrics, details


def encoder_config(config: ml_collections.ConfigDict,
                   fields: ml_collections.ConfigDict
                   ) -> ml_collections.ConfigDict:
  """The resolved ``encoder`` sub-section (``num_classes`` filled in)."""
  enc = ml_collections.ConfigDict(fields.encoder.to_dict())
  if not enc.num_classes:
    enc.num_classes = int(config.data.num_classes)
  return enc


def _generative(config, name, fields, workdir, real: RealData) -> EvalFn:
  """In-domain FID, KID, precision/recall, density/coverage, MS-SSIM
  diversity, label agreement and the memorization audit."""
  # Imported here: the encoder pulls in the supervised trainer, which
  # config validation (this module's other user) does not need.
  from medgen_jax.eval import encoder as encoder_lib  # pylint: disable=import-outside-toplevel
  from medgen_jax.eval import generative  # pylint: disable=import-outside-toplevel
  d = config.data
  directory = fields.encoder_dir or os.path.join(workdir, "encoder")
  enc = encoder_lib.train_or_load(
      encoder_config(config, fields), d.contrasts, d.spatial_dims,
      real.train, real.heldout, directory,
      extra_card=dict(dataset=d.dataset, train_split=d.train_split,
                      normalization=d.normalization,
                      stats={k: list(v) for k, v in real.stats.items()}))
  labels = _conditional_labels(config, fields, real)
  card = dict(
      extractor="in-domain encoder", encoder_dir=os.path.abspath(directory),
      encoder=enc.card,
      preprocessing=(f"contrasts {'+'.join(d.contrasts)} normalised with the "
                     f"training split's {d.normalization} statistics; mask "
                     "channels split off; no resizing"),
      real=dict(dataset=d.dataset, split=d.eval_split,
                num=int(len(real.heldout["image"]))),
      memorization_reference=dict(
          split=d.train_split, num=int(len(real.generator_train["image"]))),
      synthetic=_sampling_card(config, fields, fields.num_samples))
  batch_size = fields.batch_size or config.sample.batch_size

  def run(method, state) -> Result:
    t0 = time.perf_counter()
    fake = sample_set(method, state, config, fields.num_samples, batch_size,
                      jax.random.key(fields.seed), labels,
                      real.model_inputs(d.eval_split)["image"])
    seconds = time.perf_counter() - t0
    raw = generative.set_metrics(enc, real.generator_train, real.heldout,
                                 fake, fields, seed=fields.seed,
                                 audit=fields.audit)
    if raw["mode_collapse"] > generative.COLLAPSE_WARNING:
      logging.warning(
          "possible mode collapse: synthetic pairs have MS-SSIM %.3f "
          "against %.3f for real pairs (collapse score %.2f > %.2f); look "
          "at the sample grid", raw["ms_ssim"], raw["ms_ssim_real"],
          raw["mode_collapse"], generative.COLLAPSE_WARNING)
    metrics, details = split_scalars(raw, _DETAIL_KEYS)
    # Wall time of drawing the set (compilation included on a first call).
    metrics["sampling_seconds"] = seconds
    return Result(metrics, details, card)

  return run


def _sampling_errors(prefix: str, f) -> List[str]:
  errors = []
  _min_int(errors, f"{prefix}.num_samples", f.num_samples, 2)
  _min_int(errors, f"{prefix}.batch_size", f.batch_size, 0)
  _min_int(errors, f"{prefix}.seed", f.seed, 0)
  if f.labels not in ("balanced", "heldout"):
    errors.append(f"{prefix}.labels={f.labels!r} must be one of "
                  "('balanced', 'heldout')")
  return errors


def _generative_errors(config, prefix: str, f) -> List[str]:
  errors = _sampling_errors(prefix, f)
  for k, lo in (("kid_subsets", 1), ("kid_subset_size", 2), ("pr_k", 1),
                ("diversity_pairs", 1)):
    _min_int(errors, f"{prefix}.{k}", f[k], lo)
  q = f.memorization_quantile
  if not (isinstance(q, (int, float)) and 0.0 < q < 1.0):
    errors.append(f"{prefix}.memorization_quantile={q!r} must be in (0, 1)")
  e = f.encoder
  for k in ("width", "num_groups", "steps", "steps_per_call", "batch_size"):
    _min_int(errors, f"{prefix}.encoder.{k}", e[k], 1)
  if (isinstance(e.steps, int) and isinstance(e.steps_per_call, int) and
      e.steps_per_call > 0 and e.steps % e.steps_per_call):
    errors.append(f"{prefix}.encoder.steps={e.steps} must be a multiple of "
                  f"steps_per_call={e.steps_per_call}")
  return errors


# -------------------------------------------------------- inception_fid ----


def _file_digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def inception_channels(contrasts: Sequence[str], contrast: str
                       ) -> Tuple[int, ...]:
  """Image channels fed to Inception (which takes 1 or 3)."""
  if contrast:
    return (list(contrasts).index(contrast),)
  if len(contrasts) not in (1, 3):
    raise ValueError(f"Inception takes 1 or 3 channels; data.contrasts "
                     f"{tuple(contrasts)} has {len(contrasts)}: set contrast")
  return tuple(range(len(contrasts)))


def joint_span(real: np.ndarray, fake: np.ndarray
               ) -> Tuple[np.ndarray, np.ndarray]:
  """``real [N, D]`` and ``fake [M, D]`` in an orthonormal basis ``[D, r]``
  (``r = N + M + 1``) of a space holding both centred sets and the
  difference of their means.

  FID is unchanged by this change of coordinates: the mean difference lies
  in the space and both covariances vanish outside it, so the traces and the
  eigenvalues of ``S1 S2`` are kept. With few images and 2048-d Inception
  features (``r < D``), FID then needs ``r x r`` instead of ``D x D``
  eigendecompositions (seconds per evaluation on a CPU).
  """
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  mr, mf = real.mean(axis=0), fake.mean(axis=0)
  rows = np.concatenate([real - mr, fake - mf, (mr - mf)[None]])
  basis, _ = np.linalg.qr(rows.T)
  return real @ basis, fake @ basis


def _fid(real: np.ndarray, fake: np.ndarray) -> float:
  if len(real) + len(fake) + 1 < real.shape[1]:
    real, fake = joint_span(real, fake)
  return feature_metrics.fid_from_features(real, fake)


def _inception_fid(config, name, fields, workdir, real: RealData) -> EvalFn:
  """FID and KID on Inception-V3 pool3 features (literature comparability)."""
  del workdir
  d = config.data
  variables = inception.load_variables(fields.weights)
  channels = list(inception_channels(d.contrasts, fields.contrast))
  input_range = tuple(float(v) for v in fields.input_range)

  def extract(images):
    return inception.extract_features(
        variables, np.asarray(images)[..., channels],
        fields.feature_batch_size, input_range)

  # Real features never change: computed once, at build time.
  f_real = extract(real.heldout["image"])
  labels = _conditional_labels(config, fields, real)
  card = dict(
      extractor="FID Inception-V3 pool3 (pytorch-fid port of TensorFlow's "
                "2015-12-05 graph), 2048-d",
      weights=os.path.abspath(fields.weights),
      weights_sha256=_file_digest(fields.weights),
      preprocessing=dict(
          channels=[d.contrasts[c] for c in channels],
          input_range=list(input_range),
          steps=["clip to input_range, map to [0, 1]",
                 "repeat one channel to RGB",
                 "bilinear resize to 299x299 without antialiasing",
                 "scale to [-1, 1]"],
          quantized=False),
      real=dict(dataset=d.dataset, split=d.eval_split, num=int(len(f_real))),
      synthetic=_sampling_card(config, fields, fields.num_samples))
  batch_size = fields.batch_size or config.sample.batch_size

  def run(method, state) -> Result:
    key = jax.random.key(fields.seed)
    fake = sample_set(method, state, config, fields.num_samples, batch_size,
                      key, labels, real.model_inputs(d.eval_split)["image"])
    f_fake = extract(fake["image"])
    kid_mean, kid_std = feature_metrics.kid_from_features(
        f_real, f_fake, fields.kid_subsets, fields.kid_subset_size,
        rng=jax.random.fold_in(key, 1 << 20))
    metrics = dict(fid=_fid(f_real, f_fake),
                   kid_mean=kid_mean, kid_std=kid_std)
    return Result(metrics, dict(num_real=int(len(f_real)),
                                num_synthetic=int(len(f_fake))), card)

  return run


def _inception_errors(config, prefix: str, f) -> List[str]:
  errors = _sampling_errors(prefix, f)
  for k, lo in (("feature_batch_size", 1), ("kid_subsets", 1),
                ("kid_subset_size", 2)):
    _min_int(errors, f"{prefix}.{k}", f[k], lo)
  if not f.weights:
    errors.append(f"{prefix}.weights is empty: give the Inception weights "
                  ".npz (converted with experiments/tools/"
                  "convert_inception_weights.py)")
  elif not os.path.isfile(f.weights):
    errors.append(f"{prefix}.weights: Inception weights file {f.weights} "
                  "not found")
  if f.contrast and f.contrast not in config.data.contrasts:
    errors.append(f"{prefix}.contrast={f.contrast!r} is not in data.contrasts "
                  f"{tuple(config.data.contrasts)}")
  elif not f.contrast and len(config.data.contrasts) not in (1, 3):
    errors.append(f"{prefix}.contrast is empty but data.contrasts "
                  f"{tuple(config.data.contrasts)} are not 1 or 3 channels; "
                  "name the contrast Inception should see")
  r = tuple(f.input_range)
  if len(r) != 2 or not r[0] < r[1]:
    errors.append(f"{prefix}.input_range={r!r} must be (low, high) with "
                  "low < high")
  return errors


# ----------------------------------------------------------------- loss ----





@functools.lru_cache(maxsize=8)
def _jitted_loss(method) -> Callable:
  loss = getattr(method, "loss", None)
  if loss is None:
    raise ValueError(f"{type(method).__name__} has no loss(state, batch, "
                     "rng): the 'loss' evaluator cannot score it")
  return jax.jit(loss)


def _loss(config, name, fields, workdir, real: RealData) -> EvalFn:
  """The method's training objective on a held-out split: fixed batches,
  fixed keys (diffusion times and noise), so steps are comparable."""
  del name, workdir
  split = fields.split or config.data.eval_split
  arrays = real.model_inputs(split)
  batch_size = fields.batch_size or config.data.batch_size
  batcher = pipeline.Batcher(arrays, batch_size, fields.seed)
  batches = [batcher.batch(i) for i in range(fields.num_batches)]
  keys = [jax.random.fold_in(jax.random.key(fields.seed), i)
          for i in range(fields.num_batches)]
  card = dict(objective=f"{config.method.name} training loss (dropout off)",
              params=fields.params, split=split,
              num_examples=int(len(arrays["image"])),
              batches=fields.num_batches, batch_size=batch_size,
              seed=fields.seed)

  def run(method, state) -> Result:
    fn = _jitted_loss(method)
    state = state_lib.with_eval_params(state, fields.params)
    losses = np.asarray([float(fn(state, b, k))
                         for b, k in zip(batches, keys)])
    return Result(dict(loss=float(losses.mean()),
                       loss_std=float(losses.std())),
                  dict(batch_losses=losses.tolist()), card)

  return run


def _loss_errors(config, prefix: str, f) -> List[str]:
  del config
  errors: List[str] = []
  _min_int(errors, f"{prefix}.num_batches", f.num_batches, 1)
  _min_int(errors, f"{prefix}.batch_size", f.batch_size, 0)
  _min_int(errors, f"{prefix}.seed", f.seed, 0)
  if f.params not in ("ema", "raw"):
    errors.append(f"{prefix}.params={f.params!r} must be one of "
                  "('ema', 'raw')")
  if not isinstance(f.split, str):
    errors.append(f"{prefix}.split={f.split!r} must be a split name")
  return errors


# ------------------------------------------------------- reconstruction ----


def _heldout_rows(num_available: int, fields) -> np.ndarray:
  """The sorted rows a held-out evaluator scores: ``fields.num_examples``
  (0: all) drawn with ``fields.seed``."""
  n = min(num_available, fields.num_examples or num_available)
  return np.sort(np.random.default_rng(fields.seed).permutation(
      num_available)[:n])


def _ssim_window(spatial) -> int:
  """The largest odd SSIM window (<= 11) images of side ``spatial`` hold."""
  win = min(11, min(spatial))
  return win - (1 - win % 2)


def _reconstruction(config, name, fields, workdir, real: RealData) -> EvalFn:
  """PSNR, SSIM and MAE of the method's reconstructions of held-out
  images (contrasts in [-1, 1], data range 2), and the Dice of the
  reconstructed masks when the method also models ``data.mask_channels``."""
  del name, workdir
  from medgen_jax.eval import image as image_metrics  # pylint: disable=import-outside-toplevel
  from medgen_jax.eval import segmentation  # pylint: disable=import-outside-toplevel
  d = config.data
  split = fields.split or d.eval_split
  arrays = real.model_inputs(split)
  rows = _heldout_rows(len(arrays["image"]), fields)
  n = len(rows)
  batch = {k: v[rows] for k, v in arrays.items()}
  target = sampling.split_outputs(batch["image"], d)
  batch_size = fields.batch_size or d.batch_size
  win = _ssim_window(target["image"].shape[1:-1])
  card = dict(split=split, num_examples=int(n), seed=fields.seed,
              data_range=2.0, ssim_window=int(win),
              params="EMA parameters when the method keeps them",
              mask_threshold="reconstructed mask channel > 0",
              mask_dice="mean over examples with foreground in either mask")

  def run(method, state) -> Result:
    out = sampling.reconstruct(method, state, d, batch,
                               jax.random.key(fields.seed), batch_size)
    x, y = target["image"], out["image"]
    metrics = dict(psnr=float(np.mean(image_metrics.psnr(x, y, 2.0))),
                   ssim=float(np.mean(image_metrics.ssim(x, y, 2.0, win))),
                   mae=float(np.mean(image_metrics.mae(x, y))))
    if methods.has(method, "encode"):
      metrics.update(_latent_stats(method, state, batch, batch_size,
                                   jax.random.key(fields.seed)))
    for k in d.get("mask_channels", ()):
      # Over the examples with foreground in either mask (NaN when none).
      dice = segmentation.dice(out[k] > 0, target[k] > 0, labels=(1,))
      metrics[f"{k}_dice"] = (float(np.nanmean(dice))
                              if np.isfinite(dice).any() else float("nan"))
    return Result(metrics, dict(num_examples=int(n)), card)

  return run


def _latent_stats(method, state, batch: Arrays, batch_size: int,
                  rng: jax.Array) -> Dict[str, float]:
  """Mean and standard deviation of continuous latents, and the scale
  factor 1 / std that latent diffusion multiplies them by (Rombach et al.
  2022); nothing for discrete codes."""
  z = sampling.encode(method, state, batch, rng, batch_size)
  if not np.issubdtype(z.dtype, np.floating):
    return {}
  std = float(np.std(z))
  return dict(latent_mean=float(np.mean(z)), latent_std=std,
              latent_scale_factor=1.0 / max(std, 1e-12))


def _reconstruction_errors(config, prefix: str, f) -> List[str]:
  del config
  errors: List[str] = []
  for k in ("num_examples", "batch_size", "seed"):
    _min_int(errors, f"{prefix}.{k}", f[k], 0)
  if not isinstance(f.split, str):
    errors.append(f"{prefix}.split={f.split!r} must be a split name")
  return errors


# ---------------------------------------------------------- translation ----


def _translation(config, name, fields, workdir, real: RealData) -> EvalFn:
  """SSIM, PSNR and MAE of a translator's output against the real target
  contrasts of held-out images (``config.translation``: source and target
  contrast names; [-1, 1] intensities, data range 2), per target contrast
  and averaged."""
  del name, workdir
  from medgen_jax.eval import image as image_metrics  # pylint: disable=import-outside-toplevel
  d, t = config.data, config.translation
  contrasts = list(d.contrasts)
  src_idx = [contrasts.index(c) for c in t.source]
  tgt_idx = [contrasts.index(c) for c in t.target]
  split = fields.split or d.eval_split
  image = real.arrays(split)["image"]
  rows = _heldout_rows(len(image), fields)
  n = len(rows)
  source, target = image[rows][..., src_idx], image[rows][..., tgt_idx]
  batch_size = fields.batch_size or d.batch_size
  win = _ssim_window(image.shape[1:-1])
  card = dict(split=split, num_examples=int(n), seed=fields.seed,
              source=list(t.source), target=list(t.target), data_range=2.0,
              ssim_window=int(win),
              params="EMA parameters when the method keeps them")

  def run(method, state) -> Result:
    pred = sampling.translate(method, state, source,
                              jax.random.key(fields.seed), batch_size)
    metrics: Dict[str, float] = {}
    for j, c in enumerate(t.target):
      x, y = target[..., j:j + 1], pred[..., j:j + 1]
      metrics[f"{c}_ssim"] = float(np.mean(image_metrics.ssim(x, y, 2.0,
                                                              win)))
      metrics[f"{c}_psnr"] = float(np.mean(image_metrics.psnr(x, y, 2.0)))
      metrics[f"{c}_mae"] = float(np.mean(image_metrics.mae(x, y)))
    for k in ("ssim", "psnr", "mae"):
      metrics[k] = float(np.mean([metrics[f"{c}_{k}"] for c in t.target]))
    return Result(metrics, dict(num_examples=int(n)), card)

  return run


def _translation_errors(config, prefix: str, f) -> List[str]:
  errors = _reconstruction_errors(config, prefix, f)
  t = config.get("translation")
  if t is None or not t.get("source") or not t.get("target"):
    errors.append(f"{prefix}: a translation evaluator needs the config's "
                  "translation section (source=..., target=...)")
  return errors


# ------------------------------------------------------------- registry ----


# ------------------------------------------------------- mask fidelity ----




def _mask_fidelity(config, name, fields, workdir, real: RealData) -> EvalFn:
  """Whether a mask-conditioned generator puts its lesions under the
  masks it was given: images are drawn for the real masks of held-out
  examples and a lesion segmenter trained on the real training images
  segments them; ``dice`` is its pooled Dice against the given masks,
  ``dice_real`` the same segmenter on the real held-out images (the
  ceiling)."""
  del workdir
  from medgen_jax.eval import tasks as tasks_lib  # pylint: disable=import-outside-toplevel
  from medgen_jax.train import supervised  # pylint: disable=import-outside-toplevel
  d = config.data
  key = d.mask_channels[0]
  split = fields.split or d.eval_split
  heldout = real.model_inputs(split)
  rows = _heldout_rows(len(heldout["image"]), fields)
  given = {k: v[rows] for k, v in heldout.items()}
  sc = fields.segmenter
  seg_cfg = ml_collections.ConfigDict(dict(
      kind="segmentation", inputs=tuple(d.contrasts), target=key,
      num_classes=2, model=dict(ch=sc.ch, ch_mult=tuple(sc.ch_mult),
                                num_groups=sc.num_groups),
      conv_lowering=sc.conv_lowering, steps=sc.steps,
      steps_per_call=sc.steps_per_call, batch_size=sc.batch_size,
      optim=sc.optim.to_dict()))
  task = tasks_lib.make_task("mask_fidelity_segmenter", seg_cfg,
                             list(d.contrasts), d.spatial_dims)
  fitter = supervised.make_fitter(task, seg_cfg)
  train = real.generator_train
  states = supervised.fit(
      fitter, supervised.seed_keys(sc.seed, 1),
      [{"image": train["image"], key: train[key]}],
      {"image": train["image"][:1]}, desc="lesion segmenter",
      lr_key=f"evals.{name}.segmenter.optim.lr").states
  params = states[0].params
  real_scores = task.score(supervised.predict_all(
      fitter, params, task.x(given)), given)
  batch_size = fields.batch_size or config.sample.batch_size
  card = dict(split=split, num_examples=int(len(rows)), seed=fields.seed,
              segmenter=dict(arch="U-Net", trained_on=d.train_split,
                             **{k: sc[k] for k in ("ch", "ch_mult", "steps")}),
              dice="pooled over all examples' voxels",
              masks="the real mask channels of the held-out examples")

  def run(method, state) -> Result:
    if not sampling.needs(method, "mask"):
      raise methods.CapabilityError(
          f"the mask_fidelity evaluator needs a mask-conditioned generator; "
          f"{type(method).__name__} draws its own masks")
    masks = given["image"][..., len(d.contrasts):]
    cond = {"mask": masks}
    if sampling.conditional(d):
      cond["label"] = given["label"]
    fake = sampling.draw(method, state, d, len(rows),
                         jax.random.key(fields.seed), batch_size, cond)
    pred = supervised.predict_all(fitter, params, task.x(fake))
    scores = task.score(pred, {key: given[key]})
    return Result(dict(dice=scores["dice"], dice_real=real_scores["dice"],
                       dice_per_image=scores["dice_per_image"]),
                  dict(real_scores=real_scores), card)

  return run


def _mask_fidelity_errors(config, prefix: str, f) -> List[str]:
  errors: List[str] = []
  if not config.data.get("mask_channels"):
    errors.append(f"{prefix}: needs data.mask_channels (the masks a "
                  "mask-conditioned generator draws for)")
  for k in ("num_examples", "batch_size", "seed"):
    _min_int(errors, f"{prefix}.{k}", f[k], 0)
  sc = f.segmenter
  if isinstance(sc.steps, int) and isinstance(sc.steps_per_call, int) and (
      sc.steps_per_call < 1 or sc.steps % sc.steps_per_call):
    errors.append(f"{prefix}.segmenter.steps={sc.steps} must be a multiple "
                  f"of steps_per_call={sc.steps_per_call}")
  return errors


TYPES: Mapping[str, EvaluatorType] = types.MappingProxyType({
    "generative": EvaluatorType(
        _generative, defaults.GENERATIVE_DEFAULTS, _generative_errors,
        "in-domain FID/KID, precision/recall, density/coverage, MS-SSIM "
        "diversity, memorization audit"),
    "inception_fid": EvaluatorType(
        _inception_fid, defaults.INCEPTION_DEFAULTS, _inception_errors,
        "FID/KID on Inception-V3 features from a user-supplied weights file"),
    "loss": EvaluatorType(
        _loss, defaults.LOSS_DEFAULTS, _loss_errors,
        "the method's loss on a held-out split (validation loss)"),
    "translation": EvaluatorType(
        _translation, defaults.TRANSLATION_DEFAULTS, _translation_errors,
        "SSIM/PSNR/MAE of a translator's output against the real target "
        "contrasts of held-out images"),
    "reconstruction": EvaluatorType(
        _reconstruction, defaults.RECONSTRUCTION_DEFAULTS, _reconstruction_errors,
        "PSNR/SSIM/MAE (and mask Dice) of an autoencoder's reconstructions "
        "of held-out images"),
    "mask_fidelity": EvaluatorType(
        _mask_fidelity, defaults.MASK_FIDELITY_DEFAULTS, _mask_fidelity_errors,
        "Dice of a real-data lesion segmenter on images a mask-conditioned "
        "generator drew for held-out masks"),
})
DEFAULT_EVALS = {"generative": {"type": "generative"}}


def available() -> Tuple[str, ...]:
  return tuple(sorted(TYPES))


def lookup(type_name: str) -> EvaluatorType:
  """The registered type, or an error listing the registered ones."""
  if type_name not in TYPES:
    raise ValueError(f"unknown evaluator type {type_name!r}; registered: "
                     f"{available()}")
  return TYPES[type_name]


def _min_int(errors: List[str], key: str, value: Any, lo: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < lo:
    errors.append(f"{key}={value!r} must be an integer >= {lo}")


def _as_dict(entry: Any) -> Dict[str, Any]:
  if isinstance(entry, ml_collections.ConfigDict):
    return entry.to_dict()
  return dict(entry)


def _merge(prefix: str, known: Mapping[str, Any], given: Mapping[str, Any],
           errors: List[str]) -> Dict[str, Any]:
  out = {}
  for k, v in given.items():
    if k not in known:
      errors.append(f"{prefix}.{k}: unknown field; known: "
                    f"{sorted(known)}")
  for k, default in known.items():
    v = given.get(k, default)
    if isinstance(default, Mapping):
      if not isinstance(v, Mapping):
        errors.append(f"{prefix}.{k} must be a section (dict), got {v!r}")
        v = {}
      v = _merge(f"{prefix}.{k}", default, v, errors)
    out[k] = v
  return out


def _resolve(name: str, entry: Any, errors: List[str]
             ) -> Optional[Tuple[str, int, ml_collections.ConfigDict]]:
  """``(type, every_steps, fields)`` of ``evals.<name>``; problems go to
  ``errors`` (``None`` when the entry cannot be read at all)."""
  prefix = f"evals.{name}"
  if not isinstance(entry, (Mapping, ml_collections.ConfigDict)):
    errors.append(f"{prefix} must be a dict(type=..., every_steps=...), got "
                  f"{entry!r}")
    return None
  given = _as_dict(entry)
  if "type" not in given:
    errors.append(f"{prefix}.type is missing; registered types: "
                  f"{available()}")
    return None
  type_name = given.pop("type")
  if type_name not in TYPES:
    errors.append(f"{prefix}.type={type_name!r} is not a registered "
                  f"evaluator type; registered: {available()}")
    return None
  every = given.pop("every_steps", 0)
  _min_int(errors, f"{prefix}.every_steps", every, 0)
  fields = _merge(prefix, TYPES[type_name].defaults, given, errors)
  return type_name, every, ml_collections.ConfigDict(fields)


def entries(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """``config.evals``, or one default ``generative`` evaluator when it is
  missing or empty."""
  evals = config.get("evals")
  if not evals:
    return dict(DEFAULT_EVALS)
  return {k: evals[k] for k in evals}


def config_errors(config: ml_collections.ConfigDict) -> List[str]:
  """Problems of ``config.evals`` (empty when there is none), each naming
  the field."""
  errors: List[str] = []
  evals = config.get("evals")
  if evals is None:
    return errors
  if not isinstance(evals, (Mapping, ml_collections.ConfigDict)):
    return [f"evals must be a section of named evaluators, got {evals!r}"]
  for name in evals:
    resolved = _resolve(name, evals[name], errors)
    if resolved is not None:
      type_name, _, fields = resolved
      errors += TYPES[type_name].check(config, f"evals.{name}", fields)
  return errors


def build(config: ml_collections.ConfigDict, name: str, entry: Any,
          workdir: str, real: Optional[RealData] = None) -> Evaluator:
  """Builds ``evals.<name>`` (loads or trains what it needs)."""
  errors: List[str] = []
  resolved = _resolve(name, entry, errors)
  if resolved is not None:
    errors += TYPES[resolved[0]].check(config, f"evals.{name}", resolved[2])
  if errors:
    raise ValueError("invalid evaluator config:\n  - " + "\n  - ".join(errors))
  type_name, every, fields = resolved
  fn = TYPES[type_name].factory(config, name, fields, workdir,
                                real or RealData(config))
  return Evaluator(name, type_name, every, fields, fn)


def build_all(config: ml_collections.ConfigDict, workdir: str,
              periodic_only: bool = False) -> List[Evaluator]:
  """Every evaluator of the config, sharing one read of the real data.

  Args:
    periodic_only: only those with ``every_steps > 0`` (what training runs;
      no default evaluator is added).
  """
  if periodic_only:
    evals = config.get("evals") or {}
    chosen = {k: evals[k] for k in evals
              if _as_dict(evals[k]).get("every_steps", 0) > 0}
  else:
    chosen = entries(config)
  real = RealData(config)
  return [build(config, k, v, workdir, real) for k, v in chosen.items()]


# -------------------------------------------------------------- writing ----


def _json_default(x):
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  return str(x)


def _replace_jsonl(path: str, record: Dict[str, Any]) -> None:
  """Appends ``record``, dropping an older line of the same step and split
  (an evaluation repeated at one checkpoint replaces the old numbers)."""
  key = (record["step"], record["split"])
  jsonl.rewrite(path, lambda old: (old.get("step"), old.get("split")) != key,
                append=record)


def record_path(workdir: str, name: str, step: int) -> str:
  return os.path.join(workdir, EVAL_DIR, f"{name}_step_{step}.json")


def write_result(workdir: str, evaluator: Evaluator, step: int,
                 result: Result, writer=None, seconds: float = 0.0) -> str:
  """Writes one result: a ``metrics.jsonl`` line ``{"step", "split":
  "eval/<name>", ...metrics}``, TensorBoard scalars ``eval/<name>/<metric>``
  and ``eval/<name>_step_<step>.json`` (metrics, details, card, fields).

  Returns:
    The JSON record's path.
  """
  name = evaluator.name
  path = record_path(workdir, name, step)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    jsonl.write_json(path, dict(
        name=name, type=evaluator.type, step=step, metrics=result.metrics,
        details=result.details, card=result.card,
        fields=evaluator.fields.to_dict(), seconds=seconds,
        time=time.strftime("%Y-%m-%dT%H:%M:%S")), default=_json_default)
    _replace_jsonl(os.path.join(workdir, JSONL),
                   {"step": step, "split": f"eval/{name}", **result.metrics})
  if writer is not None:
    writer.write_scalars(step, {f"eval/{name}/{k}": v
                                for k, v in result.metrics.items()})
  return path


def evaluate_and_write(evaluators: Sequence[Evaluator], method,
                       state: PyTree, step: int, workdir: str,
                       writer=None) -> Dict[str, Result]:
  """Runs each evaluator on ``state`` and writes its result (see
  :func:`write_result`)."""
  out = {}
  for ev in evaluators:
    t0 = time.time()
    result = ev(method, state)
    write_result(workdir, ev, step, result, writer, time.time() - t0)
    out[ev.name] = result
  if writer is not None:
    writer.flush()
  return out
