"""Config validation that runs before any data is built or code compiled.

Each check names the offending key and the allowed values, so a typo costs a
second, not a compile.
"""

from typing import Any, Iterable, List

import ml_collections

from medgen_jax.data import builder_lib
from medgen_jax.data import pipeline
from medgen_jax.data import preprocess
from medgen_jax.methods import base as methods
from medgen_jax.nn import conv as conv_lib

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
  errors: List[str] = []
  missing = [s for s in REQUIRED_SECTIONS if s not in config]
  if missing:
    raise ConfigError(f"config is missing sections {missing}")
  d, m, me, o, t, s = (config.data, config.model, config.method, config.optim,
                       config.train, config.sample)
  missing = [k for k in builder_lib.REQUIRED_DATA_KEYS if k not in d]
  if missing:
    raise ConfigError(f"config.data is missing keys {missing}")
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
  if not 0.0 <= t.ema < 1.0:
    errors.append(f"train.ema={t.ema} must be in [0, 1)")
  if errors:
    raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
