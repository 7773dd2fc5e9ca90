"""Denoising diffusion (DDPM, Ho et al. 2020) and rectified flow, with
DDPM, DDIM, DPM-Solver++(2M) and Euler sampling.

``method.objective``: ``"diffusion"`` (the discrete variance-preserving
process of ``method.schedule``/``timesteps``, the network predicting
``method.prediction``, eps or v) or ``"rectified_flow"`` (the straight path
between image and noise, the network predicting its velocity; see
:mod:`medgen_jax.diffusion.flow`). Samplers: ``ddpm`` and ``ddim`` for
diffusion, ``euler`` for the flow, ``dpmpp_2m`` for both.

Optional label conditioning with classifier-free guidance (Ho & Salimans,
2022): labels are dropped to a null class with probability
``config.method.p_uncond`` during training, and sampling mixes conditional and
unconditional predictions with ``config.sample.guidance_scale``.
"""

from typing import Any, List, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections

from medgen_jax import checks
from medgen_jax.diffusion import flow
from medgen_jax.diffusion import samplers
from medgen_jax.diffusion import schedules
from medgen_jax.methods.base import Batch, Metrics
from medgen_jax.nn import unet as unet_lib
from medgen_jax.nn.unet import UNet
from medgen_jax.train import microbatch
from medgen_jax.train import optim
from medgen_jax.train.optim import make_optimizer
from medgen_jax.train.state import (TrainState, apply_gradients,
                                    create_state, eval_params)

PyTree = Any


class DDPM:
  """Diffusion model following the :class:`~medgen_jax.methods.base.Method`
  protocol.

  Attributes:
    config: the full experiment config.
    image_shape: ``(H, W, C)`` or ``(D, H, W, C)`` of one image.
    num_classes: ``0`` when unconditional; the null label is ``num_classes``.
    model: the :class:`UNet`.
    schedule: the diffusion constants.
    tx: the optimizer.
    microbatches: slices of the batch each train step's gradient is
      accumulated over (``train.microbatches``, resolved).
  """

  def __init__(self, config: ml_collections.ConfigDict,
               image_shape: Tuple[int, ...]):
    self.config = config
    self.image_shape = tuple(image_shape)
    self.num_classes = (int(config.data.num_classes)
                        if config.data.cond == "label" else 0)
    m = config.model
    self.model = UNet(
        ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions), num_heads=m.num_heads,
        dropout=m.dropout, num_groups=m.num_groups,
        out_channels=self.image_shape[-1],
        spatial_dims=len(self.image_shape) - 1,
        num_classes=self.num_classes, dtype=jnp.dtype(m.dtype),
        conv_lowering=m.conv_lowering)
    self.objective = config.method.objective
    self.flow = self.objective == "rectified_flow"
    self.prediction = config.method.prediction
    self.schedule = schedules.make_schedule(config.method.schedule,
                                            config.method.timesteps)
    self.tx = make_optimizer(config.optim, config.train.num_steps)
    self.microbatches = microbatch.resolve(
        int(config.train.get("microbatches", 0)), int(config.data.batch_size),
        jax.device_count(), jax.default_backend())

  @property
  def conditional(self) -> bool:
    return self.num_classes > 0

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """Initial state; ``batch`` only provides shapes."""
    x = jnp.zeros((1,) + self.image_shape, jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = jnp.zeros((1,), jnp.int32) if self.conditional else None
    params = self.model.init({"params": rng}, x, t, y, train=False)["params"]
    return create_state(params, self.tx, use_ema=self.config.train.ema > 0)

  def draw(self, rng: jax.Array, batch: Batch) -> Batch:
    """The loss's randomness for a whole batch, per example: ``t [B]``,
    ``noise`` like the images, the (possibly dropped) labels ``y [B]`` and
    dropout keys ``[B]`` (a microbatch uses its first).

    Drawn once per batch, so a step split into microbatches sees the same
    noise as an unsplit one.
    """
    x0 = batch["image"]
    t_key, noise_key, label_key, dropout_key = jax.random.split(rng, 4)
    draws = {
        # The flow's time is continuous in [0, 1].
        "t": (jax.random.uniform(t_key, x0.shape[:1], jnp.float32)
              if self.flow else
              jax.random.randint(t_key, x0.shape[:1], 0,
                                 self.schedule.num_timesteps)),
        "noise": jax.random.normal(noise_key, x0.shape, jnp.float32),
        # One key per example, so every microbatch has its own.
        "dropout": jax.random.split(dropout_key, x0.shape[0]),
    }
    if self.conditional:
      draws["y"] = samplers.drop_labels(label_key, batch["label"],
                                        self.config.method.p_uncond,
                                        self.num_classes)
    return draws

  def net_time(self, t: jax.Array) -> jax.Array:
    """What the network sees of the time ``t``: the integer timestep of the
    diffusion, the flow's ``t`` in ``[0, 1]`` scaled to ``[0, 1000]``."""
    return t * flow.TIME_SCALE if self.flow else t

  def loss_given(self, params, batch: Batch, draws: Batch,
                 train: bool = True) -> jax.Array:
    """Mean squared error of the ``eps|v`` prediction (or the flow's
    velocity) for given draws."""
    x0 = batch["image"].astype(jnp.float32)
    t, noise = draws["t"], draws["noise"]
    if self.flow:
      x_t = flow.interpolate(x0, noise, t)
      target = flow.velocity_target(x0, noise)
    else:
      x_t = schedules.q_sample(self.schedule, x0, t, noise)
      target = schedules.training_target(self.schedule, x0, t, noise,
                                         self.prediction)
    out = self.model.apply({"params": params}, x_t, self.net_time(t),
                           draws.get("y"), train=train,
                           rngs={"dropout": draws["dropout"][0]})
    return jnp.mean(jnp.square(out - target))

  def loss_fn(self, params, batch: Batch, rng: jax.Array,
              train: bool = True) -> jax.Array:
    """Mean squared error of the ``eps|v`` prediction at uniform ``t``.

    ``train=False`` turns dropout off (validation loss); label dropout for
    classifier-free guidance is part of the objective and stays.
    """
    return self.loss_given(params, batch, self.draw(rng, batch), train)

  def loss(self, state: TrainState, batch: Batch,
           rng: jax.Array) -> jax.Array:
    """The validation loss: :meth:`loss_fn` of ``state.params`` with
    dropout off."""
    return self.loss_fn(state.params, batch, rng, train=False)

  def grad_step(self, state: TrainState, batch: Batch,
                rng: jax.Array) -> Tuple[PyTree, Metrics]:
    """The first half of :meth:`train_step`: the loss's gradients with
    respect to ``state.params``, accumulated over ``self.microbatches``
    microbatches, and ``{"loss"}``; pure and jit-able."""
    loss, grads = microbatch.mean_value_and_grad(
        lambda p, xs: self.loss_given(p, *xs), state.params,
        (batch, self.draw(rng, batch)), self.microbatches)
    return grads, {"loss": loss.astype(jnp.float32)}

  def apply_step(self, state: TrainState,
                 grads: PyTree) -> Tuple[TrainState, Metrics]:
    """The second half of :meth:`train_step`: the optimizer update and EMA,
    and ``{"grad_norm"}``; pure and jit-able."""
    # The same dot products as the gradient clip's norm, so with clipping
    # on XLA computes them once.
    grad_norm = optim.global_norm(grads)
    state = apply_gradients(state, self.tx, grads, ema=self.config.train.ema,
                            ema_warmup=self.config.train.ema_warmup)
    return state, {"grad_norm": grad_norm.astype(jnp.float32)}

  def train_step(self, state: TrainState, batch: Batch,
                 rng: jax.Array) -> Tuple[TrainState, Metrics]:
    """One optimizer step over ``self.microbatches`` microbatches; pure and
    jit-able."""
    grads, metrics = self.grad_step(state, batch, rng)
    state, more = self.apply_step(state, grads)
    return state, {**metrics, **more}

  def sample(self, state: TrainState, rng: jax.Array, num: int,
             cond: Optional[Union[Batch, jax.Array]] = None) -> Batch:
    """``num`` samples (static) with the EMA params when present.

    Args:
      state: training state.
      rng: PRNG key.
      num: number of samples.
      cond: for a conditional model, ``{"label": [num] int}`` (or the label
        array itself); ``None`` gives balanced labels ``i % num_classes``.

    Returns:
      ``{"image": [num, *image_shape] float32 in [-1, 1]}`` plus
      ``"label": [num] int32`` when conditional.
    """
    params = eval_params(state)
    s = self.config.sample
    labels = None

    # Every network call goes through ``model_fn``; on CPUs it runs in
    # microbatches (``sample.microbatches``, auto as for training), whose
    # activations stay in the caches. The guided call doubles the batch.
    scales = guidance_scales(s, self.num_classes)
    guided = self.conditional and any(w != 0 for w in scales)
    calls = 2 * num if guided else num
    n = microbatch.resolve(int(s.get("microbatches", 0)), calls,
                           jax.device_count(), jax.default_backend(),
                           key="sample.microbatches")
    model_fn = microbatch.chunked(
        lambda x, t, y=None: self.model.apply(
            {"params": params}, x, self.net_time(t), y, train=False), n)

    if isinstance(cond, Mapping) and set(cond) - {"label"}:
      raise ValueError(f"DDPM is conditioned on labels only; got "
                       f"{sorted(cond)}")
    if self.conditional:
      if cond is None:
        labels = jnp.arange(num, dtype=jnp.int32) % self.num_classes
      else:
        labels = cond["label"] if isinstance(cond, Mapping) else cond
        labels = jnp.asarray(labels, jnp.int32)
      if not guided:
        # w = 0 is the conditional model: skip the doubled batch.
        denoise_fn = lambda x, t: model_fn(x, t, labels)
      else:
        w = jnp.asarray(scales, jnp.float32)[labels]  # [num]
        denoise_fn = samplers.guided_denoise_fn(model_fn, labels, w,
                                                self.num_classes)
    else:
      denoise_fn = model_fn

    x = self.solve(denoise_fn, rng, (num,) + self.image_shape)
    out = {"image": self.finish(state, x)}
    if labels is not None:
      out["label"] = labels
    return out


  def finish(self, state: TrainState, x: jax.Array) -> jax.Array:
    """The sampler's output as images: clipped to the data range (a latent
    model decodes here)."""
    del state
    return jnp.clip(x, -1.0, 1.0)

  def samplers(self) -> Tuple[Tuple[str, int], ...]:
    """``(sampler, fixed NFE or 0 for any)`` of this objective."""
    return tuple((name, self.schedule.num_timesteps if name == "ddpm" else 0)
                 for name in SAMPLERS[self.objective])

  def solve(self, denoise_fn, rng: jax.Array, shape: Tuple[int, ...],
            sampler: Optional[str] = None,
            steps: Optional[int] = None) -> jax.Array:
    """Runs ``sample.sampler`` (or ``sampler``) with ``sample.steps`` (or
    ``steps``) network evaluations on ``denoise_fn(x, t)``, the network's
    (guided) output; ``[*shape]`` float32."""
    s = self.config.sample
    sampler = sampler or s.sampler
    steps = int(steps or s.steps)
    clip_x0 = s.get("clip_x0", True)
    if sampler not in SAMPLERS[self.objective]:
      raise ValueError(f"sample.sampler={sampler!r} must be one of "
                       f"{SAMPLERS[self.objective]} for method.objective="
                       f"{self.objective!r}")
    if self.flow:
      if sampler == "euler":
        return flow.euler_sample(denoise_fn, rng, shape, steps, clip_x0)
      return flow.dpm_solver_pp_sample(denoise_fn, rng, shape, steps,
                                       clip_x0)
    if sampler == "ddpm":
      return samplers.ddpm_sample(denoise_fn, self.schedule, rng, shape,
                                  self.prediction, clip_x0)
    if sampler == "ddim":
      return samplers.ddim_sample(denoise_fn, self.schedule, rng, shape,
                                  num_steps=steps, eta=s.eta,
                                  prediction=self.prediction, clip_x0=clip_x0)
    return samplers.dpm_solver_pp_sample(denoise_fn, self.schedule, rng,
                                         shape, steps, self.prediction,
                                         clip_x0)


# The samplers of each objective; ``dpmpp_2m`` solves both ODEs.
SAMPLERS = {"diffusion": ("ddpm", "ddim", "dpmpp_2m"),
            "rectified_flow": ("euler", "dpmpp_2m")}


def guidance_scales(sample_config: ml_collections.ConfigDict,
                    num_classes: int) -> Tuple[float, ...]:
  """The guidance ``w`` of every class: ``sample.guidance_per_class`` when
  set, else ``sample.guidance_scale`` for all."""
  per_class = tuple(sample_config.get("guidance_per_class", ()) or ())
  if per_class:
    if len(per_class) != num_classes:
      raise ValueError(f"sample.guidance_per_class={per_class} needs one "
                       f"scale per class ({num_classes})")
    return tuple(float(w) for w in per_class)
  return (float(sample_config.guidance_scale),) * max(num_classes, 1)


METHOD_KEYS = ("name", "objective", "schedule", "timesteps", "prediction",
               "p_uncond")
SAMPLE_KEYS = ("sampler", "steps", "eta", "guidance_scale",
               "guidance_per_class", "num", "batch_size")
OPTIONAL_SAMPLE_KEYS = ("microbatches", "clip_x0", "cost_steps")


def config_errors(config: ml_collections.ConfigDict) -> List[str]:
  """Problems of the ``method``, ``model`` and ``sample`` sections."""
  return diffusion_errors(config, config.data.res, METHOD_KEYS, "ddpm")


def diffusion_errors(config: ml_collections.ConfigDict, res: Any,
                     method_keys: Tuple[str, ...], who: str) -> List[str]:
  """:func:`config_errors` of a diffusion model on ``res``-sided inputs
  (images, or a latent diffusion's latents) whose method section has
  ``method_keys``."""
  errors: List[str] = []
  d, me, s = config.data, config.method, config.sample
  errors += unet_lib.config_errors(config.model, res)
  if checks.section_keys(errors, "method", me, method_keys, who):
    checks.one_of(errors, "method.objective", me.objective, tuple(SAMPLERS))
    checks.one_of(errors, "method.schedule", me.schedule,
                  ("linear", "cosine"))
    checks.one_of(errors, "method.prediction", me.prediction, ("eps", "v"))
    checks.positive(errors, "method.timesteps", me.timesteps)
    checks.in_range(errors, "method.p_uncond", me.p_uncond, 0.0, 1.0)
  given = {k: v for k, v in s.items() if k not in OPTIONAL_SAMPLE_KEYS}
  if not checks.section_keys(errors, "sample", given, SAMPLE_KEYS, who):
    return errors
  objective = me.get("objective")
  if objective in SAMPLERS:
    checks.one_of(errors, "sample.sampler", s.sampler, SAMPLERS[objective])
  checks.positive(errors, "sample.steps", s.steps)
  for n in tuple(s.get("cost_steps", ()) or ()):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      errors.append(f"sample.cost_steps entry {n!r} must be a positive "
                    "integer (network evaluations)")
  per_class = tuple(s.get("guidance_per_class", ()) or ())
  if per_class and (d.cond != "label" or len(per_class) != d.num_classes):
    errors.append(f"sample.guidance_per_class={per_class} needs "
                  f"data.cond='label' and one scale per class "
                  f"(data.num_classes={d.num_classes})")
  if (objective == "diffusion" and s.sampler in ("ddim", "dpmpp_2m") and
      isinstance(me.get("timesteps"), int) and
      not 0 < s.steps <= me.timesteps):
    errors.append(f"sample.steps={s.steps} must be in [1, "
                  f"method.timesteps={me.timesteps}]")
  return errors


def make(config: ml_collections.ConfigDict, example_batch: Batch) -> DDPM:
  """Builds the method; image shape comes from ``example_batch["image"]``."""
  return DDPM(config, tuple(example_batch["image"].shape[1:]))
