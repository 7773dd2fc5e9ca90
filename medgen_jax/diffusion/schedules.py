"""Discrete-time Gaussian diffusion: beta schedules and prediction algebra.

Notation (Ho et al., 2020): ``ab_t = prod_{s<=t} (1 - beta_s)``, timesteps
``t = 0 .. T-1``, and the forward process
``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps``. The velocity target of Salimans
& Ho (2022) is ``v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0``.

Per-timestep terms are float32 arrays of shape ``[T]``; functions taking
``t [B]`` broadcast them against images ``[B, ...]``.
"""

from typing import Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np


def linear_betas(timesteps: int) -> np.ndarray:
  """Linear betas of Ho et al. (1e-4 .. 0.02 at T=1000), float64 ``[T]``.

  The endpoints are scaled by ``1000 / T`` (as in Nichol & Dhariwal) so that
  other ``T`` give a comparable total amount of noise.
  """
  scale = 1000.0 / timesteps
  return np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)


def cosine_betas(timesteps: int, s: float = 0.008,
                 max_beta: float = 0.999) -> np.ndarray:
  """Cosine schedule of Nichol & Dhariwal (2021), float64 ``[T]``.

  ``ab(t) = f(t) / f(0)`` with ``f(t) = cos((t / T + s) / (1 + s) * pi / 2)^2``;
  betas are clipped at ``max_beta`` to avoid the singularity at ``t = T``.
  """
  steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
  f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
  return np.clip(1.0 - f[1:] / f[:-1], 0.0, max_beta)


@flax.struct.dataclass
class DiffusionSchedule:
  """All per-timestep constants of a discrete diffusion, float32 ``[T]``.

  ``posterior_*`` describe ``q(x_{t-1} | x_t, x0) = N(coef1 x0 + coef2 x_t,
  posterior_variance)``; the log-variance is clipped at ``t = 0`` (where the
  variance is 0) by reusing the value at ``t = 1``.
  """

  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def make_schedule(name: str, timesteps: int = 1000) -> DiffusionSchedule:
  """Builds ``linear`` or ``cosine`` constants (computed in float64)."""
  if name == "linear":
    betas = linear_betas(timesteps)
  elif name == "cosine":
    betas = cosine_betas(timesteps)
  else:
    raise ValueError(f"schedule must be linear|cosine, got {name!r}")
  alphas = 1.0 - betas
  ab = np.cumprod(alphas)
  ab_prev = np.append(1.0, ab[:-1])
  post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
  post_logvar = np.log(np.append(post_var[1], post_var[1:]))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return DiffusionSchedule(
      betas=f32(betas),
      alphas_cumprod=f32(ab),
      alphas_cumprod_prev=f32(ab_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(ab)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ab)),
      sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / ab)),
      sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / ab - 1.0)),
      posterior_variance=f32(post_var),
      posterior_log_variance_clipped=f32(post_logvar),
      posterior_mean_coef1=f32(betas * np.sqrt(ab_prev) / (1.0 - ab)),
      posterior_mean_coef2=f32((1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab)),
  )


def extract(a: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """Gathers ``a[t]`` (``t [B]``) as ``[B, 1, ...]`` with ``ndim`` axes."""
  return a[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def q_sample(schedule: DiffusionSchedule, x0: jax.Array, t: jax.Array,
             noise: jax.Array) -> jax.Array:
  """Forward process ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise``."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0 +
          extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def predict_x0_from_eps(schedule: DiffusionSchedule, x_t: jax.Array,
                        t: jax.Array, eps: jax.Array) -> jax.Array:
  """``x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)``."""
  return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t -
          extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)


def predict_eps_from_x0(schedule: DiffusionSchedule, x_t: jax.Array,
                        t: jax.Array, x0: jax.Array) -> jax.Array:
  """``eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)``."""
  return ((extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0)
          / extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))


def v_target(schedule: DiffusionSchedule, x0: jax.Array, t: jax.Array,
             noise: jax.Array) -> jax.Array:
  """``v = sqrt(ab) noise - sqrt(1 - ab) x0``."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * noise -
          extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def x0_from_v(schedule: DiffusionSchedule, x_t: jax.Array, t: jax.Array,
              v: jax.Array) -> jax.Array:
  """``x0 = sqrt(ab) x_t - sqrt(1 - ab) v``."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * x_t -
          extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v)


def eps_from_v(schedule: DiffusionSchedule, x_t: jax.Array, t: jax.Array,
               v: jax.Array) -> jax.Array:
  """``eps = sqrt(1 - ab) x_t + sqrt(ab) v``."""
  return (extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t +
          extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * v)


def to_x0_eps(schedule: DiffusionSchedule, x_t: jax.Array, t: jax.Array,
              output: jax.Array,
              prediction: str) -> Tuple[jax.Array, jax.Array]:
  """Turns a network ``output`` of type ``eps|v|x0`` into ``(x0, eps)``."""
  if prediction == "eps":
    return predict_x0_from_eps(schedule, x_t, t, output), output
  if prediction == "v":
    return (x0_from_v(schedule, x_t, t, output),
            eps_from_v(schedule, x_t, t, output))
  if prediction == "x0":
    return output, predict_eps_from_x0(schedule, x_t, t, output)
  raise ValueError(f"prediction must be eps|v|x0, got {prediction!r}")


def training_target(schedule: DiffusionSchedule, x0: jax.Array, t: jax.Array,
                    noise: jax.Array, prediction: str) -> jax.Array:
  """The regression target for a network predicting ``eps|v|x0``."""
  if prediction == "eps":
    return noise
  if prediction == "v":
    return v_target(schedule, x0, t, noise)
  if prediction == "x0":
    return x0
  raise ValueError(f"prediction must be eps|v|x0, got {prediction!r}")


def q_posterior_mean(schedule: DiffusionSchedule, x0: jax.Array,
                     x_t: jax.Array, t: jax.Array) -> jax.Array:
  """Mean of ``q(x_{t-1} | x_t, x0)``."""
  return (extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x0 +
          extract(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t)
