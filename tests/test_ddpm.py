"""Tests for medgen_jax.methods.ddpm on a tiny conditional model.

Compiling ``init`` and ``train_step`` dominates the runtime on CPU, so one
method is built, initialised and trained once per module; other variants are
checked by tracing (``jax.eval_shape``) or a forward pass only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ddpm as ddpm_config
from medgen_jax import profiling
from medgen_jax.methods import base
from medgen_jax.methods import ddpm

NUM_STEPS = 30


def _tiny_config(arg="runlocal,res=8,cond=label"):
  c = ddpm_config.get_config(arg)
  # One level (no down/up-sampling): halves init/step compile time; the
  # UNet tests cover the multi-level nets.
  c.model.update(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                 num_groups=4, num_heads=2)
  c.method.timesteps = 100
  c.optim.update(lr=2e-3, warmup_steps=0)
  c.train.update(num_steps=NUM_STEPS, ema=0.9, ema_warmup=0)
  c.sample.update(sampler="ddim", steps=5, guidance_scale=1.0)
  return c


def _batch(shape=(8, 8, 8, 1)):
  """Ramps with alternating sign, labelled by sign (numpy: no compiles)."""
  ramp = np.linspace(-1.0, 1.0, int(np.prod(shape[1:]))).reshape(shape[1:])
  sign = np.where(np.arange(shape[0]) % 2, 1.0, -1.0)
  image = sign.reshape((-1,) + (1,) * len(shape[1:])) * ramp
  return {"image": image.astype(np.float32),
          "label": (np.arange(shape[0]) % 2).astype(np.int32)}


@pytest.fixture(scope="module")
def trained():
  config = _tiny_config()
  batch = _batch()
  method = base.build(config, batch)
  state0 = jax.jit(method.init)(jax.random.key(0), batch)
  step = jax.jit(method.train_step)
  state, metrics = state0, []
  for i in range(NUM_STEPS):
    state, m = step(state, batch, jax.random.fold_in(jax.random.key(1), i))
    metrics.append(m)

  def eval_loss(s):
    """Pre-update loss on fixed rngs (reusing the compiled step), so the
    losses before and after training are comparable."""
    keys = jax.random.split(jax.random.key(123), 8)
    return np.mean([float(step(s, batch, k)[1]["loss"]) for k in keys])

  return dict(config=config, batch=batch, method=method, state0=state0,
              state=state, metrics=metrics, step=step, eval_loss=eval_loss)


def test_make_reads_config(trained):
  method = trained["method"]
  assert isinstance(method, ddpm.DDPM)
  assert method.image_shape == (8, 8, 1) and method.num_classes == 2
  assert method.model.num_classes == 2 and method.model.out_channels == 1
  assert method.schedule.num_timesteps == 100
  assert "ddpm" in base.available()


def test_init_state(trained):
  state0 = trained["state0"]
  assert int(state0.step) == 0
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state0.params))
  assert state0.params["class_embed"]["embedding"].shape == (3, 32)
  jax.tree.map(np.testing.assert_array_equal, state0.params,
               state0.ema_params)


def test_train_steps_decrease_loss_and_update_ema(trained):
  state, metrics = trained["state"], trained["metrics"]
  assert int(state.step) == NUM_STEPS
  for m in metrics[:1] + metrics[-1:]:
    assert set(m) >= {"loss", "grad_norm"}
    for v in m.values():
      assert v.shape == () and v.dtype == jnp.float32
      assert np.isfinite(float(v))
  before = trained["eval_loss"](trained["state0"])
  after = trained["eval_loss"](state)
  assert after < 0.8 * before, (before, after)
  # EMA lags behind: it is neither the latest params nor the init.
  params, ema, init = jax.device_get(
      (state.params, state.ema_params, trained["state0"].params))
  max_diff = lambda a, b: max(jax.tree.leaves(jax.tree.map(
      lambda x, y: np.abs(x - y).max(), a, b)))
  assert max_diff(params, ema) > 1e-4
  assert max_diff(ema, init) > 1e-4


def test_sample_conditional(trained):
  method, state = trained["method"], trained["state"]
  sample = jax.jit(method.sample, static_argnums=2)
  out = sample(state, jax.random.key(0), 4)
  assert out["image"].shape == (4, 8, 8, 1)
  assert out["image"].dtype == jnp.float32
  assert np.abs(np.asarray(out["image"])).max() <= 1.0
  np.testing.assert_array_equal(out["label"], [0, 1, 0, 1])
  assert out["label"].dtype == jnp.int32
  cond = {"label": np.array([1, 1, 0, 0], np.int32)}
  out2 = sample(state, jax.random.key(0), 4, cond)
  np.testing.assert_array_equal(out2["label"], cond["label"])
  # Same rng, hence the same x_T: samples depend only on their own noise and
  # label (eta=0), so equal labels give equal images, different ones differ.
  np.testing.assert_allclose(out["image"][1:3], out2["image"][1:3],
                             atol=1e-5)
  assert not np.allclose(out["image"][0], out2["image"][0], atol=1e-3)


def test_guidance_per_class_guides_each_example_by_its_label(trained):
  state, batch = trained["state"], trained["batch"]
  cond = {"label": np.array([0, 1, 0, 1], np.int32)}

  def images(**sample):
    config = _tiny_config()
    config.sample.update(**sample)
    method = ddpm.make(config, batch)
    return np.asarray(jax.jit(method.sample, static_argnums=2)(
        state, jax.random.key(0), 4, cond)["image"])

  mixed = images(guidance_per_class=(0.0, 2.0))
  unguided, guided = images(guidance_scale=0.0), images(guidance_scale=2.0)
  # Samples depend only on their own noise, label and w (eta=0).
  np.testing.assert_allclose(mixed[0::2], unguided[0::2], atol=1e-5)
  np.testing.assert_allclose(mixed[1::2], guided[1::2], atol=1e-5)
  assert not np.allclose(guided[0::2], unguided[0::2], atol=1e-3)
  sample_config = _tiny_config().sample
  assert ddpm.guidance_scales(sample_config, 2) == (1.0, 1.0)
  sample_config.guidance_per_class = (1.0,)
  with pytest.raises(ValueError, match="one scale per class"):
    ddpm.guidance_scales(sample_config, 2)


def test_ddpm_sampler_and_no_ema_shapes(trained):
  config = _tiny_config()
  config.sample.update(sampler="ddpm", guidance_scale=0.0)
  config.train.ema = 0.0
  method = ddpm.make(config, trained["batch"])
  state = jax.eval_shape(method.init, jax.random.key(0), trained["batch"])
  assert state.ema_params is None
  out = jax.eval_shape(lambda s, r: method.sample(s, r, 3), state,
                       jax.random.key(0))
  assert out["image"].shape == (3, 8, 8, 1)
  assert out["label"].shape == (3,)


def test_unconditional_3d_v_prediction_shapes():
  config = _tiny_config("runlocal,res=8,dims=3")
  config.method.prediction = "v"
  batch = {"image": np.zeros((2, 8, 8, 8, 2), np.float32)}
  method = ddpm.make(config, batch)
  assert method.num_classes == 0 and method.model.spatial_dims == 3
  state = jax.eval_shape(method.init, jax.random.key(0), batch)
  assert "class_embed" not in state.params
  assert state.params["Conv_0"]["kernel"].shape == (3, 3, 3, 2, 8)
  new_state, metrics = jax.eval_shape(method.train_step, state, batch,
                                      jax.random.key(1))
  assert jax.tree.map(jnp.shape, new_state) == jax.tree.map(jnp.shape, state)
  assert metrics["loss"].shape == ()
  out = jax.eval_shape(lambda s, r: method.sample(s, r, 3), state,
                       jax.random.key(0))
  assert out["image"].shape == (3, 8, 8, 8, 2) and "label" not in out


def test_bfloat16_config_keeps_float32_params(trained):
  # Tracing only: the bf16 forward itself is run in test_unet.
  config = _tiny_config()
  config.model.dtype = "bfloat16"
  method = ddpm.make(config, trained["batch"])
  assert method.model.dtype == jnp.bfloat16
  state = jax.eval_shape(method.init, jax.random.key(0), trained["batch"])
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
  new_state, metrics = jax.eval_shape(method.train_step, state,
                                      trained["batch"], jax.random.key(1))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(
      (new_state.params, new_state.ema_params, new_state.opt_state))
             if jnp.issubdtype(p.dtype, jnp.floating))
  assert metrics["loss"].dtype == jnp.float32
  out = jax.eval_shape(lambda s, r: method.sample(s, r, 2), state,
                       jax.random.key(0))
  assert out["image"].dtype == jnp.float32


def test_microbatched_step_matches_one_pass(trained):
  # The module's method resolves microbatches automatically (a batch of 8 on
  # CPU: 1); the same step over 4 microbatches of 2 must give the same loss,
  # gradient norm and updated parameters up to float summation order.
  config = _tiny_config()
  config.train.microbatches = 4
  split = base.build(config, trained["batch"])
  assert split.microbatches == 4 and trained["method"].microbatches in (1, 4)
  rng = jax.random.key(7)
  s1, m1 = trained["step"](trained["state0"], trained["batch"], rng)
  s4, m4 = jax.jit(split.train_step)(trained["state0"], trained["batch"], rng)
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                       s1.params, trained["state0"].params)
  assert max(jax.tree.leaves(moved)) > 1e-4  # the step did change them
  for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_step_flops_count_every_microbatch(trained):
  config = _tiny_config()
  config.train.microbatches = 4
  split = base.build(config, trained["batch"])
  args = (trained["state0"], trained["batch"], jax.random.key(0))
  unsplit = profiling.step_flops(trained["method"], *args)
  assert unsplit > 0
  np.testing.assert_allclose(profiling.step_flops(split, *args), unsplit,
                             rtol=1e-6)
  # What cost analysis alone reports for the scanned step: one body.
  scanned = profiling.flops_of(jax.jit(split.train_step).lower(*args))
  assert scanned < 0.5 * unsplit


def test_loss_trajectory_is_fixed_for_a_seed(tiny_config):
  """Five steps of the runlocal DDPM from seed 0: the values this method
  produced before the method seam existed, so refactors cannot move it."""
  from medgen_jax.train import sharding, trainer  # pylint: disable=import-outside-toplevel
  c = tiny_config.copy_and_resolve_references()
  c.train.microbatches = 1
  exp = trainer.build_experiment(c)
  state = trainer.init_state(exp)
  step = trainer.jit_train_step(exp)
  losses = []
  for i in range(1, 6):
    batch = sharding.global_batch(exp.data.batcher.batch(i - 1),
                                  sharding.batch_sharding(exp.mesh))
    state, m = step(state, batch, jax.random.fold_in(exp.train_rng, i))
    losses.append(float(m["loss"]))
  np.testing.assert_allclose(
      losses, [1.0484797954559326, 0.9598142504692078, 0.9620004892349243,
               0.9524409770965576, 0.9700015187263489], rtol=1e-5)


def test_rectified_flow_trains_and_samples_with_guidance():
  config = _tiny_config("runlocal,res=8,cond=label,objective=rectified_flow")
  config.sample.update(sampler="euler", steps=4, guidance_scale=1.0)
  batch = _batch()
  method = base.build(config, batch)
  assert method.flow
  step = jax.jit(method.train_step)
  state = state0 = jax.jit(method.init)(jax.random.key(0), batch)
  for i in range(NUM_STEPS):
    state, _ = step(state, batch, jax.random.fold_in(jax.random.key(1), i))
  keys = jax.random.split(jax.random.key(123), 8)
  loss = lambda s: np.mean([float(step(s, batch, k)[1]["loss"])
                            for k in keys])
  assert loss(state) < 0.8 * loss(state0)
  for sampler in ("euler", "dpmpp_2m"):
    draw = jax.jit(lambda s, r, sampler=sampler: method.solve(
        lambda x, t: method.model.apply(
            {"params": s.params}, x, method.net_time(t),
            jnp.array([0, 1, 0, 1]), train=False), r, (4, 8, 8, 1), sampler))
    out = np.asarray(draw(state, jax.random.key(0)))
    assert out.shape == (4, 8, 8, 1) and np.isfinite(out).all()
  out = jax.jit(method.sample, static_argnums=2)(state, jax.random.key(0), 4)
  assert np.abs(np.asarray(out["image"])).max() <= 1.0
  with pytest.raises(ValueError, match="must be one of .'euler', 'dpmpp_2m'."):
    method.solve(None, jax.random.key(0), (1, 8, 8, 1), "ddim")


def test_dpm_solver_on_the_trained_diffusion_model(trained):
  method, state = trained["method"], trained["state"]
  config = trained["config"].copy_and_resolve_references()
  config.sample.update(sampler="dpmpp_2m", steps=5)
  method = ddpm.make(config, trained["batch"])
  out = jax.jit(method.sample, static_argnums=2)(state, jax.random.key(0), 4)
  assert out["image"].shape == (4, 8, 8, 1)
  assert np.isfinite(np.asarray(out["image"])).all()


def test_mask_conditioned_model_draws_for_the_given_masks():
  config = _tiny_config("runlocal,res=8,condition=mask")
  batch = _batch((8, 8, 8, 2))  # one contrast + the mask channel
  batch["image"][..., 1] = np.where(batch["image"][..., 1] > 0, 1.0, -1.0)
  method = base.build(config, batch)
  assert isinstance(method, ddpm.MaskToImageDDPM)
  assert method.image_shape == (8, 8, 1) and method.given_channels == [1]
  from medgen_jax import sampling  # pylint: disable=import-outside-toplevel
  assert sampling.needs(method, "mask")
  state = jax.jit(method.init)(jax.random.key(0), batch)
  # The network reads x_t and the mask, and predicts the contrast only.
  assert state.params["Conv_0"]["kernel"].shape[-2] == 2
  state, m = jax.jit(method.train_step)(state, batch, jax.random.key(1))
  assert np.isfinite(float(m["loss"]))
  masks = batch["image"][:4, ..., 1:]
  out = jax.jit(method.sample, static_argnums=2)(state, jax.random.key(0), 4,
                                                 {"mask": masks})
  assert out["image"].shape == (4, 8, 8, 2)
  np.testing.assert_array_equal(out["image"][..., 1:], masks)
  with pytest.raises(ValueError, match="samples for cond=.'mask'"):
    method.sample(state, jax.random.key(0), 4)


def test_image_conditioned_model_translates_and_does_not_sample():
  config = _tiny_config("runlocal,res=8,contrast=t1w+t2w")
  config.data.cond = ""
  config.method.condition = "source"
  config.translation = dict(source=("t1w",), target=("t2w",))
  from medgen_jax import config_check  # pylint: disable=import-outside-toplevel
  config_check.validate(config)
  batch = _batch((8, 8, 8, 2))
  method = base.build(config, batch)
  assert isinstance(method, ddpm.TranslatorDDPM)
  assert base.has(method, "translate") and not base.has(method, "sample")
  state = jax.eval_shape(method.init, jax.random.key(0), batch)
  out = jax.eval_shape(method.translate, state,
                       {"source": batch["image"][:3, ..., :1]},
                       jax.random.key(0))
  assert out["image"].shape == (3, 8, 8, 1)
  config.translation.target = ("flair",)
  with pytest.raises(config_check.ConfigError, match="'flair' is not in"):
    config_check.validate(config)
