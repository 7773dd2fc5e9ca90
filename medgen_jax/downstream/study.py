"""The augmentation study: generators -> synthetic sets -> downstream arms.

Every stage writes its result into the workdir before the next starts and
is skipped when a rerun finds it complete, so a killed study resumes where
it stopped:

  generators/<name>/     trainer workdir (orbax checkpoints, metrics, grids)
  synthetic/<name>/      exported synthetic set + provenance.json
  encoder/               in-domain feature extractor + encoder.json
  generator_metrics.json realism / diversity / memorization per generator
  results.jsonl          one line per (task, fraction, arm): seed scores
  report.md, report.html the report (see :mod:`medgen_jax.report`)
"""

import copy
import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from scipy import stats as scipy_stats

from medgen_jax import commands
from medgen_jax import jsonl
from medgen_jax import runtime
from medgen_jax import sampling
from medgen_jax.data import augment as augment_lib
from medgen_jax.data import builder_lib
from medgen_jax.data import pipeline
from medgen_jax.downstream import fit as fit_lib
from medgen_jax.downstream import synthetic as synthetic_lib
from medgen_jax.eval import encoder as encoder_lib
from medgen_jax.eval import generative
from medgen_jax.eval import metric_validation
from medgen_jax.eval import tasks as tasks_lib
from medgen_jax.train import trainer

Arrays = Dict[str, np.ndarray]
RESULTS = "results.jsonl"
GEN_METRICS = "generator_metrics.json"
METRIC_VALIDATION = "metric_validation.json"
CLASSICAL_STRENGTH = "classical_strength.json"
ARM_KINDS = ("real", "real+classical", "real+synthetic",
             "real+classical+synthetic", "synthetic")


@dataclasses.dataclass(frozen=True)
class ArmSpec:
  """One arm of the study.

  Attributes:
    name: label in tables, e.g. ``real+classical+ddpm``.
    kind: one of :data:`ARM_KINDS`.
    generator: generator name for synthetic arms, else ``None``.
  """

  name: str
  kind: str
  generator: Optional[str]

  @property
  def classical(self) -> bool:
    return "classical" in self.kind

  def synthetic_fraction(self, ratio: float) -> float:
    if self.kind == "synthetic":
      return 1.0
    return ratio if self.kind.endswith("synthetic") else 0.0


def arm_specs(kinds: Sequence[str], generators: Sequence[str]) -> List[ArmSpec]:
  """Expands synthetic arm kinds once per generator."""
  out = []
  for kind in kinds:
    if kind not in ARM_KINDS:
      raise ValueError(f"study.arms entry {kind!r} must be one of {ARM_KINDS}")
    if "synthetic" not in kind:
      out.append(ArmSpec(kind, kind, None))
      continue
    for g in generators:
      name = f"{g} only" if kind == "synthetic" else kind.replace(
          "synthetic", g)
      out.append(ArmSpec(name, kind, g))
  return out


# ---------------------------------------------------------------- data ----


def load_real(data_cfg: ml_collections.ConfigDict, splits: Sequence[str]
              ) -> Tuple[Dict[str, Arrays], Dict[str, Tuple[float, float]]]:
  """Normalised real splits (stats from the training split) and the stats.

  Each split holds ``image [N, *spatial, C]``, ``label``, masks and
  ``subject_id``.
  """
  raw = {s: pipeline.read_split(data_cfg, s) for s in splits}
  stats = pipeline.normalization_stats(raw[data_cfg.train_split], data_cfg)
  out = {}
  for s, r in raw.items():
    arrays = pipeline.to_model_arrays(r, data_cfg, stats)
    arrays["subject_id"] = r["subject_id"].astype(np.int32)
    pipeline.check_labels(arrays["label"], data_cfg.num_classes,
                          data_cfg.dataset)
    out[s] = arrays
  return out, stats


# Keys of a generator's data section that the study's data section does not
# override.
GENERATOR_DATA_KEYS = ("cond", "mask_channels", "batch_size")
# Task fields resolved from the data set (see resolve_for_data).
AUTO = "auto"


def mask_key(config: ml_collections.ConfigDict) -> str:
  """The data set's mask key the study uses (``study.mask_key``, set by
  :func:`resolve_for_data`)."""
  return config.study.get("mask_key") or "lesion_mask"


def with_auto_contrasts(config: ml_collections.ConfigDict
                        ) -> ml_collections.ConfigDict:
  """``config`` with the ``"auto"`` contrasts of its tasks chosen from
  ``data.contrasts``: the lesion-visible FLAIR if present (else every
  contrast) as classification and segmentation input, the first contrast
  translated to the second."""
  c = ml_collections.ConfigDict(config.to_dict())
  contrasts = list(c.data.contrasts)
  for t in c.study.tasks.values():
    if t.kind == "translation":
      if tuple(t.inputs) == (AUTO,):
        t.inputs = tuple(contrasts[:1])
      if t.target == AUTO and len(contrasts) >= 2:
        t.target = contrasts[1] if t.inputs[0] == contrasts[0] else (
            contrasts[0])
    elif tuple(t.inputs) == (AUTO,):
      t.inputs = ("flair",) if "flair" in contrasts else tuple(contrasts)
  return c


def resolve_for_data(config: ml_collections.ConfigDict, train: Arrays
                     ) -> Tuple[ml_collections.ConfigDict, List[str]]:
  """The study for this data set: tasks it cannot support are dropped
  (a label with 2+ classes for classification, a mask for segmentation,
  2+ contrasts for translation), ``"auto"`` task inputs and targets are
  filled in (the lesion-visible FLAIR if present, else every contrast;
  the data's mask; the first contrast translated to the second), and the
  mask key of tasks and generators is the data's. Returns the config and
  one note per change.

  Raises:
    ConfigError: when no task is left.
  """
  c = ml_collections.ConfigDict(config.to_dict())
  contrasts = list(c.data.contrasts)
  mask = next((k for k in pipeline.MASK_KEYS if k in train), None)
  classes = len(np.unique(train["label"])) if "label" in train else 0
  needs = {"classification": (classes >= 2, "a label with two or more "
                              "classes"),
           "segmentation": (mask is not None, "a mask"),
           "translation": (len(contrasts) >= 2, "two or more contrasts")}
  notes = []
  for name in list(c.study.tasks):
    t = c.study.tasks[name]
    ok, what = needs[t.kind]
    if not ok:
      notes.append(f"task {name} dropped: the data set has no {what}")
      del c.study.tasks[name]
      continue
    if t.kind == "translation" and mask is None and t.get(
        "segmenter_steps"):
      t.segmenter_steps = 0
      notes.append(f"task {name}: no lesion Dice of translated images "
                   "(the data set has no mask)")
    if t.kind == "segmentation" and t.target == AUTO:
      t.target = mask
  c = with_auto_contrasts(c)
  if not c.study.tasks:
    from medgen_jax import config_check  # pylint: disable=import-outside-toplevel
    raise config_check.ConfigError(
        "no study task fits this data set: " + "; ".join(notes) +
        "; give it labels, masks or a second contrast")
  c.study.mask_key = mask or ""
  for gen in c.generators.values():
    # A latent model's stage 1 codes the same channels as the model.
    for section in (gen, gen.get("stage1")):
      if section is not None and section.data.get("mask_channels"):
        section.data.mask_channels = (mask,) if mask else ()
  return c, notes


def generator_config(study_cfg: ml_collections.ConfigDict, name: str,
                     fraction: Optional[float]) -> ml_collections.ConfigDict:
  """The generator's config; ``fraction`` restricts its training subjects."""
  gen = copy.deepcopy(study_cfg.generators[name])
  _use_study_data(gen, study_cfg.data, fraction)
  if gen.get("stage1") is not None:
    # A latent model's stage 1 is part of the generator: the same data,
    # the same subjects.
    _use_study_data(gen.stage1, study_cfg.data, fraction)
  return gen


def _use_study_data(run: ml_collections.ConfigDict,
                    data: ml_collections.ConfigDict,
                    fraction: Optional[float]) -> None:
  """Gives ``run`` the study's data section (any data set), keeping only
  what is its own: conditioning, mask channels and batch size; a
  ``fraction`` < 1 restricts its training subjects."""
  own = {k: run.data[k] for k in GENERATOR_DATA_KEYS if k in run.data}
  run.data = copy.deepcopy(data)
  run.data.update(own)
  if fraction is not None and fraction < 1.0:
    run.data.subject_fraction = fraction
    run.data.subject_seed = 0


def generator_runs(config: ml_collections.ConfigDict
                   ) -> List[Tuple[str, Optional[float], str]]:
  """``(generator, fraction or None, run name)`` of every generator to train."""
  per_fraction = config.study.generator_data == "per_fraction"
  runs = []
  for name in config.generators:
    if per_fraction:
      runs += [(name, f, f"{name}_f{f:g}") for f in config.study.fractions]
    else:
      runs.append((name, None, name))
  return runs


# -------------------------------------------------------------- stages ----


def train_generators(config, workdir: str) -> Dict[str, Dict[str, Any]]:
  """Trains (or resumes, or skips when finished) every generator run."""
  out = {}
  for name, fraction, run in generator_runs(config):
    gen_dir = os.path.join(workdir, "generators", run)
    logging.info("generator %s -> %s", run, gen_dir)
    t0 = time.time()
    # What the generator names "auto" (a latent model's stage 1) is
    # trained into its workdir first, as with --mode=train.
    gen_cfg = commands.resolve_auto_inputs(
        generator_config(config, name, fraction), gen_dir)
    summary = trainer.train(gen_cfg, gen_dir)
    out[run] = dict(config=gen_cfg, workdir=gen_dir,
                    seconds=time.time() - t0, final=summary["metrics"])
  return out


def synthetic_inputs(config, gen: Dict[str, Any]) -> Dict[str, Any]:
  """What a synthetic set depends on, as its ``provenance.json`` records
  it: sampling count and seed, the generator's checkpoint step, its whole
  config (model, sampler, ...) and the frozen inputs it was trained with
  (a stage-1 autoencoder, a perceptual network), so changing any of them
  resamples."""
  sc = config.study
  frozen = None
  path = os.path.join(gen["workdir"], "frozen_inputs.json")
  if os.path.exists(path):
    with open(path) as f:
      frozen = json.load(f)
  return dict(per_class=sc.synthetic_per_class, seed=sc.synthetic_seed,
              checkpoint_step=int(gen["config"].train.num_steps),
              generator_config=json.loads(json.dumps(
                  gen["config"].to_dict(), default=str)),
              frozen_inputs=frozen)


def _cached_export(directory: str, want: Dict[str, Any]
                   ) -> Optional[Arrays]:
  """The exported set in ``directory`` if it was made from ``want``;
  ``None`` (rebuild) if not, or if its files are damaged (a warning says
  which): synthetic sets are derived data."""
  try:
    arrays, prov = synthetic_lib.synthetic_builder.read_export(directory)
  except Exception as e:  # pylint: disable=broad-except
    # zipfile, JSON, unicode and OS errors all mean: make it again.
    logging.warning("%s: damaged synthetic set (%s); sampling it again",
                    directory, builder_lib.describe(e)[:300])
    return None
  if not all(prov.get(k) == v for k, v in want.items()):
    return None
  return arrays


def make_synthetic(config, workdir: str, gens: Dict[str, Dict[str, Any]]
                   ) -> Dict[str, Arrays]:
  """Samples and exports each generator's synthetic set (cached)."""
  sc = config.study
  out = {}
  for run, g in gens.items():
    directory = os.path.join(workdir, "synthetic", run)
    prov_path = os.path.join(directory, "provenance.json")
    want = synthetic_inputs(config, g)
    cached = _cached_export(directory, want) if os.path.exists(
        prov_path) else None
    if cached is not None:
      out[run] = cached
      continue
    res = synthetic_lib.generate(g["config"], g["workdir"],
                                 sc.synthetic_per_class, sc.synthetic_seed)
    gen_cfg = g["config"]
    provenance = dict(
        generator=run, method=gen_cfg.method.name,
        generator_config=gen_cfg.to_dict(), generator_workdir=g["workdir"],
        checkpoint_step=res["step"], per_class=sc.synthetic_per_class,
        seed=sc.synthetic_seed, sampler=gen_cfg.sample.to_dict(),
        contrasts=list(gen_cfg.data.contrasts),
        mask_keys=list(gen_cfg.data.get("mask_channels", ())),
        num_classes=int(gen_cfg.data.num_classes),
        normalization=res["meta"].get("normalization"),
        frozen_inputs=want["frozen_inputs"],
        sampling_seconds=res["seconds"])
    synthetic_lib.export(directory, res["arrays"], provenance,
                         config.data.spatial_dims, nifti=sc.export_nifti)
    out[run] = res["arrays"]
  return out


def _gen_for(arm: ArmSpec, fraction: float, config) -> Optional[str]:
  if arm.generator is None:
    return None
  if config.study.generator_data == "per_fraction":
    return f"{arm.generator}_f{fraction:g}"
  return arm.generator


def _cell_key(record: Dict[str, Any]) -> Tuple[str, float, str]:
  return record["task"], record["fraction"], record["arm"]


def _done_cells(path: str) -> Dict[Tuple[str, float, str], Dict[str, Any]]:
  """Finished cells of ``results.jsonl``; a line cut by a kill reruns."""
  return {_cell_key(r): r for r in jsonl.read(path)}


def cell_inputs(config: ml_collections.ConfigDict, task_name: str,
                synthetic_fingerprint: str = "",
                classical_strength: float = 1.0) -> str:
  """A hash of everything a cell's scores depend on besides its
  ``(task, fraction, arm)``: data, seeds, task and augmentation settings and
  (for synthetic arms) the synthetic set itself. A rerun reuses a stored
  cell only when this matches, so changing a setting or a generator in an
  existing workdir never mixes old scores into the report."""
  sc = config.study
  parts = dict(seed=config.seed, data=config.data.to_dict(),
               augment=config.augment.to_dict(),
               task=sc.tasks[task_name].to_dict(),
               study={k: sc[k] for k in ("num_seeds", "synthetic_ratio",
                                         "test_split", "generator_data")},
               synthetic=synthetic_fingerprint)
  if classical_strength != 1.0:  # keeps older workdirs' hashes valid
    parts["classical_strength"] = classical_strength
  text = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _to_open_scale(v: np.ndarray, low: float, high: float):
  """``(transformed values, inverse)`` mapping ``(low, high)`` onto the
  real line: logit for a bounded range (a difference of bounded metrics
  included), log for a lower bound, identity when unbounded. Values on a
  bound are pulled in by 0.1% of the range, so one perfect seed does not
  make the interval infinite."""
  if np.isfinite(low) and np.isfinite(high):
    eps = 1e-3
    u = np.clip((v - low) / (high - low), eps, 1 - eps)
    return (np.log(u / (1 - u)),
            lambda z: low + (high - low) / (1 + np.exp(-z)))
  if np.isfinite(low):
    return np.log(np.maximum(v - low, 1e-9)), lambda z: low + np.exp(z)
  return v, lambda z: z


def summarize(values: Sequence[float],
              bounds: Tuple[float, float] = (-np.inf, np.inf)
              ) -> Dict[str, float]:
  """Mean over seeds and a two-sided 95% t-interval inside ``bounds`` (the
  metric's range): the interval is taken on a scale where the range is
  unbounded (:func:`_to_open_scale`), around the mean's image there, and
  mapped back, so an AUC interval never passes 1 nor a count 0. ``nan`` interval for one seed."""
  v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
  if len(v) == 0:
    return dict(mean=float("nan"), ci_low=float("nan"),
                ci_high=float("nan"), n=0)
  mean = float(v.mean())
  if len(v) < 2:
    return dict(mean=mean, ci_low=float("nan"), ci_high=float("nan"), n=1)
  z, back = _to_open_scale(v, *bounds)
  half = float(scipy_stats.t.ppf(0.975, len(v) - 1) * z.std(ddof=1)
               / np.sqrt(len(v)))
  # Centred on the mean's image, so the interval holds the mean it is
  # printed with (also when the mean sits on a bound, pulled in there).
  centre = float(_to_open_scale(np.asarray([mean]), *bounds)[0][0])
  return dict(mean=mean, ci_low=min(float(back(centre - half)), mean),
              ci_high=max(float(back(centre + half)), mean), n=len(v))


def summarize_paired(diffs: Sequence[float],
                     bounds: Tuple[float, float]) -> Dict[str, float]:
  """:func:`summarize` of per-seed paired differences of a metric with
  range ``bounds`` (a difference lies within +-(high - low)), plus ``p``:
  the two-sided paired t-test of no difference."""
  width = bounds[1] - bounds[0]
  out = summarize(diffs, (-width, width))
  v = np.asarray([x for x in diffs if np.isfinite(x)], np.float64)
  p = float("nan")
  if len(v) >= 2:
    p = (1.0 if np.all(v == v[0]) and v[0] == 0 else
         0.0 if np.all(v == v[0]) else
         float(scipy_stats.ttest_1samp(v, 0.0).pvalue))
  return {**out, "p": p}


def real_pools(train: Arrays, fraction: float, subset_seeds: Sequence[int],
               keys: Sequence[str]) -> Tuple[Arrays, np.ndarray, np.ndarray]:
  """The real pool and per-seed subject subsets ``[S, N]`` (padded); seed
  ``s`` draws its subjects with ``subset_seeds[s]``."""
  n = len(train["image"])
  index = np.zeros((len(subset_seeds), n), np.int32)
  count = np.zeros((len(subset_seeds),), np.int32)
  for s, subset_seed in enumerate(subset_seeds):
    rows = pipeline.subject_subset(train["subject_id"], fraction, subset_seed)
    index[s, :len(rows)] = rows
    count[s] = len(rows)
  return {k: train[k] for k in keys}, index, count


def classical_strengths(config: ml_collections.ConfigDict, workdir: str,
                        train: Arrays, validation: Arrays,
                        fitter_for: Callable[[str], fit_lib.Fitter],
                        task_names: Sequence[str]) -> Dict[str, Any]:
  """The classical augmentation strength of each task, chosen on the
  validation split: one seed of real+classical on all the real training
  subjects per value of ``study.classical_strengths`` (multipliers of every
  augmentation probability), with model selection; the best validation
  score wins. Cached in ``classical_strength.json`` per task settings.

  Returns:
    ``{task: {strengths, scores, chosen}}`` (``{}`` without a grid).
  """
  grid = [float(g) for g in config.study.get("classical_strengths", ())]
  if not grid or not task_names:
    return {}
  path = os.path.join(workdir, CLASSICAL_STRENGTH)
  saved = jsonl.read_json(path)  # a cache: absent or damaged is empty
  data_keys = ["image", "label"] + [
      k for k in (mask_key(config),) if k in train]
  out = {}
  for name in task_names:
    key = cell_inputs(config, name) + json.dumps(grid)
    if saved.get(name, {}).get("key") == key:
      out[name] = saved[name]
      continue
    fitter = fitter_for(name)
    pool, index, count = real_pools(train, 1.0, [0], data_keys)
    pools = fit_lib.Pools(
        real={k: jnp.asarray(v) for k, v in pool.items()},
        real_index=jnp.asarray(index), real_count=jnp.asarray(count),
        synthetic={k: jnp.asarray(v[:1]) for k, v in pool.items()},
        synthetic_count=jnp.asarray(0, jnp.int32))
    scores = []
    for g in grid:
      selected = fit_lib.fit(
          fitter, pools, fit_lib.make_arm(0.0, True, g),
          fit_lib.seed_keys(config.seed, 1),
          desc=f"{name} classical x{g:g}", validation=validation).selected
      scores.append(selected[0]["score"])
    sign = 1 if tasks_lib.higher_is_better(fitter.task.primary) else -1
    best = int(np.argmax([sign * v for v in scores]))
    out[name] = dict(strengths=grid, scores=scores, chosen=grid[best],
                     metric=fitter.task.primary, key=key)
    saved[name] = out[name]
    jsonl.write_json(path, saved)
  return out


@dataclasses.dataclass
class _Downstream:
  """What fitting the study's cells needs, built once per run."""

  config: ml_collections.ConfigDict
  real: Dict[str, Arrays]
  synthetic: Dict[str, Arrays]
  fitters: Dict[str, fit_lib.Fitter]
  strength: Dict[str, Any]
  placeholder: Arrays
  segmenters: Dict[str, "TargetSegmenter"]

  def fitter(self, task_name: str) -> fit_lib.Fitter:
    if task_name not in self.fitters:
      c = self.config
      tcfg = c.study.tasks[task_name]
      task = tasks_lib.make_task(task_name, tcfg, list(c.data.contrasts),
                                 c.data.spatial_dims)
      # Translation targets are image channels: move them with the input
      # but keep intensity changes to the input channels only.
      augment_fn = augment_lib.make_augment_fn(
          c.augment, c.data.spatial_dims,
          intensity_channels=(task.inputs if task.kind == "translation"
                              else None))
      self.fitters[task_name] = fit_lib.make_fitter(task, tcfg, augment_fn)
    return self.fitters[task_name]

  def fit_cell(self, task_name: str, fraction: float, arm: ArmSpec,
               seeds: Sequence[int]) -> Dict[str, Any]:
    """Trains and scores seeds ``seeds`` (indices) of one cell; seed ``s``
    has the same key and real subjects in every arm of its task and
    fraction, so arms are paired by seed."""
    c, sc = self.config, self.config.study
    tcfg = sc.tasks[task_name]
    fitter = self.fitter(task_name)
    train = self.real[c.data.train_split]
    test = self.real[sc.test_split]
    data_keys = ["image", "label"] + [
        k for k in (mask_key(c),) if k in train]
    per_fraction = sc.generator_data == "per_fraction"
    pool, index, count = real_pools(
        train, fraction, [0 if per_fraction else s for s in seeds],
        data_keys)
    gen = _gen_for(arm, fraction, c)
    # Arms without synthetic data get a same-shaped placeholder, so every
    # cell of a task reuses one compiled program.
    syn = self.placeholder
    size = len(syn["image"])
    if gen:
      syn = {k: np.concatenate([self.synthetic[gen][k], syn[k]])[:size]
             for k in data_keys}
    pools = fit_lib.Pools(
        real={k: jnp.asarray(v) for k, v in pool.items()},
        real_index=jnp.asarray(index), real_count=jnp.asarray(count),
        synthetic={k: jnp.asarray(syn[k]) for k in data_keys},
        synthetic_count=jnp.asarray(
            len(self.synthetic[gen]["image"]) if gen else 0, jnp.int32))
    all_keys = fit_lib.seed_keys(c.seed, max(seeds) + 1)
    chosen = self.strength.get(task_name, {}).get("chosen", 1.0)
    states, losses, selected = fit_lib.fit(
        fitter, pools,
        fit_lib.make_arm(arm.synthetic_fraction(sc.synthetic_ratio),
                         arm.classical, chosen),
        [all_keys[s] for s in seeds],
        desc=f"{task_name} f={fraction:g} {arm.name}",
        validation=(self.real[c.data.eval_split]
                    if tcfg.get("model_selection") else None))
    seed_scores = fit_lib.score_seeds(fitter, states, test)
    if fitter.task.kind == "translation" and tcfg.get("segmenter_steps", 0):
      if task_name not in self.segmenters:
        self.segmenters[task_name] = train_target_segmenter(
            fitter.task, tcfg, c, pools, test)
      for st, scores in zip(states, seed_scores):
        scores.update(self.segmenters[task_name].score_translation(
            fitter, st, test))
    return dict(
        gen=gen, primary=fitter.task.primary, seed_scores=seed_scores,
        real_examples=count.tolist(),
        real_subjects=[
            int(len(np.unique(train["subject_id"][index[i, :n]])))
            for i, n in enumerate(count)],
        final_loss=float(losses[-max(1, len(losses) // 10):].mean()),
        selected=list(selected))


def _metrics(seed_scores: Sequence[Dict[str, float]]
             ) -> Dict[str, Dict[str, float]]:
  return {m: summarize([s[m] for s in seed_scores], tasks_lib.metric_range(m))
          for m in seed_scores[0]}


def _downstream(config, real: Dict[str, Arrays], synthetic: Dict[str, Arrays],
                strength: Dict[str, Any], fitters: Dict[str, fit_lib.Fitter],
                segmenters: Dict[str, "TargetSegmenter"]) -> _Downstream:
  train = real[config.data.train_split]
  size = max([len(s["image"]) for s in synthetic.values()] or [1])
  placeholder = {k: np.zeros((size,) + train[k].shape[1:], train[k].dtype)
                 for k in ("image", "label", mask_key(config))
                 if k in train}
  return _Downstream(config, real, synthetic, fitters, strength, placeholder,
                     segmenters)


def run_downstream(config, workdir: str, real: Dict[str, Arrays],
                   synthetic: Dict[str, Arrays],
                   segmenters: Optional[Dict[str, "TargetSegmenter"]] = None
                   ) -> List[Dict[str, Any]]:
  """Trains and scores every (task, fraction, arm) cell not yet done;
  translation tasks' target segmenters go into ``segmenters``."""
  sc = config.study
  path = os.path.join(workdir, RESULTS)
  done = _done_cells(path)
  arms = arm_specs(sc.arms, list(config.generators))
  train = real[config.data.train_split]
  # Model selection's held-out data: never the test subjects.
  validation = real[config.data.eval_split]
  synthetic_fps = {k: encoder_lib.fingerprint(v) for k, v in synthetic.items()}
  synthetic_fps[None] = ""  # arms without synthetic data
  cells = [(t, f, a) for t in sc.tasks for f in sc.fractions for a in arms]
  fitters: Dict[str, fit_lib.Fitter] = {}
  segmenters = {} if segmenters is None else segmenters
  ds = _downstream(config, real, synthetic, {}, fitters, segmenters)
  ds.strength = classical_strengths(
      config, workdir, train, validation, ds.fitter,
      [t for t in sc.tasks if any(a.classical for a in arms)])
  # What each cell's scores depend on (see cell_inputs), computed once.
  want = {(t, f, a.name): cell_inputs(config, t,
                                      synthetic_fps[_gen_for(a, f, config)],
                                      ds.strength.get(t, {}).get("chosen",
                                                                 1.0))
          for t, f, a in cells}
  for key in [k for k in want if k in done and
              done[k].get("inputs") != want[k]]:
    logging.warning("%s: cell %s f=%g %s was scored with other settings or "
                    "another synthetic set; rerunning it", path, *key)
    del done[key]
  todo = [c for c in cells if (c[0], c[1], c[2].name) not in done]
  results = [done[(t, f, a.name)] for t, f, a in cells
             if (t, f, a.name) in done]
  for task_name, fraction, arm in runtime.progress(todo, len(todo),
                                                   desc="study"):
    t0 = time.time()
    cell = ds.fit_cell(task_name, fraction, arm, range(sc.num_seeds))
    record = dict(
        task=task_name, kind=sc.tasks[task_name].kind, fraction=fraction,
        arm=arm.name, arm_kind=arm.kind, generator=cell.pop("gen"),
        **cell, metrics=_metrics(cell["seed_scores"]),
        seconds=time.time() - t0,
        inputs=want[(task_name, fraction, arm.name)])
    # Replaces a stale line of this cell, keeps every other line.
    key = _cell_key(record)
    jsonl.rewrite(path, lambda r, key=key: _cell_key(r) != key, append=record)
    results.append(record)
  if sc.get("extra_seeds", 0):
    add_seeds_near_decisions(config, workdir, ds, results, arms)
  return results


def near_decision(results: Sequence[Dict[str, Any]], band: Sequence[float]
                  ) -> List[Tuple[str, float, Tuple[str, ...]]]:
  """``(task, fraction, arms)`` where a synthetic arm's paired difference
  to real-only or to real+classical has a p-value inside ``band = (low,
  high)``: neither clearly there nor clearly absent, so more seeds can
  change the verdict. ``arms`` are those synthetic arms and the two
  baselines they are compared with."""
  paired = [dict(r) for r in results]
  paired_deltas(paired)
  low, high = band
  close: Dict[Tuple[str, float], List[str]] = {}
  for r in paired:
    if not r.get("generator"):
      continue
    ps = [r[k]["p"] for k in ("delta_vs_real", "delta_vs_classical")
          if k in r and np.isfinite(r[k].get("p", np.nan))]
    if any(low <= p <= high for p in ps):
      close.setdefault((r["task"], r["fraction"]), []).append(r["arm"])
  present = {(r["task"], r["fraction"], r["arm"]) for r in results}
  out = []
  for (task, fraction), arms in close.items():
    base = [a for a in ("real", "real+classical")
            if (task, fraction, a) in present]
    out.append((task, fraction, tuple(base + arms)))
  return out


def add_seeds_near_decisions(config, workdir: str, ds: _Downstream,
                             results: List[Dict[str, Any]],
                             arms: Sequence[ArmSpec]) -> None:
  """Gives the arms of each :func:`near_decision` comparison
  ``study.extra_seeds`` more seeds (the same new seeds in each, so the
  pairing holds), once; records are updated in place and on disk. Arms
  far from a decision keep their seeds: with several generators, most
  groups have one close comparison, and extending every arm would cost
  as much as the first pass."""
  sc = config.study
  total = sc.num_seeds + sc.extra_seeds
  path = os.path.join(workdir, RESULTS)
  by_cell = {(r["task"], r["fraction"], r["arm"]): r for r in results}
  close = {(t, f, a) for t, f, names in near_decision(
      results, sc.decision_band) for a in names}
  todo = [(t, f, a) for t, f in dict.fromkeys(
      (r["task"], r["fraction"]) for r in results) for a in arms
          if (t, f, a.name) in close and
          len(by_cell[(t, f, a.name)]["seed_scores"]) < total]
  for task_name, fraction, arm in runtime.progress(
      todo, len(todo), desc="extra seeds"):
    r = by_cell[(task_name, fraction, arm.name)]
    t0 = time.time()
    cell = ds.fit_cell(task_name, fraction, arm,
                       range(len(r["seed_scores"]), total))
    for k in ("seed_scores", "real_examples", "real_subjects", "selected"):
      r[k] = list(r[k]) + list(cell[k])
    r["metrics"] = _metrics(r["seed_scores"])
    r["extra_seeds"] = total - sc.num_seeds
    r["seconds"] = r.get("seconds", 0.0) + time.time() - t0
    key = _cell_key(r)
    jsonl.rewrite(path, lambda x, key=key: _cell_key(x) != key, append=r)


@dataclasses.dataclass(frozen=True)
class TargetSegmenter:
  """A lesion segmenter trained on real target-contrast images, used to
  score translated images by what a downstream model makes of them.

  Attributes:
    fitter: its (segmentation) fitter.
    params: trained parameters.
    real_dice: its pooled Dice on the real test images (the ceiling).
  """

  fitter: fit_lib.Fitter
  params: Any
  real_dice: float

  def score_translation(self, translator: fit_lib.Fitter, state,
                        test: Arrays) -> Dict[str, float]:
    """``seg_dice`` on translated test images, ``seg_dice_real`` on real."""
    fake = fit_lib.predict_all(translator, state.params,
                               translator.task.x(test))
    return self.score_images(fake, translator.task.target, test)

  def score_images(self, fake: np.ndarray, target: int,
                   test: Arrays) -> Dict[str, float]:
    """``seg_dice`` of the segmenter on test images whose channel
    ``target`` is replaced by ``fake [N, *S]``; ``seg_dice_real`` on the
    real ones."""
    image = np.array(test["image"], copy=True)
    image[..., target] = fake
    masks = fit_lib.predict_all(self.fitter, self.params,
                                self.fitter.task.x({"image": image}))
    seg = tasks_lib.segmentation_scores(
        masks, test[self.fitter.task.target], 2)
    return {"seg_dice": seg["dice"], "seg_dice_real": self.real_dice}


def train_target_segmenter(task: tasks_lib.Task,
                           tcfg: ml_collections.ConfigDict, config,
                           pools: fit_lib.Pools, test: Arrays
                           ) -> TargetSegmenter:
  """Trains a lesion segmenter on the translation target contrast (all real
  training subjects, one seed) for the translation task's Dice score."""
  target = config.data.contrasts[task.target]
  seg_cfg = ml_collections.ConfigDict(dict(
      kind="segmentation", inputs=(target,), target=mask_key(config),
      num_classes=2, model=tcfg.model.to_dict(),
      conv_lowering=tcfg.get("conv_lowering", "auto"),
      steps=tcfg.segmenter_steps, steps_per_call=tcfg.steps_per_call,
      batch_size=tcfg.batch_size, optim=tcfg.optim.to_dict()))
  seg_task = tasks_lib.make_task(f"{task.name}_segmenter", seg_cfg,
                                 list(config.data.contrasts),
                                 config.data.spatial_dims)
  fitter = fit_lib.make_fitter(seg_task, seg_cfg, augment_fn=None)
  n = int(pools.real["image"].shape[0])
  full = pools.replace(real_index=jnp.arange(n, dtype=jnp.int32)[None],
                       real_count=jnp.asarray([n], jnp.int32),
                       synthetic_count=jnp.asarray(0, jnp.int32))
  states = fit_lib.fit(fitter, full, fit_lib.make_arm(0.0, False),
                       fit_lib.seed_keys(config.seed + 1, 1),
                       desc=f"{target} segmenter").states
  real = fit_lib.score_seeds(fitter, states, test)[0]["dice"]
  return TargetSegmenter(fitter, states[0].params, real)


# ------------------------------------------------- translator benchmark ----


def translator_config(config: ml_collections.ConfigDict, name: str,
                      task_name: str, fraction: float, seed: int
                      ) -> ml_collections.ConfigDict:
  """Translator ``name``'s config for one (task, fraction, seed) cell: the
  study's data restricted to the subjects the downstream arms of that seed
  see, and the task's input and target contrasts as its translation."""
  # Unlocked copies: the command line locks the study's config.
  gen = ml_collections.ConfigDict(config.translators[name].to_dict())
  own = {k: gen.data[k] for k in ("batch_size", "unpaired") if k in gen.data}
  gen.data = ml_collections.ConfigDict({**config.data.to_dict(), **own})
  gen.data.subject_fraction = fraction
  gen.data.subject_seed = seed
  task = config.study.tasks[task_name]
  gen.translation = ml_collections.ConfigDict(dict(
      source=tuple(task.inputs), target=(task.target,)))
  gen.seed = config.seed + seed
  return gen


def run_translators(config, workdir: str, real: Dict[str, Arrays],
                    results: List[Dict[str, Any]],
                    segmenters: Dict[str, "TargetSegmenter"]) -> None:
  """Trains every translator of ``config.translators`` (pix2pix, CycleGAN,
  VAE-GAN, ...) on each translation task, fraction and seed, on exactly the
  real subjects of that seed's downstream arms, and scores it on the test
  subjects like the task's U-Net regression arms (SSIM/PSNR/MAE, and the
  lesion Dice of the target segmenter on the translated images); appends
  one ``<name> (translator)`` cell per (task, fraction) to ``results``."""
  sc = config.study
  path = os.path.join(workdir, RESULTS)
  done = _done_cells(path)
  test, train = real[sc.test_split], real[config.data.train_split]
  tasks = [t for t, c in sc.tasks.items() if c.kind == "translation"]
  cells = [(t, f, n) for t in tasks for f in sc.fractions
           for n in config.translators]
  for task_name, fraction, name in runtime.progress(cells, len(cells),
                                                    desc="translators"):
    arm = f"{name} (translator)"
    cfgs = [translator_config(config, name, task_name, fraction, s)
            for s in range(sc.num_seeds)]
    inputs = hashlib.sha256(json.dumps(
        [cell_inputs(config, task_name)] + [c.to_dict() for c in cfgs],
        sort_keys=True, default=str).encode()).hexdigest()[:16]
    old = done.get((task_name, fraction, arm))
    if old is not None and old.get("inputs") == inputs:
      results.append(old)
      continue
    tcfg = sc.tasks[task_name]
    contrasts = list(config.data.contrasts)
    source = test["image"][..., [contrasts.index(c) for c in tcfg.inputs]]
    target = contrasts.index(tcfg.target)
    t0 = time.time()
    seed_scores = []
    for s, cfg in enumerate(cfgs):
      run_dir = os.path.join(workdir, "translators",
                             f"{task_name}_{name}_f{fraction:g}_s{s}")
      trainer.train(cfg, run_dir)
      exp, _, state, _ = trainer.load_for_sampling(cfg, run_dir)
      pred = sampling.translate(exp.method, state, source,
                                jax.random.key(s), int(cfg.data.batch_size))
      scores = tasks_lib.translation_scores(
          pred[..., 0], test["image"][..., target],
          test["image"][..., target] > -1.0 + 1e-3)
      if tcfg.get("segmenter_steps", 0):
        if task_name not in segmenters:
          segmenters[task_name] = train_target_segmenter(
              tasks_lib.make_task(task_name, tcfg, contrasts,
                                  config.data.spatial_dims),
              tcfg, config, _segmenter_pools(train), test)
        scores.update(segmenters[task_name].score_images(pred[..., 0],
                                                         target, test))
      seed_scores.append(scores)
    record = dict(
        task=task_name, kind="translation", fraction=fraction, arm=arm,
        arm_kind="translator", generator=None,
        primary=tasks_lib.PRIMARY["translation"], seed_scores=seed_scores,
        metrics={m: summarize([x[m] for x in seed_scores],
                              tasks_lib.metric_range(m))
                 for m in seed_scores[0]},
        method=cfgs[0].method.name, seconds=time.time() - t0, inputs=inputs)
    key = _cell_key(record)
    jsonl.rewrite(path, lambda r, key=key: _cell_key(r) != key, append=record)
    results.append(record)


def _segmenter_pools(train: Arrays) -> fit_lib.Pools:
  """All real training rows, no synthetic data (the target segmenter's)."""
  keys = [k for k in ("image", "label") + pipeline.MASK_KEYS if k in train]
  n = len(train["image"])
  return fit_lib.Pools(
      real={k: jnp.asarray(train[k]) for k in keys},
      real_index=jnp.arange(n, dtype=jnp.int32)[None],
      real_count=jnp.asarray([n], jnp.int32),
      synthetic={k: jnp.asarray(train[k][:1]) for k in keys},
      synthetic_count=jnp.asarray(0, jnp.int32))


def paired_deltas(results: List[Dict[str, Any]]) -> None:
  """Adds ``delta_vs_real`` (every arm) and ``delta_vs_classical`` (arms
  with synthetic data): per-seed paired differences to the real-only and
  the real+classical arm of the same task and fraction (seeds share init
  and real subjects)."""
  for key, base_arm, only in (("delta_vs_real", "real", False),
                              ("delta_vs_classical", "real+classical", True)):
    base = {(r["task"], r["fraction"]): r for r in results
            if r["arm"] == base_arm}
    for r in results:
      b = base.get((r["task"], r["fraction"]))
      if b is None or r is b or (only and not r.get("generator")):
        continue
      m = r["primary"]
      diffs = [s[m] - t[m]
               for s, t in zip(r["seed_scores"], b["seed_scores"])]
      r[key] = summarize_paired(diffs, tasks_lib.metric_range(m))


def _metric_validation(config: ml_collections.ConfigDict, workdir: str,
                       enc: encoder_lib.Encoder,
                       real: Dict[str, Arrays]) -> Dict[str, Any]:
  """:func:`metric_validation.validate` on the validation subjects against
  the test subjects, cached in ``metric_validation.json`` for the same
  encoder and metric settings."""
  path = os.path.join(workdir, METRIC_VALIDATION)
  key = dict(encoder=enc.card["settings"],
             evals=config.evals.generative.to_dict(),
             splits=[config.data.eval_split, config.study.test_split])
  key = json.loads(json.dumps(key, sort_keys=True, default=str))
  saved = jsonl.read_json(path)  # a cache: absent or damaged is empty
  if saved.get("key") == key and "validation" in saved:
    return saved["validation"]
  validation = metric_validation.validate(
      enc, real[config.data.train_split], real[config.data.eval_split],
      real[config.study.test_split], config.evals.generative)
  jsonl.write_json(path, dict(key=key, validation=validation))
  return validation


def run(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes) the whole study; returns what the report needs."""
  from medgen_jax import report  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
  timings: Dict[str, float] = {}

  def stage(name):
    timings[name] = time.time() - t0 - sum(timings.values())

  splits = sorted({config.data.train_split, config.data.eval_split,
                   config.study.test_split})
  real, stats = load_real(config.data, splits)
  config, notes = resolve_for_data(config, real[config.data.train_split])
  for note in notes:
    logging.warning("study: %s", note)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
  stage("data")
  gens = train_generators(config, workdir)
  stage("generators")
  synthetic = make_synthetic(config, workdir, gens)
  stage("synthesis")
  enc = encoder_lib.train_or_load(
      config.encoder, config.data.contrasts, config.data.spatial_dims,
      real[config.data.train_split], real[config.data.eval_split],
      os.path.join(workdir, "encoder"),
      extra_card=dict(dataset=config.data.dataset,
                      normalization=config.data.normalization,
                      stats={k: list(v) for k, v in stats.items()}))
  gen_metrics = generative.evaluate_all(
      enc, real[config.data.train_split], real[config.data.eval_split],
      real[config.study.test_split], synthetic, config.evals.generative,
      os.path.join(workdir, GEN_METRICS))
  validation = _metric_validation(config, workdir, enc, real)
  stage("generator metrics")
  segmenters: Dict[str, TargetSegmenter] = {}
  results = run_downstream(config, workdir, real, synthetic, segmenters)
  if config.get("translators"):
    run_translators(config, workdir, real, results, segmenters)
  paired_deltas(results)
  stage("downstream")
  summary = dict(config=config, workdir=workdir, results=results,
                 generators={k: dict(workdir=v["workdir"],
                                     seconds=v["seconds"], final=v["final"])
                             for k, v in gens.items()},
                 generator_metrics=gen_metrics, encoder_card=enc.card,
                 metric_validation=validation, data_notes=notes,
                 classical_strength=jsonl.read_json(
                     os.path.join(workdir, CLASSICAL_STRENGTH)),
                 timings=timings, real=real, synthetic=synthetic)
  paths = report.write(summary)
  stage("report")
  summary["report"] = paths
  summary["seconds"] = time.time() - t0
  return summary
