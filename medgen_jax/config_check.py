"""Config validation that runs before any data is built or code compiled.

Each check names the offending key and the allowed values, so a typo costs a
second, not a compile.
"""

from typing import List

import ml_collections

from medgen_jax import checks
from medgen_jax import errors
from medgen_jax.data import builder_lib
from medgen_jax.data import pipeline
from medgen_jax.data import preprocess
from medgen_jax.eval import registry as eval_registry
from medgen_jax.methods import base as methods
from medgen_jax.train import microbatch

REQUIRED_SECTIONS = ("data", "method", "optim", "train")


class ConfigError(errors.UserError, ValueError):
  """A config value that cannot work; the message lists every problem found."""


_one_of = checks.one_of
_positive = checks.positive


def validate(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Raises ConfigError listing every problem in ``config``."""
  errors = (study_errors(config, num_devices)
            if config.get("kind") == "study"
            else method_errors(config, num_devices))
  if errors:
    raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def data_errors(d: ml_collections.ConfigDict, num_devices: int = 1
                ) -> List[str]:
  """Problems of a ``data`` section (any data set)."""
  errors: List[str] = []
  missing = [k for k in builder_lib.REQUIRED_DATA_KEYS if k not in d]
  if missing:
    return [f"config.data is missing keys {missing}"]
  try:
    builder = pipeline.builder_module(d.dataset)
  except ValueError as e:
    builder = None
    errors.append(f"data.dataset: {e}")
  if hasattr(builder, "validate_config"):
    # Keys and values only this data set reads (unknown keys included).
    errors += builder.validate_config(d)
  _one_of(errors, "data.spatial_dims", d.spatial_dims, (2, 3))
  _one_of(errors, "data.normalization", d.normalization,
          pipeline.NORMALIZATIONS)
  for c, kind in (d.get("contrast_normalization") or {}).items():
    _one_of(errors, f"data.contrast_normalization.{c}", kind,
            pipeline.NORMALIZATIONS)
  for c, window in (d.get("windows") or {}).items():
    try:
      preprocess.resolve_window(window)
    except ValueError as e:
      errors.append(f"data.windows.{c}: {e}")
  _one_of(errors, "data.cond", d.cond, ("", "label"))
  _positive(errors, "data.res", d.res)
  _positive(errors, "data.batch_size", d.batch_size)
  if isinstance(d.batch_size, int) and d.batch_size % num_devices:
    errors.append(f"data.batch_size={d.batch_size} must be divisible by the "
                  f"number of devices ({num_devices})")
  if not d.contrasts:
    errors.append("data.contrasts is empty")
  return errors


def method_errors(config: ml_collections.ConfigDict,
                  num_devices: int = 1) -> List[str]:
  """Problems of a generative-method config (``configs/ddpm.py`` & co):
  the shared sections here, the method's own (``method``, ``model``,
  ``sample``) from the method (``methods.base.config_errors``)."""
  missing = [s for s in REQUIRED_SECTIONS if s not in config]
  if missing:
    return [f"config is missing sections {missing}"]
  errors = data_errors(config.data, num_devices)
  if any(k not in config.data for k in builder_lib.REQUIRED_DATA_KEYS):
    return errors
  d, o, t = config.data, config.optim, config.train
  errors += methods.config_errors(config)
  _one_of(errors, "optim.name", o.name, ("adam", "adamw", "sgd"))
  _one_of(errors, "optim.schedule", o.schedule,
          ("constant", "cosine", "linear"))
  _positive(errors, "optim.lr", o.lr)
  for k in ("num_steps", "log_every", "ckpt_every", "keep_ckpts"):
    _positive(errors, f"train.{k}", t[k])
  _positive(errors, "train.sample_every", t.sample_every, allow_zero=True)
  mb = t.get("microbatches", 0)
  if not isinstance(mb, int) or mb < 0:
    errors.append(f"train.microbatches={mb!r} must be an int >= 0 (0: auto)")
  elif isinstance(d.batch_size, int):
    try:
      microbatch.resolve(mb, d.batch_size, num_devices, "cpu")
    except ValueError as e:
      errors.append(str(e))
  if not 0.0 <= t.ema < 1.0:
    errors.append(f"train.ema={t.ema} must be in [0, 1)")
  errors += eval_registry.config_errors(config)
  return errors


STUDY_SECTIONS = ("data", "generators", "study", "augment", "encoder",
                  "evals")


def study_errors(config: ml_collections.ConfigDict,
                 num_devices: int = 1) -> List[str]:
  """Problems of an augmentation-study config (``configs/study.py``)."""
  from medgen_jax.downstream import study as study_lib  # pylint: disable=import-outside-toplevel
  from medgen_jax.eval import tasks as tasks_lib  # pylint: disable=import-outside-toplevel
  missing = [s for s in STUDY_SECTIONS if s not in config]
  if missing:
    return [f"study config is missing sections {missing}"]
  errors: List[str] = []
  d, sc = config.data, config.study
  for name in config.generators:
    gen = study_lib.generator_config(config, name, None)
    errors += [f"generators.{name}: {e}"
               for e in method_errors(gen, num_devices)]
    if gen.data.cond not in ("", "label"):
      errors.append(f"generators.{name}.data.cond={gen.data.cond!r}")
  translation_tasks = [t for t, c in sc.tasks.items()
                       if c.kind == "translation"]
  translators = config.get("translators") or {}
  if translators and not translation_tasks:
    errors.append("translators are configured but study.tasks has no "
                  "translation task (tasks=translation)")
  resolved = study_lib.with_auto_contrasts(config)
  for name in translators:
    for t in translation_tasks:
      tr = study_lib.translator_config(resolved, name, t, 1.0, 0)
      errors += [f"translators.{name}: {e}"
                 for e in method_errors(tr, num_devices)]
  for f in sc.fractions:
    if not 0.0 < f <= 1.0:
      errors.append(f"study.fractions entry {f} must be in (0, 1]")
  _positive(errors, "study.num_seeds", sc.num_seeds)
  for arm in sc.arms:
    _one_of(errors, "study.arms entry", arm, study_lib.ARM_KINDS)
  if any("synthetic" in a for a in sc.arms) and not config.generators:
    errors.append("study.arms use synthetic data but no generators are "
                  "configured")
  if not 0.0 <= sc.synthetic_ratio < 1.0:
    errors.append(f"study.synthetic_ratio={sc.synthetic_ratio} must be in "
                  "[0, 1) (use the 'synthetic' arm for synthetic only)")
  _positive(errors, "study.synthetic_per_class", sc.synthetic_per_class)
  _one_of(errors, "study.generator_data", sc.generator_data,
          ("full", "per_fraction"))
  for g in tuple(sc.get("classical_strengths", ()) or ()):
    if isinstance(g, bool) or not isinstance(g, (int, float)) or g <= 0:
      errors.append(f"study.classical_strengths entry {g!r} must be a "
                    "positive number (a multiplier of every augmentation "
                    "probability)")
  if not sc.tasks:
    errors.append("study.tasks is empty")
  for name, t in sc.tasks.items():
    _one_of(errors, f"study.tasks.{name}.kind", t.kind, tasks_lib.KINDS)
    for c in tuple(t.inputs) + ((t.target,) if t.kind == "translation"
                                else ()):
      # "auto": chosen from the data set when the study starts.
      if c != "auto" and c not in d.contrasts:
        errors.append(f"study.tasks.{name}: contrast {c!r} is not in "
                      f"data.contrasts {tuple(d.contrasts)}")
    for k in ("steps", "steps_per_call", "batch_size"):
      _positive(errors, f"study.tasks.{name}.{k}", t[k])
    if (isinstance(t.steps, int) and isinstance(t.steps_per_call, int)
        and t.steps_per_call > 0 and t.steps % t.steps_per_call):
      errors.append(f"study.tasks.{name}.steps={t.steps} must be a multiple "
                    f"of steps_per_call={t.steps_per_call}")
  for k in ("steps", "steps_per_call", "batch_size"):
    _positive(errors, f"encoder.{k}", config.encoder[k])
  from medgen_jax.data import augment as augment_lib  # pylint: disable=import-outside-toplevel
  errors += augment_lib.config_errors(config.augment, d.spatial_dims)
  if "generative" not in config.evals:
    errors.append("study configs need evals.generative (the generator "
                  "metrics of the report)")
  elif not 0.0 < config.evals.generative.memorization_quantile < 1.0:
    errors.append("evals.generative.memorization_quantile must be in (0, 1)")
  return errors
