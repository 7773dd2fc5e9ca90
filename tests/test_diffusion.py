"""Tests for medgen_jax.diffusion: schedules, prediction algebra, samplers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax.diffusion import flow
from medgen_jax.diffusion import samplers
from medgen_jax.diffusion import schedules as sch

T = 1000


@pytest.fixture(scope="module", params=["linear", "cosine"])
def schedule(request):
  return sch.make_schedule(request.param, T)


@pytest.fixture(scope="module")
def cosine():
  return sch.make_schedule("cosine", T)


def test_schedule_shapes_and_ranges(schedule):
  for name in schedule.__dataclass_fields__:
    a = getattr(schedule, name)
    assert a.shape == (T,) and a.dtype == jnp.float32, name
    assert np.isfinite(np.asarray(a)).all(), name
  betas = np.asarray(schedule.betas)
  ab = np.asarray(schedule.alphas_cumprod)
  assert ((betas > 0) & (betas < 1)).all()
  assert (np.diff(ab) < 0).all() and 0 < ab[-1] < ab[0] < 1
  assert schedule.num_timesteps == T
  assert (np.asarray(schedule.posterior_variance) >= 0).all()
  assert schedule.posterior_variance[0] == 0
  np.testing.assert_allclose(schedule.posterior_log_variance_clipped[0],
                             np.log(schedule.posterior_variance[1]), rtol=1e-6)
  np.testing.assert_allclose(
      schedule.sqrt_alphas_cumprod**2 + schedule.sqrt_one_minus_alphas_cumprod
      **2, 1.0, rtol=1e-6)
  # Posterior mean of x_{t-1} at t=0 is exactly x0.
  np.testing.assert_allclose(schedule.posterior_mean_coef1[0], 1.0, rtol=1e-6)
  assert schedule.posterior_mean_coef2[0] == 0


def test_schedule_endpoints():
  lin = sch.linear_betas(T)
  np.testing.assert_allclose([lin[0], lin[-1]], [1e-4, 0.02])
  cos = sch.make_schedule("cosine", T)
  # Nichol & Dhariwal: ab(0) ~ 1, ab(T) ~ 0, betas capped at 0.999.
  assert cos.alphas_cumprod[0] > 0.9999
  assert cos.alphas_cumprod[-1] < 1e-6
  np.testing.assert_allclose(cos.betas[-1], 0.999, rtol=1e-6)
  # Cosine ab is close to the closed form away from the clipped end.
  t = np.arange(1, T + 1) / T
  f = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(
      0.008 / 1.008 * np.pi / 2) ** 2
  np.testing.assert_allclose(cos.alphas_cumprod[:-1], f[:-1], rtol=1e-4,
                             atol=1e-7)
  with pytest.raises(ValueError):
    sch.make_schedule("quadratic", T)


def test_q_sample_statistics(cosine):
  n = 20_000
  x0 = jnp.full((n, 2, 2, 1), 0.5)
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  for t in (0, 300, 700, T - 1):
    tb = jnp.full((n,), t)
    x_t = np.asarray(sch.q_sample(cosine, x0, tb, noise))
    ab = float(cosine.alphas_cumprod[t])
    np.testing.assert_allclose(x_t.mean(), np.sqrt(ab) * 0.5, atol=0.01)
    np.testing.assert_allclose(x_t.std(), np.sqrt(1 - ab), rtol=0.02,
                               atol=1e-4)


def test_prediction_conversions_round_trip(schedule):
  rng = np.random.default_rng(1)
  n = 256
  x0 = rng.uniform(-1, 1, (n, 4, 4, 2)).astype(np.float32)
  eps = rng.normal(size=x0.shape).astype(np.float32)
  t = np.linspace(0, T - 1, n).astype(np.int32)
  # eps -> x0 divides by sqrt(ab) ~ 0 at the end of the cosine schedule.
  m = n * 9 // 10

  @jax.jit
  def convert(x0, eps, t):
    x_t = sch.q_sample(schedule, x0, t, eps)
    v = sch.v_target(schedule, x0, t, eps)
    xm, tm = x_t[:m], t[:m]
    return dict(
        v=v,
        eps_from_v=sch.eps_from_v(schedule, x_t, t, v),
        x0_from_v=sch.x0_from_v(schedule, x_t, t, v),
        v_via=sch.to_x0_eps(schedule, x_t, t, v, "v"),
        eps_via=sch.to_x0_eps(schedule, xm, tm, eps[:m], "eps"),
        x0_via=sch.to_x0_eps(schedule, xm, tm, x0[:m], "x0"),
        targets=[sch.training_target(schedule, x0, t, eps, p)
                 for p in ("eps", "v", "x0")])

  r = convert(x0, eps, t)
  tol = dict(rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(r["eps_from_v"], eps, **tol)
  np.testing.assert_allclose(r["x0_from_v"], x0, **tol)
  for got_x0, got_eps in (r["v_via"], r["eps_via"], r["x0_via"]):
    k = got_x0.shape[0]
    np.testing.assert_allclose(got_x0, x0[:k], **tol)
    np.testing.assert_allclose(got_eps, eps[:k], **tol)
  for got, want in zip(r["targets"], (eps, r["v"], x0)):
    np.testing.assert_array_equal(got, want)
  # v is the unit-variance target: sqrt(ab) eps - sqrt(1 - ab) x0.
  ab = np.asarray(schedule.alphas_cumprod)[t][:, None, None, None]
  np.testing.assert_allclose(r["v"], np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0,
                             **tol)
  with pytest.raises(ValueError):
    sch.to_x0_eps(schedule, x0, t, eps, "score")


def test_ddim_timesteps():
  ts = samplers.ddim_timesteps(T, 50)
  assert ts.shape == (50,) and ts[0] == T - 1 and ts[-1] == 0
  assert (np.diff(ts) < 0).all()
  np.testing.assert_array_equal(samplers.ddim_timesteps(10, 10),
                                np.arange(9, -1, -1))
  assert samplers.ddim_timesteps(T, 1).tolist() == [T - 1]
  with pytest.raises(ValueError):
    samplers.ddim_timesteps(T, T + 1)


def _oracle(schedule, x0, prediction):
  """The exact denoiser when the data set is the single image ``x0``."""

  def denoise_fn(x_t, t):
    eps = sch.predict_eps_from_x0(schedule, x_t, t, x0)
    return eps if prediction == "eps" else sch.v_target(schedule, x0, t, eps)

  return denoise_fn


X0 = jnp.asarray(np.linspace(-0.9, 0.9, 2 * 8 * 8).reshape(2, 8, 8, 1),
                 jnp.float32)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_samplers_recover_single_image_with_oracle(cosine, prediction):
  fn = _oracle(cosine, X0, prediction)
  ddim = jax.jit(functools.partial(samplers.ddim_sample, fn, cosine,
                                   shape=X0.shape, num_steps=20,
                                   prediction=prediction))
  for eta in (0.0, 1.0):
    np.testing.assert_allclose(ddim(jax.random.key(0), eta=eta), X0,
                               atol=1e-4)
  if prediction == "eps":  # The ancestral sampler shares to_x0_eps with DDIM.
    ddpm = jax.jit(functools.partial(samplers.ddpm_sample, fn, cosine,
                                     shape=X0.shape, prediction=prediction))
    np.testing.assert_allclose(ddpm(jax.random.key(0)), X0, atol=1e-4)


def test_ddim_eta0_is_deterministic(cosine):
  # A smooth non-oracle denoiser, so the trajectory depends on x_T.
  fn = lambda x, t: 0.5 * jnp.tanh(x) + 1e-4 * t[:, None, None, None]
  x_init = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
  run = jax.jit(lambda rng, eta: samplers.ddim_sample(
      fn, cosine, rng, x_init.shape, num_steps=10, eta=eta, x_init=x_init))
  a = run(jax.random.key(1), 0.0)
  np.testing.assert_array_equal(a, run(jax.random.key(2), 0.0))
  assert not np.allclose(a, run(jax.random.key(2), 1.0))


def test_samplers_match_gaussian_data_distribution(cosine):
  """With the exact denoiser of N(mu, s^2) data, samples are N(mu, s^2).

  Unlike the single-image oracle this checks the noise scales of the
  stochastic updates, not only the deterministic part.
  """
  mu, s = 0.2, 0.3
  shape = (8192, 1, 1, 1)  # std of the sample std: ~0.002.

  def fn(x_t, t):  # E[eps | x_t] for Gaussian data.
    ab = sch.extract(cosine.alphas_cumprod, t, x_t.ndim)
    return jnp.sqrt(1 - ab) * (x_t - jnp.sqrt(ab) * mu) / (ab * s**2 + 1 - ab)

  ddpm = jax.jit(lambda rng: samplers.ddpm_sample(fn, cosine, rng, shape,
                                                  clip_x0=False))
  # All T steps: with few steps a mean-only denoiser under-disperses.
  ddim = jax.jit(lambda rng, eta: samplers.ddim_sample(
      fn, cosine, rng, shape, num_steps=T, eta=eta, clip_x0=False))
  for out in (ddpm(jax.random.key(0)), ddim(jax.random.key(1), 0.0),
              ddim(jax.random.key(2), 1.0)):
    out = np.asarray(out)
    np.testing.assert_allclose(out.mean(), mu, atol=0.015)
    np.testing.assert_allclose(out.std(), s, atol=0.015)


def test_drop_labels_rate():
  labels = jnp.arange(100_000, dtype=jnp.int32) % 2
  out = np.asarray(samplers.drop_labels(jax.random.key(0), labels, 0.1, 2))
  dropped = out == 2
  assert out.dtype == np.int32
  np.testing.assert_allclose(dropped.mean(), 0.1, atol=0.005)
  np.testing.assert_array_equal(out[~dropped], np.asarray(labels)[~dropped])
  assert (np.asarray(samplers.drop_labels(jax.random.key(0), labels, 0.0, 2))
          == np.asarray(labels)).all()
  assert (np.asarray(samplers.drop_labels(jax.random.key(0), labels, 1.0, 2))
          == 2).all()


def test_guidance_uses_one_batched_call():
  calls = []

  def model_fn(x, t, y):
    calls.append(x.shape[0])
    scale = jnp.where(y == 2, 1.0, 2.0 + y)[:, None, None, None]
    return x * scale + t[:, None, None, None]

  x = jnp.ones((3, 2, 2, 1))
  t = jnp.array([1, 2, 3])
  y = jnp.array([0, 1, 0])
  cond, uncond = model_fn(x, t, y), model_fn(x, t, jnp.full_like(y, 2))
  calls.clear()
  for w in (0.0, 1.5):
    out = samplers.guided_denoise_fn(model_fn, y, w, null_label=2)(x, t)
    np.testing.assert_allclose(out, uncond + (1 + w) * (cond - uncond),
                               rtol=1e-6)
  assert calls == [6, 6]
  w = jnp.array([0.0, 1.5, 3.0])  # one scale per example
  out = samplers.guided_denoise_fn(model_fn, y, w, null_label=2)(x, t)
  np.testing.assert_allclose(
      out, uncond + (1 + w[:, None, None, None]) * (cond - uncond), rtol=1e-6)
  np.testing.assert_allclose(
      samplers.guided_denoise_fn(model_fn, y, 0.0, null_label=2)(x, t), cond)


def _gaussian_eps_fn(schedule, mu, s):
  def fn(x_t, t):  # E[eps | x_t] for N(mu, s^2) data.
    ab = sch.extract(schedule.alphas_cumprod, t, x_t.ndim)
    return jnp.sqrt(1 - ab) * (x_t - jnp.sqrt(ab) * mu) / (ab * s**2 + 1 - ab)
  return fn


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpm_solver_recovers_single_image_with_oracle(cosine, prediction):
  fn = _oracle(cosine, X0, prediction)
  # (One step predicts x0 at t = T - 1 alone, where float32 loses ~3e-3,
  # as DDIM does.)
  for steps in (2, 5, 20):
    out = samplers.dpm_solver_pp_sample(fn, cosine, jax.random.key(0),
                                        X0.shape, steps, prediction)
    np.testing.assert_allclose(out, X0, atol=1e-4)


def test_dpm_solver_converges_to_the_ddim_ode_solution(cosine):
  """Both solve the probability-flow ODE, whose solution for N(mu, s^2)
  data is known: x_T's standard score is kept. DDIM with all T steps and
  DPM-Solver++(2M) with 200 meet there; at 10 and 20 steps DPM-Solver++ is
  several times closer than DDIM."""
  mu, s = 0.2, 0.3
  fn = _gaussian_eps_fn(cosine, mu, s)
  x_init = jax.random.normal(jax.random.key(0), (512, 1, 1, 1))
  ab = float(cosine.alphas_cumprod[-1])
  exact = mu + s * (np.asarray(x_init) - np.sqrt(ab) * mu) / np.sqrt(
      ab * s**2 + 1 - ab)
  ddim = lambda n: np.asarray(samplers.ddim_sample(
      fn, cosine, jax.random.key(1), x_init.shape, n, eta=0.0,
      clip_x0=False, x_init=x_init))
  dpm = lambda n: np.asarray(samplers.dpm_solver_pp_sample(
      fn, cosine, jax.random.key(1), x_init.shape, n, clip_x0=False,
      x_init=x_init))
  ode = ddim(T)
  np.testing.assert_allclose(ode, exact, atol=3e-3)
  np.testing.assert_allclose(dpm(200), ode, atol=4e-3)
  for n in (10, 20):
    err_dpm, err_ddim = (np.abs(dpm(n) - exact).max(),
                         np.abs(ddim(n) - exact).max())
    assert err_dpm < 0.3 * err_ddim, (n, err_dpm, err_ddim)


def test_dpm_solver_timesteps_are_distinct_and_span_the_schedule(cosine):
  for n in (1, 2, 10, 250, T):
    ts = samplers.dpm_solver_timesteps(cosine, n)
    assert len(ts) == n and ts[0] == T - 1 and (np.diff(ts) < 0).all()
    if n > 1:
      assert ts[-1] == 0


def test_dpm_solver_coefficients_first_order_is_ddim():
  al = np.array([0.1, 0.5, 0.9, 1.0])
  sg = np.sqrt(1 - al**2)
  a, b, c = samplers.dpm_solver_pp_coefficients(al, sg)
  # First and last steps are first order; DDIM with eta = 0 maps
  # (x, x0) to alpha' x0 + sigma' (x - alpha x0) / sigma.
  assert c[0] == 0 and c[-1] == 0 and c[1] > 0
  np.testing.assert_allclose(a, sg[1:] / sg[:-1], rtol=1e-6)
  np.testing.assert_allclose(b, al[1:] - sg[1:] / sg[:-1] * al[:-1],
                             rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="end clean"):
    samplers.dpm_solver_pp_coefficients(al[:-1], sg[:-1])


def test_guidance_minus_one_is_the_unconditional_model():
  model_fn = lambda x, t, y: x * (1.0 + y[:, None, None, None])
  x, t, y = jnp.ones((2, 2, 2, 1)), jnp.zeros((2,)), jnp.array([0, 1])
  out = samplers.guided_denoise_fn(model_fn, y, -1.0, null_label=2)(x, t)
  np.testing.assert_allclose(out, model_fn(x, t, jnp.full_like(y, 2)))


# ------------------------------------------------------- rectified flow --


def test_flow_path_and_velocity_invert():
  x0 = jax.random.normal(jax.random.key(0), (4, 3, 3, 1))
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  t = jnp.array([0.0, 0.25, 0.8, 1.0])
  x_t = flow.interpolate(x0, noise, t)
  np.testing.assert_allclose(x_t[0], x0[0])
  np.testing.assert_allclose(x_t[3], noise[3])
  v = flow.velocity_target(x0, noise)
  np.testing.assert_allclose(flow.x0_from_velocity(x_t, t, v), x0,
                             atol=1e-6)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_flow_samples_a_gaussian_target(sampler):
  """With the exact velocity of N(mu, s^2) data, the ODE's samples are
  N(mu, s^2)."""
  mu, s = 0.2, 0.3

  def velocity(x_t, t):
    t = t.reshape(t.shape + (1,) * (x_t.ndim - 1))
    var = (1 - t)**2 * s**2 + t**2
    x0 = mu + (1 - t) * s**2 / var * (x_t - (1 - t) * mu)
    eps = (x_t - (1 - t) * x0) / t
    return eps - x0

  shape = (8192, 1, 1, 1)
  run = flow.euler_sample if sampler == "euler" else flow.dpm_solver_pp_sample
  out = np.asarray(run(velocity, jax.random.key(0), shape,
                       200 if sampler == "euler" else 25, clip_x0=False))
  np.testing.assert_allclose(out.mean(), mu, atol=0.015)
  np.testing.assert_allclose(out.std(), s, atol=0.015)
