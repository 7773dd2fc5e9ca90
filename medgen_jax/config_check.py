"""Config validation that runs before any data is built or code compiled.

Each check names the offending key and the allowed values, so a typo costs a
second, not a compile.
"""

from typing import Any, Iterable, List

import ml_collections

from medgen_jax.data import builder_lib
from medgen_jax.data import pipeline
from medgen_jax.data import preprocess
from medgen_jax.eval import registry as eval_registry
from medgen_jax.methods import base as methods
from medgen_jax.nn import conv as conv_lib
from medgen_jax.train import microbatch

REQUIRED_SECTIONS = ("data", "model", "method", "optim", "train", "sample")


class ConfigError(ValueError):
  """A config value that cannot work; the message lists every problem found."""


def _one_of(errors: List[str], key: str, value: Any, allowed: Iterable[Any]):
  allowed = tuple(allowed)
  if value not in allowed:
    errors.append(f"{key}={value!r} must be one of {allowed}")


def _positive(errors: List[str], key: str, value: Any, allow_zero=False):
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
      value >= 0 if allow_zero else value > 0)
  if not ok:
    kind = "non-negative" if allow_zero else "positive"
    errors.append(f"{key}={value!r} must be a {kind} number")


def validate(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Raises ConfigError listing every problem in ``config``."""
  errors = (study_errors(config, num_devices)
            if config.get("kind") == "study"
            else method_errors(config, num_devices))
  if errors:
    raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def method_errors(config: ml_collections.ConfigDict,
                  num_devices: int = 1) -> List[str]:
  """Problems of a generative-method config (``configs/ddpm.py`` & co)."""
  errors: List[str] = []
  missing = [s for s in REQUIRED_SECTIONS if s not in config]
  if missing:
    return [f"config is missing sections {missing}"]
  d, m, me, o, t, s = (config.data, config.model, config.method, config.optim,
                       config.train, config.sample)
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
  levels = len(m.ch_mult)
  if isinstance(d.res, int) and d.res % (2 ** (levels - 1)):
    errors.append(f"data.res={d.res} must be divisible by 2**(len(model."
                  f"ch_mult)-1)={2 ** (levels - 1)}")
  for mult in m.ch_mult:
    if (m.ch * mult) % m.num_groups:
      errors.append(f"model.num_groups={m.num_groups} must divide every "
                    f"level's channels (ch*ch_mult = {m.ch * mult})")
      break
  _one_of(errors, "model.dtype", m.dtype, ("float32", "bfloat16"))
  _one_of(errors, "model.conv_lowering", m.conv_lowering, conv_lib.LOWERINGS)
  _one_of(errors, "method.name", me.name, methods.available())
  if me.name == "ddpm":
    _one_of(errors, "method.schedule", me.schedule, ("linear", "cosine"))
    _one_of(errors, "method.prediction", me.prediction, ("eps", "v"))
    _one_of(errors, "sample.sampler", s.sampler, ("ddpm", "ddim"))
    _positive(errors, "method.timesteps", me.timesteps)
    per_class = tuple(s.get("guidance_per_class", ()) or ())
    if per_class and (d.cond != "label" or len(per_class) != d.num_classes):
      errors.append(f"sample.guidance_per_class={per_class} needs "
                    f"data.cond='label' and one scale per class "
                    f"(data.num_classes={d.num_classes})")
    if s.sampler == "ddim" and not 0 < s.steps <= me.timesteps:
      errors.append(f"sample.steps={s.steps} must be in [1, "
                    f"method.timesteps={me.timesteps}]")
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
  from medgen_jax.downstream import tasks as tasks_lib  # pylint: disable=import-outside-toplevel
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
  if not sc.tasks:
    errors.append("study.tasks is empty")
  for name, t in sc.tasks.items():
    _one_of(errors, f"study.tasks.{name}.kind", t.kind, tasks_lib.KINDS)
    for c in tuple(t.inputs) + ((t.target,) if t.kind == "translation"
                                else ()):
      if c not in d.contrasts:
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
