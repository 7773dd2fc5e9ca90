"""Rectified flow / flow matching (Liu et al. 2023; Lipman et al. 2023).

The straight path between an image and Gaussian noise,
``x_t = (1 - t) x0 + t noise`` for ``t`` in ``[0, 1]``; the network predicts
the velocity ``dx_t/dt = noise - x0`` and sampling integrates the ODE from
``t = 1`` (noise) to ``t = 0``. In the ``(alpha, sigma)`` language of
diffusion, ``alpha_t = 1 - t`` and ``sigma_t = t``, so DPM-Solver++ applies
unchanged (:func:`medgen_jax.diffusion.samplers.dpm_solver_pp_2m`).

The network sees ``TIME_SCALE * t``: the sinusoidal time embedding is tuned
for the ``[0, 1000]`` range of discrete timesteps.
"""

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medgen_jax.diffusion import samplers

TIME_SCALE = 1000.0
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def _bcast(t: jax.Array, ndim: int) -> jax.Array:
  return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """``x_t = (1 - t) x0 + t noise``; ``t [B]`` in ``[0, 1]``."""
  t = _bcast(t, x0.ndim)
  return (1.0 - t) * x0 + t * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
  """The regression target ``noise - x0``."""
  return noise - x0


def x0_from_velocity(x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  """``x0 = x_t - t v`` (``t [B]``)."""
  return x_t - _bcast(t, x_t.ndim) * v


def times(num_steps: int) -> np.ndarray:
  """``num_steps + 1`` knots from ``1`` (noise) down to ``0`` (clean)."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  return np.linspace(1.0, 0.0, num_steps + 1)


def euler_sample(velocity_fn: VelocityFn, rng: jax.Array,
                 shape: Sequence[int], num_steps: int = 50,
                 clip_x0: bool = True,
                 x_init: Optional[jax.Array] = None) -> jax.Array:
  """Euler integration of the flow ODE from ``t = 1`` to ``t = 0``.

  Args:
    velocity_fn: ``(x_t [B, ...], t [B] float in [0, 1]) -> velocity``.
    rng: PRNG key for the starting noise.
    shape: ``[B, *spatial, C]``.
    num_steps: network evaluations.
    clip_x0: clip the implied ``x0`` to ``[-1, 1]`` at every step.
    x_init: optional starting noise.

  Returns:
    ``[B, *spatial, C]`` float32 samples.
  """
  ts = times(num_steps)
  x = (jax.random.normal(rng, shape, jnp.float32) if x_init is None
       else x_init.astype(jnp.float32))

  def step(x, inputs):
    t, t_next = inputs
    tb = jnp.full((shape[0],), t, jnp.float32)
    v = velocity_fn(x, tb)
    if clip_x0:
      # Clip the data estimate, keep the noise estimate: the same update
      # as DDIM's with a clipped x0.
      x0 = jnp.clip(x0_from_velocity(x, tb, v), -1.0, 1.0)
      eps = x + (1.0 - t) * v
      v = eps - x0
    return x + (t_next - t) * v, None

  x, _ = jax.lax.scan(step, x, (jnp.asarray(ts[:-1], jnp.float32),
                                jnp.asarray(ts[1:], jnp.float32)))
  return x


def dpm_solver_pp_sample(velocity_fn: VelocityFn, rng: jax.Array,
                         shape: Sequence[int], num_steps: int = 20,
                         clip_x0: bool = True,
                         x_init: Optional[jax.Array] = None) -> jax.Array:
  """DPM-Solver++(2M) on the flow's straight path (``alpha = 1 - t``,
  ``sigma = t``), on the knots of :func:`times`."""
  ts = times(num_steps)
  ts_j = jnp.asarray(ts, jnp.float32)
  x = (jax.random.normal(rng, shape, jnp.float32) if x_init is None
       else x_init.astype(jnp.float32))

  def x0_fn(x, i):
    tb = jnp.full((shape[0],), ts_j[i], jnp.float32)
    x0 = x0_from_velocity(x, tb, velocity_fn(x, tb))
    return jnp.clip(x0, -1.0, 1.0) if clip_x0 else x0

  return samplers.dpm_solver_pp_2m(x0_fn, 1.0 - ts, ts, x)
