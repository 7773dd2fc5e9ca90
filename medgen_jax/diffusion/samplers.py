"""Ancestral DDPM, DDIM and DPM-Solver++(2M) samplers, and classifier-free
guidance.

Samplers loop with ``jax.lax.scan`` so a whole sampling run jits into one
program. They take ``denoise_fn(x_t [B, ...], t [B] int32) -> output`` where
``output`` is the network prediction of type ``prediction`` (eps|v|x0).

Classifier-free guidance convention (Ho & Salimans, 2022, with ``w`` as in
their paper): ``out = out_uncond + (1 + w) (out_cond - out_uncond)``, so
``w = 0`` is the plain conditional model and ``w > 0`` sharpens towards the
condition. Guiding the raw output is the same for eps, v and x0 predictions
because each is affine in the others with weights that sum to one.
"""

from typing import Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from medgen_jax.diffusion import schedules as sch

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def _maybe_clip(x0: jax.Array, clip_x0: bool) -> jax.Array:
  return jnp.clip(x0, -1.0, 1.0) if clip_x0 else x0


def ddpm_sample(denoise_fn: DenoiseFn, schedule: sch.DiffusionSchedule,
                rng: jax.Array, shape: Sequence[int], prediction: str = "eps",
                clip_x0: bool = True,
                x_init: Optional[jax.Array] = None) -> jax.Array:
  """Ancestral sampling through all ``T`` steps (Ho et al., Alg. 2).

  Uses the posterior ``q(x_{t-1} | x_t, x0_hat)`` with its (clipped) variance;
  no noise is added at the last step.

  Args:
    denoise_fn: ``(x_t, t) -> prediction``.
    schedule: diffusion constants.
    rng: PRNG key.
    shape: ``[B, *spatial, C]`` of the samples.
    prediction: ``eps|v|x0``, what ``denoise_fn`` returns.
    clip_x0: clip the predicted ``x0`` to ``[-1, 1]`` at every step.
    x_init: optional ``x_{T-1}`` ``[B, ...]``; standard normal when ``None``.

  Returns:
    ``[B, *spatial, C]`` float32 samples.
  """
  num_t = schedule.num_timesteps
  init_key, loop_key = jax.random.split(rng)
  x = (jax.random.normal(init_key, shape, jnp.float32) if x_init is None
       else x_init.astype(jnp.float32))
  ts = jnp.arange(num_t - 1, -1, -1, dtype=jnp.int32)
  keys = jax.random.split(loop_key, num_t)

  def step(x, inputs):
    t, key = inputs
    tb = jnp.full((shape[0],), t, jnp.int32)
    x0, _ = sch.to_x0_eps(schedule, x, tb, denoise_fn(x, tb), prediction)
    mean = sch.q_posterior_mean(schedule, _maybe_clip(x0, clip_x0), x, tb)
    std = jnp.exp(0.5 * schedule.posterior_log_variance_clipped[t])
    noise = jax.random.normal(key, x.shape, jnp.float32)
    return mean + jnp.where(t > 0, std, 0.0) * noise, None

  x, _ = jax.lax.scan(step, x, (ts, keys))
  return x


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """``num_steps`` evenly spaced timesteps from ``T-1`` down to ``0``, int32."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}], "
                     f"got {num_steps}")
  # Descending, so one step starts from T-1 (pure noise), not from t = 0.
  return np.round(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int32)


def ddim_sample(denoise_fn: DenoiseFn, schedule: sch.DiffusionSchedule,
                rng: jax.Array, shape: Sequence[int], num_steps: int = 50,
                eta: float = 0.0, prediction: str = "eps",
                clip_x0: bool = True,
                x_init: Optional[jax.Array] = None) -> jax.Array:
  """DDIM (Song et al., 2021) on ``num_steps`` evenly spaced timesteps.

  ``eta = 0`` is the deterministic DDIM ODE; ``eta = 1`` matches the ancestral
  sampler's variance on the sub-sequence. The last step returns ``x0_hat``.

  Args:
    denoise_fn: ``(x_t, t) -> prediction``.
    schedule: diffusion constants.
    rng: PRNG key.
    shape: ``[B, *spatial, C]`` of the samples.
    num_steps: static number of network evaluations, ``<= T``.
    eta: stochasticity (may be traced).
    prediction: ``eps|v|x0``, what ``denoise_fn`` returns.
    clip_x0: clip the predicted ``x0`` to ``[-1, 1]`` (eps is then recomputed
      from the clipped ``x0`` so the update stays consistent).
    x_init: optional starting ``x_{T-1}``; standard normal when ``None``.

  Returns:
    ``[B, *spatial, C]`` float32 samples.
  """
  ts = ddim_timesteps(schedule.num_timesteps, num_steps)
  ab = schedule.alphas_cumprod
  ab_t = ab[ts]
  # The step after t = ts[-1] (= 0) lands on the clean image: ab_prev = 1.
  ab_prev = jnp.concatenate([ab[ts[1:]], jnp.ones((1,), ab.dtype)])
  init_key, loop_key = jax.random.split(rng)
  x = (jax.random.normal(init_key, shape, jnp.float32) if x_init is None
       else x_init.astype(jnp.float32))
  keys = jax.random.split(loop_key, num_steps)

  def step(x, inputs):
    t, a, a_prev, key = inputs
    tb = jnp.full((shape[0],), t, jnp.int32)
    x0, eps = sch.to_x0_eps(schedule, x, tb, denoise_fn(x, tb), prediction)
    if clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
      eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
    sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
    dir_coef = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma**2, 0.0))
    noise = jax.random.normal(key, x.shape, jnp.float32)
    return jnp.sqrt(a_prev) * x0 + dir_coef * eps + sigma * noise, None

  x, _ = jax.lax.scan(step, x, (jnp.asarray(ts), ab_t, ab_prev, keys))
  return x


def drop_labels(rng: jax.Array, labels: jax.Array, p_uncond: float,
                null_label: int) -> jax.Array:
  """Replaces each label by ``null_label`` with probability ``p_uncond``.

  Training-time half of classifier-free guidance: one network learns both
  the conditional and the unconditional (null-label) model.

  Args:
    rng: PRNG key.
    labels: ``[B]`` int labels.
    p_uncond: drop probability.
    null_label: the extra "no condition" class index.

  Returns:
    ``[B]`` int32 labels.
  """
  drop = jax.random.bernoulli(rng, p_uncond, labels.shape)
  return jnp.where(drop, null_label, labels).astype(jnp.int32)


def guided_denoise_fn(model_fn: Callable[[jax.Array, jax.Array, jax.Array],
                                         jax.Array],
                      labels: jax.Array,
                      guidance_scale: Union[float, jax.Array],
                      null_label: int) -> DenoiseFn:
  """Classifier-free guided ``denoise_fn`` for a label-conditional model.

  The conditional and unconditional outputs come from ONE network call on the
  batch concatenated with itself (null labels in the second half).

  Args:
    model_fn: ``(x_t [B, ...], t [B], y [B]) -> output [B, ...]``.
    labels: ``[B]`` int labels to condition on.
    guidance_scale: ``w``, a number or one per example ``[B]``; ``0``
      gives the conditional output.
    null_label: the "no condition" class index.

  Returns:
    ``denoise_fn(x_t, t) = out_u + (1 + w) (out_c - out_u)``.
  """
  y = jnp.concatenate([labels, jnp.full_like(labels, null_label)])

  def denoise_fn(x: jax.Array, t: jax.Array) -> jax.Array:
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), y)
    out_c, out_u = jnp.split(out, 2)
    w = jnp.asarray(guidance_scale, out.dtype)
    w = w.reshape(w.shape + (1,) * (out.ndim - w.ndim)) if w.ndim else w
    return out_u + (1.0 + w) * (out_c - out_u)

  return denoise_fn


# ------------------------------------------------------ DPM-Solver++ (2M) --


def dpm_solver_pp_coefficients(alphas: np.ndarray, sigmas: np.ndarray
                               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-step constants of DPM-Solver++(2M) on given knots.

  Knot ``i`` has ``x_i = alpha_i x0 + sigma_i eps``; the last knot is the
  clean image (``alpha = 1, sigma = 0``). Step ``i`` (``0 <= i < N``)::

    D   = (1 + c_i) x0_hat_i - c_i x0_hat_{i-1}
    x_{i+1} = a_i x_i + b_i D

  with ``a_i = sigma_{i+1} / sigma_i``, ``b_i = alpha_{i+1} (1 - e^{-h_i})``,
  ``h_i = lambda_{i+1} - lambda_i`` (``lambda = log(alpha / sigma)``) and
  ``c_i = h_i / (2 h_{i-1})``; ``c = 0`` (first order, i.e. DDIM) at the
  first step and at the last (Lu et al. 2022, "lower order final", which
  keeps few-step sampling stable).

  Args:
    alphas, sigmas: ``[N + 1]`` knots, ``sigmas[0] > 0``, ``sigmas[-1] = 0``.

  Returns:
    ``(a, b, c)``, each ``[N]`` float32.
  """
  al = np.asarray(alphas, np.float64)
  sg = np.asarray(sigmas, np.float64)
  if sg[0] <= 0 or sg[-1] != 0 or al[-1] != 1:
    raise ValueError("knots must start noisy (sigma > 0) and end clean "
                     "(alpha = 1, sigma = 0)")
  with np.errstate(divide="ignore", invalid="ignore"):
    lam = np.log(al) - np.log(sg)  # -inf at alpha = 0, +inf at sigma = 0
    h = lam[1:] - lam[:-1]
    # e^{-h_i} = alpha_i sigma_{i+1} / (sigma_i alpha_{i+1}): finite at the
    # ends where lambda is not.
    exp_neg_h = al[:-1] * sg[1:] / (sg[:-1] * al[1:])
    c = np.zeros_like(h)
    c[1:] = h[1:] / (2.0 * h[:-1])
  c[~np.isfinite(c)] = 0.0
  c[-1] = 0.0
  a = sg[1:] / sg[:-1]
  b = al[1:] * (1.0 - exp_neg_h)
  return tuple(np.asarray(v, np.float32) for v in (a, b, c))


def dpm_solver_pp_2m(x0_fn: Callable[[jax.Array, jax.Array], jax.Array],
                     alphas: np.ndarray, sigmas: np.ndarray,
                     x_init: jax.Array) -> jax.Array:
  """DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver of
  the probability-flow ODE in the data prediction, one network evaluation
  per step; first order it is DDIM with ``eta = 0``.

  Args:
    x0_fn: ``(x [B, ...], i int32 scalar) -> x0_hat [B, ...]``, the (guided,
      possibly clipped) data prediction at knot ``i``.
    alphas, sigmas: ``[N + 1]`` knots (see
      :func:`dpm_solver_pp_coefficients`); ``N`` network evaluations.
    x_init: ``[B, ...]`` the sample at knot 0.

  Returns:
    ``[B, ...]`` float32 samples at the last (clean) knot.
  """
  a, b, c = dpm_solver_pp_coefficients(alphas, sigmas)
  n = len(a)

  def step(carry, inputs):
    x, prev = carry
    i, ai, bi, ci = inputs
    d = x0_fn(x, i)
    x_next = ai * x + bi * ((1.0 + ci) * d - ci * prev)
    return (x_next, d), None

  x = x_init.astype(jnp.float32)
  (x, _), _ = jax.lax.scan(step, (x, jnp.zeros_like(x)),
                           (jnp.arange(n, dtype=jnp.int32), jnp.asarray(a),
                            jnp.asarray(b), jnp.asarray(c)))
  return x


# Below this log-SNR (alpha / sigma < e^-5) the image is invisible in x_t:
# knots spent there are wasted, and a cosine schedule reaches -10 at T - 1.
LAMBDA_MIN = -5.0


def dpm_solver_timesteps(schedule: sch.DiffusionSchedule,
                         num_steps: int) -> np.ndarray:
  """``num_steps`` distinct timesteps from ``T - 1`` down to ``0``, evenly
  spaced in log-SNR ``lambda = log(alpha / sigma)`` above
  :data:`LAMBDA_MIN` (the spacing DPM-Solver recommends for pixel space:
  equal ``h`` per step keeps the multistep extrapolation small, where even
  spacing in ``t`` makes the last step into ``t = 0`` several times longer
  than the one before it); int32, descending.
  """
  num_t = schedule.num_timesteps
  if not 1 <= num_steps <= num_t:
    raise ValueError(f"num_steps must be in [1, {num_t}], got {num_steps}")
  ab = np.asarray(schedule.alphas_cumprod, np.float64)
  lam = 0.5 * (np.log(ab) - np.log1p(-ab))  # decreasing in t
  target = np.linspace(max(lam[-1], LAMBDA_MIN), lam[0], num_steps)
  ts = np.round(np.interp(target, lam[::-1],
                          np.arange(num_t - 1, -1, -1))).astype(np.int64)
  ts[0] = num_t - 1
  for i in range(1, num_steps):  # distinct: no evaluation is wasted
    ts[i] = min(ts[i], ts[i - 1] - 1)
  ts[-1] = max(ts[-1], 0)
  for i in range(num_steps - 2, -1, -1):
    ts[i] = max(ts[i], ts[i + 1] + 1)
  return ts.astype(np.int32)


def dpm_solver_pp_sample(denoise_fn: DenoiseFn,
                         schedule: sch.DiffusionSchedule, rng: jax.Array,
                         shape: Sequence[int], num_steps: int = 20,
                         prediction: str = "eps", clip_x0: bool = True,
                         x_init: Optional[jax.Array] = None) -> jax.Array:
  """DPM-Solver++(2M) for a discrete diffusion model, on the timesteps of
  :func:`dpm_solver_timesteps`.

  Args:
    denoise_fn: ``(x_t, t [B] int32) -> prediction``.
    schedule: diffusion constants.
    rng: PRNG key (the starting noise only: the solver is deterministic).
    shape: ``[B, *spatial, C]``.
    num_steps: network evaluations, ``<= T``.
    prediction: ``eps|v|x0``.
    clip_x0: clip every data prediction to ``[-1, 1]``.
    x_init: optional starting ``x_{T-1}``.

  Returns:
    ``[B, *spatial, C]`` float32 samples.
  """
  ts = dpm_solver_timesteps(schedule, num_steps)
  ab = np.asarray(schedule.alphas_cumprod, np.float64)[ts]
  alphas = np.append(np.sqrt(ab), 1.0)
  sigmas = np.append(np.sqrt(1.0 - ab), 0.0)
  ts_j = jnp.asarray(ts)
  x = (jax.random.normal(rng, shape, jnp.float32) if x_init is None
       else x_init)

  def x0_fn(x, i):
    tb = jnp.full((shape[0],), ts_j[i], jnp.int32)
    x0, _ = sch.to_x0_eps(schedule, x, tb, denoise_fn(x, tb), prediction)
    return _maybe_clip(x0, clip_x0)

  return dpm_solver_pp_2m(x0_fn, alphas, sigmas, x)
