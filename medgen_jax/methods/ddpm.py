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

import json
import os
from typing import Any, List, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections

from medgen_jax import checks
from medgen_jax.diffusion import flow
from medgen_jax.diffusion import samplers
from medgen_jax.diffusion import schedules
from medgen_jax.methods import pix2pix
from medgen_jax.methods.base import Batch, Metrics
from medgen_jax.nn import unet as unet_lib
from medgen_jax.nn.unet import ControlNet, UNet
from medgen_jax.train import frozen as frozen_lib
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
    self.condition = config.method.get("condition", "none")
    self.gen_channels, self.given_channels = self.split_channels(
        config, image_shape[-1])
    # What the diffusion generates; the given channels are inputs only.
    self.image_shape = tuple(image_shape[:-1]) + (len(self.gen_channels),)
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
        conv_lowering=m.conv_lowering, remat=bool(m.get("remat", False)))
    # A ControlNet adapter on a frozen, trained base model: the adapter's
    # parameters train, the base's (state.frozen["base"]) do not.
    self.control, self._frozen, self.base_model_state = None, None, None
    if config.method.get("controlnet"):
      self.control = ControlNet(
          ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
          attn_resolutions=tuple(m.attn_resolutions), num_heads=m.num_heads,
          dropout=m.dropout, num_groups=m.num_groups,
          spatial_dims=len(self.image_shape) - 1,
          num_classes=self.num_classes, dtype=jnp.dtype(m.dtype),
          conv_lowering=m.conv_lowering, remat=bool(m.get("remat", False)))
      base, _, record = frozen_lib.load_run(config.method.controlnet,
                                            with_model_state=True)
      # A latent base's scale lives in its model state.
      self.base_model_state = base["model_state"]
      self._frozen = frozen_lib.FrozenInputs({"base": base["params"]},
                                             {"base": record})
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

  def split_channels(self, config: ml_collections.ConfigDict,
                     num: int) -> Tuple[List[int], List[int]]:
    """``(generated, given)`` channel indices of a batch's ``image`` with
    ``num`` channels: contrasts and masks (``condition="mask"``), target
    and source contrasts (``"source"``), or all generated."""
    channels = list(range(num))
    if self.condition == "mask":
      n = len(config.data.contrasts)
      return channels[:n], channels[n:]
    if self.condition == "source":
      given, gen = pix2pix.channels(config)
      return gen, given
    return channels, []

  def hint(self, given: jax.Array) -> jax.Array:
    """The network's given channels for a caller's condition (a latent
    model folds full-size masks to its latents' size)."""
    return given

  def with_given(self, images: jax.Array, given: jax.Array) -> jax.Array:
    """Generated ``images [B, *S, C]`` with the given masks ``[B, *S, M]``
    as their mask channels."""
    return jnp.concatenate([images, given], axis=-1)

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """Initial state; ``batch`` only provides shapes."""
    x = jnp.zeros((1,) + self.image_shape, jnp.float32)
    given = jnp.zeros((1,) + self.image_shape[:-1] + (
        len(self.given_channels),), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = jnp.zeros((1,), jnp.int32) if self.conditional else None
    if self.control is not None:
      params = unet_lib.controlnet_init(
          self._frozen.tree["base"],
          self.control.init({"params": rng}, x, given, t, y)["params"])
    else:
      if self.given_channels:
        x = jnp.concatenate([x, given], axis=-1)
      params = self.model.init({"params": rng}, x, t, y,
                               train=False)["params"]
    return create_state(params, self.tx, use_ema=self.config.train.ema > 0)

  def draw(self, rng: jax.Array, batch: Batch) -> Batch:
    """The loss's randomness for a whole batch, per example: ``t [B]``,
    ``noise`` like the images, the (possibly dropped) labels ``y [B]`` and
    dropout keys ``[B]`` (a microbatch uses its first).

    Drawn once per batch, so a step split into microbatches sees the same
    noise as an unsplit one.
    """
    x0 = batch["image"][..., self.gen_channels]
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

  def network(self, params, frozen, x: jax.Array, given: Optional[jax.Array],
              t: jax.Array, y: Optional[jax.Array], train: bool = False,
              rngs=None) -> jax.Array:
    """The model's output for noisy ``x [B, *S, G]`` and the given channels
    ``[B, *S, K]`` (or ``None``): concatenated to ``x``, or, with a
    ControlNet, its hint for the frozen base model."""
    t = self.net_time(t)
    if self.control is not None:
      residuals = self.control.apply({"params": params}, x, given, t, y,
                                     train=train, rngs=rngs)
      return self.model.apply({"params": frozen["base"]}, x, t, y,
                              train=False, control=residuals)
    if given is not None:
      x = jnp.concatenate([x, given.astype(x.dtype)], axis=-1)
    return self.model.apply({"params": params}, x, t, y, train=train,
                            rngs=rngs)

  def frozen_inputs(self) -> Optional[frozen_lib.FrozenInputs]:
    """The base model of a ControlNet adapter (``None`` otherwise)."""
    return self._frozen

  def loss_given(self, params, batch: Batch, draws: Batch,
                 train: bool = True, frozen: PyTree = None) -> jax.Array:
    """Mean squared error of the ``eps|v`` prediction (or the flow's
    velocity) for given draws."""
    image = batch["image"].astype(jnp.float32)
    x0 = image[..., self.gen_channels]
    t, noise = draws["t"], draws["noise"]
    if self.flow:
      x_t = flow.interpolate(x0, noise, t)
      target = flow.velocity_target(x0, noise)
    else:
      x_t = schedules.q_sample(self.schedule, x0, t, noise)
      target = schedules.training_target(self.schedule, x0, t, noise,
                                         self.prediction)
    given = (image[..., self.given_channels] if self.given_channels
             else None)
    out = self.network(params, frozen, x_t, given, t, draws.get("y"),
                       train=train, rngs={"dropout": draws["dropout"][0]})
    return jnp.mean(jnp.square(out - target))

  def loss_fn(self, params, batch: Batch, rng: jax.Array,
              train: bool = True, frozen: PyTree = None) -> jax.Array:
    """Mean squared error of the ``eps|v`` prediction at uniform ``t``.

    ``train=False`` turns dropout off (validation loss); label dropout for
    classifier-free guidance is part of the objective and stays.
    """
    return self.loss_given(params, batch, self.draw(rng, batch), train,
                           frozen)

  def loss(self, state: TrainState, batch: Batch,
           rng: jax.Array) -> jax.Array:
    """The validation loss: :meth:`loss_fn` of ``state.params`` with
    dropout off."""
    return self.loss_fn(state.params, batch, rng, train=False,
                        frozen=state.frozen)

  def grad_step(self, state: TrainState, batch: Batch,
                rng: jax.Array) -> Tuple[PyTree, Metrics]:
    """The first half of :meth:`train_step`: the loss's gradients with
    respect to ``state.params``, accumulated over ``self.microbatches``
    microbatches, and ``{"loss"}``; pure and jit-able."""
    loss, grads = microbatch.mean_value_and_grad(
        lambda p, xs: self.loss_given(p, *xs, frozen=state.frozen),
        state.params,
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

  def denoise_fn(self, state: TrainState, num: int,
                 labels: Optional[jax.Array] = None,
                 given: Optional[jax.Array] = None):
    """The sampler's ``(x, t) -> output`` of the EMA network: guided when
    the model is class-conditional and ``sample.guidance_scale`` asks for
    it, with the conditioning channels ``given [num, *S, K]`` (masks or
    source contrasts) concatenated to ``x``.

    Every network call goes through ``model_fn``; on CPUs it runs in
    microbatches (``sample.microbatches``, auto as for training), whose
    activations stay in the caches. The guided call doubles the batch.
    """
    params = eval_params(state)
    s = self.config.sample
    scales = guidance_scales(s, self.num_classes)
    guided = self.conditional and any(w != 0 for w in scales)
    calls = 2 * num if guided else num
    n = microbatch.resolve(int(s.get("microbatches", 0)), calls,
                           jax.device_count(), jax.default_backend(),
                           key="sample.microbatches")
    net = microbatch.chunked(
        lambda x, g, t, y: self.network(params, state.frozen, x, g, t, y), n)

    def model_fn(x, t, y=None):
      g = None
      if given is not None:
        reps = x.shape[0] // given.shape[0]  # 2 for the guided batch
        g = jnp.concatenate([given.astype(x.dtype)] * reps)
      return net(x, g, t, y)

    if not self.conditional:
      return model_fn
    if not guided:
      # w = 0 is the conditional model: skip the doubled batch.
      return lambda x, t: model_fn(x, t, labels)
    w = jnp.asarray(scales, jnp.float32)[labels]  # [num]
    return samplers.guided_denoise_fn(model_fn, labels, w, self.num_classes)

  def _labels(self, num: int, cond) -> Optional[jax.Array]:
    if not self.conditional:
      if isinstance(cond, Mapping) and "label" in cond:
        raise ValueError("labels given to an unconditional model")
      return None
    if cond is None or (isinstance(cond, Mapping) and "label" not in cond):
      return jnp.arange(num, dtype=jnp.int32) % self.num_classes
    labels = cond["label"] if isinstance(cond, Mapping) else cond
    return jnp.asarray(labels, jnp.int32)

  def sample(self, state: TrainState, rng: jax.Array, num: int,
             cond: Optional[Union[Batch, jax.Array]] = None) -> Batch:
    """``num`` samples (static) with the EMA params when present.

    Args:
      state: training state.
      rng: PRNG key.
      num: number of samples.
      cond: for a class-conditional model, ``{"label": [num] int}`` (or the
        label array itself); ``None`` gives balanced labels
        ``i % num_classes``. A mask-conditioned model
        (``method.condition="mask"``) needs ``{"mask": [num, *S, M]}`` in
        ``{-1, 1}``.

    Returns:
      ``{"image": [num, *S, C (+ M)] float32 in [-1, 1]}`` (a
      mask-conditioned model returns the given masks as its mask channels)
      plus ``"label": [num] int32`` when class-conditional.
    """
    allowed = {"label"} | ({"mask"} if self.condition == "mask" else set())
    if isinstance(cond, Mapping) and set(cond) - allowed:
      raise ValueError(f"this model is conditioned on {sorted(allowed)}; "
                       f"got {sorted(cond)}")
    labels = self._labels(num, cond)
    given = None
    if self.condition == "mask":
      if not isinstance(cond, Mapping) or "mask" not in cond:
        raise ValueError("a mask-conditioned model samples for "
                         "cond={'mask': [num, *S, M]}")
      given = jnp.asarray(cond["mask"], jnp.float32)
    x = self.solve(self.denoise_fn(
        state, num, labels, None if given is None else self.hint(given)),
                   rng, (num,) + self.image_shape)
    out = {"image": self.finish(state, x)}
    if given is not None:
      out["image"] = self.with_given(out["image"], given)
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


METHOD_KEYS = ("name", "objective", "condition", "controlnet", "schedule",
               "timesteps", "prediction", "p_uncond")
SAMPLE_KEYS = ("sampler", "steps", "eta", "guidance_scale",
               "guidance_per_class", "num", "batch_size")
OPTIONAL_SAMPLE_KEYS = ("microbatches", "clip_x0", "cost_steps")


def config_errors(config: ml_collections.ConfigDict) -> List[str]:
  """Problems of the ``method``, ``model`` and ``sample`` sections."""
  return diffusion_errors(config, config.data.res, METHOD_KEYS, "ddpm")


def _controlnet_errors(config: ml_collections.ConfigDict,
                       who: str) -> List[str]:
  """Whether ``method.controlnet`` names a base run this adapter fits: a
  ``who`` (ddpm or ldm) run with no condition, the same network, data and
  process."""
  me = config.method
  if me.condition != "mask":
    return [f"method.controlnet needs method.condition='mask' (the hint), "
            f"got {me.condition!r}"]
  try:
    with open(os.path.join(str(me.controlnet), "config.json")) as f:
      base = json.load(f)
  except (OSError, ValueError):
    return [f"method.controlnet={me.controlnet}: no readable config.json; "
            "train the base model there first"]
  errors = []
  bm = base.get("method", {})
  if bm.get("name") != who or bm.get("condition", "none") != "none":
    errors.append(f"method.controlnet: the base run is a "
                  f"{bm.get('name')!r} with condition "
                  f"{bm.get('condition', 'none')!r}; it must be a {who} "
                  "with condition 'none'")
  for section, keys in (("model", unet_lib.MODEL_KEYS),
                        ("data", ("res", "spatial_dims", "contrasts", "cond",
                                  "num_classes")),
                        ("method", ("objective", "prediction", "schedule",
                                    "timesteps"))):
    errors += [f"method.controlnet: {section}.{k} is {here!r} here but "
               f"{there!r} in the base run" for k, here, there in
               checks.differences(config[section], base.get(section, {}),
                                  keys)]
  return errors


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
    checks.one_of(errors, "method.condition", me.condition,
                  tuple(CONDITIONS))
    if me.condition == "mask" and not d.get("mask_channels"):
      errors.append("method.condition='mask' needs data.mask_channels (the "
                    "masks to generate from)")
    if me.condition == "source":
      errors += pix2pix.translation_errors(config)
    if me.controlnet:
      errors += _controlnet_errors(config, who)
    checks.one_of(errors, "method.schedule", me.schedule,
                  ("linear", "cosine"))
    checks.one_of(errors, "method.prediction", me.prediction, ("eps", "v"))
    checks.positive(errors, "method.timesteps", me.timesteps)
    checks.in_range(errors, "method.p_uncond", me.p_uncond, 0.0, 1.0)
  given = {k: v for k, v in s.items() if k not in OPTIONAL_SAMPLE_KEYS}
  if not checks.section_keys(errors, "sample", given, SAMPLE_KEYS, who):
    return errors
  objective = me.get("objective")
  if (objective == "diffusion" and me.get("prediction") == "eps" and
      not s.get("clip_x0", True)):
    # x0 = (x - sqrt(1 - abar) eps) / sqrt(abar): near t = T, sqrt(abar) is
    # 5e-5 (cosine) or 6e-3 (linear), so without the clip to [-1, 1] the
    # samplers' x0 estimates carry the eps error times 160-20000.
    errors.append("method.prediction='eps' with sample.clip_x0=False: the "
                  "x0 estimates diverge near pure noise; use "
                  "method.prediction='v' or method.objective="
                  "'rectified_flow' (unbounded data such as latents)")
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


class MaskToImageDDPM(DDPM):
  """A diffusion model of the contrasts given the lesion masks
  (``method.condition="mask"``): any real or edited mask yields a paired
  segmentation example."""

  sample_cond = ("mask",)


class TranslatorDDPM(DDPM):
  """Image-conditioned diffusion for translation (Palette, Saharia et al.
  2022; ``method.condition="source"``): the target contrasts generated
  given the source ones; ``translate`` instead of ``sample``."""

  # A translator has no unconditional samples to give (methods.has).
  sample = None

  def translate(self, state: TrainState, batch: Batch,
                rng: jax.Array) -> Batch:
    """``{"image": [B, *S, len(target)]}`` for ``batch["source"] [B, *S,
    len(source)]``, with the configured sampler (labels from
    ``batch["label"]`` when class-conditional)."""
    source = jnp.asarray(batch["source"], jnp.float32)
    num = source.shape[0]
    labels = self._labels(num, {"label": batch["label"]}
                          if "label" in batch else None)
    x = self.solve(self.denoise_fn(state, num, labels, source), rng,
                   (num,) + self.image_shape)
    return {"image": self.finish(state, x)}


CONDITIONS = {"none": DDPM, "mask": MaskToImageDDPM,
              "source": TranslatorDDPM}


def make(config: ml_collections.ConfigDict, example_batch: Batch) -> DDPM:
  """Builds the method; image shape comes from ``example_batch["image"]``."""
  cls = CONDITIONS[config.method.get("condition", "none")]
  return cls(config, tuple(example_batch["image"].shape[1:]))
