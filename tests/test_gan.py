"""The GAN family: penalties, spectral norm, DiffAugment and a tiny run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import acgan as acgan_config
from configs import dcgan as dcgan_config
from medgen_jax import config_check
from medgen_jax import sampling
from medgen_jax.methods import losses
from medgen_jax.nn import gan as gan_nn
from medgen_jax.train import trainer


def test_wasserstein_losses_by_hand():
  real, fake = jnp.asarray([1.0, 3.0]), jnp.asarray([0.0, -2.0])
  assert float(losses.wasserstein_d(real, fake)) == pytest.approx(-3.0)
  assert float(losses.wasserstein_g(fake)) == pytest.approx(1.0)
  d, g = losses.adversarial("hinge")
  assert d is losses.hinge_d and g is losses.hinge_g
  with pytest.raises(ValueError, match="must be one of"):
    losses.adversarial("relativistic")


def test_mode_seeking_by_hand_and_its_gradient_spreads_samples():
  a = jnp.array([[0.0, 1.0], [2.0, 2.0]])
  b = jnp.array([[1.0, 1.0], [2.0, 0.0]])
  za = jnp.zeros((2, 3))
  zb = jnp.full((2, 3), 2.0)
  # mean|a - b| = 3/4, mean|za - zb| = 2: 1 / (0.375 + eps).
  assert float(losses.mode_seeking(a, b, za, zb)) == pytest.approx(
      1.0 / (0.375 + 1e-5), rel=1e-6)
  # Identical samples from different latents: the largest value, and its
  # gradient pushes them apart.
  g = jax.grad(lambda x: losses.mode_seeking(x, a, za, zb))(a + 1e-3)
  assert float(jnp.sum(g * 1e-3)) < 0


def test_gradient_penalty_of_a_linear_critic():
  """critic(x) = <a, x>: its gradient is a everywhere, so the penalty is
  (|a| - 1)^2 wherever it is evaluated."""
  a = jnp.asarray([[3.0, 4.0]])  # |a| = 5
  critic = lambda x: jnp.sum(x * a, axis=-1)  # pylint: disable=unnecessary-lambda-assignment
  real = jax.random.normal(jax.random.key(0), (4, 2))
  fake = jax.random.normal(jax.random.key(1), (4, 2))
  gp = losses.gradient_penalty(critic, real, fake, jax.random.key(2))
  assert float(gp) == pytest.approx(16.0, rel=1e-5)


def test_r1_penalty_of_a_quadratic_critic():
  """critic(x) = |x|^2 / 2 has gradient x: R1 = mean |x|^2."""
  x = jnp.asarray([[1.0, 2.0], [0.0, 3.0]])
  r1 = losses.r1_penalty(lambda v: 0.5 * jnp.sum(v * v, axis=-1), x)
  assert float(r1) == pytest.approx((5.0 + 9.0) / 2)


def test_spectral_norm_converges_to_the_top_singular_value():
  w = jax.random.normal(jax.random.key(0), (3, 3, 4, 6))
  top = np.linalg.svd(np.asarray(w).reshape(-1, 6), compute_uv=False)[0]
  u = jax.random.normal(jax.random.key(1), (6,))
  for _ in range(60):
    normed, u, sigma = gan_nn.spectral_normalize(w, u)
  assert float(sigma) == pytest.approx(top, rel=1e-4)
  normed_top = np.linalg.svd(np.asarray(normed).reshape(-1, 6),
                             compute_uv=False)[0]
  assert normed_top == pytest.approx(1.0, rel=1e-4)


def test_diff_augment_same_key_same_transform_and_gradients():
  x = -np.ones((2, 16, 16, 1), np.float32)
  x[0, 7, 7] = 1.0
  x[1, 7, 7] = 0.5  # another image, the same bright pixel
  key = jax.random.key(4)
  out = np.asarray(gan_nn.diff_augment(jnp.asarray(x), key,
                                       ("translation",)))
  again = np.asarray(gan_nn.diff_augment(jnp.asarray(x), key,
                                         ("translation",)))
  np.testing.assert_array_equal(out, again)
  # Examples share nothing but the draw: redo each alone with its shift.
  fake = np.where(x > -1, 0.25, -1.0).astype(np.float32)
  out_fake = np.asarray(gan_nn.diff_augment(jnp.asarray(fake), key,
                                            ("translation",)))
  for i in range(2):
    assert (np.argwhere(out[i, ..., 0] > -1).tolist() ==
            np.argwhere(out_fake[i, ..., 0] > -1).tolist())
  # Gradients flow through every transform.
  w = jax.random.normal(jax.random.key(5), x.shape)
  g = jax.grad(lambda v: jnp.sum(w * gan_nn.diff_augment(v, key)))(
      jnp.asarray(x))
  assert float(jnp.sum(jnp.abs(g))) > 0


@pytest.fixture(scope="module")
def acgan_run(data_dir):
  c = acgan_config.get_config("res=16,runlocal,mask,head=acgan")
  c.data.update(data_dir=data_dir, num_subjects=5)
  exp = trainer.build_experiment(c)
  state = trainer.init_state(exp)
  batch = trainer.example_batch(exp.data, exp.mesh)
  step = jax.jit(exp.method.train_step)
  metrics = []
  for i in range(6):
    state, m = step(state, batch, jax.random.fold_in(exp.train_rng, i))
    metrics.append(jax.device_get(m))
  return exp, state, metrics


def test_acgan_step_two_networks_one_step_and_signals(acgan_run):
  exp, state, metrics = acgan_run
  assert int(state.step) == 6
  assert set(state.params) == {"gen", "disc"} and state.ema_of == "gen"
  assert set(state.model_state["spectral"])  # power-iteration vectors kept
  for m in metrics:
    for k in ("d_loss", "g_loss", "d_real_acc", "d_fake_acc", "d_grad_norm",
              "g_grad_norm", "penalty", "d_class_loss", "mode_seeking"):
      assert np.isfinite(m[k]), k
    assert 0.0 <= m["d_real_acc"] <= 1.0 and 0.0 <= m["d_fake_acc"] <= 1.0
  # The EMA follows the generator, a step behind.
  ema, gen = jax.tree.leaves(state.ema_params), jax.tree.leaves(
      state.params["gen"])
  assert len(ema) == len(gen)
  assert any(not np.allclose(a, b) for a, b in zip(ema, gen))


def test_acgan_samples_images_masks_and_labels(acgan_run):
  exp, state, _ = acgan_run
  out = sampling.draw_for_classes(exp.method, state, exp.config.data, 6,
                                  jax.random.key(0), 4)
  assert out["image"].shape == (6, 16, 16, 1)
  assert out["lesion_mask"].shape == (6, 16, 16)
  np.testing.assert_array_equal(out["label"], [0, 0, 0, 1, 1, 1])
  assert np.all(np.abs(out["image"]) < 1.0)


def test_gan_configs_validate_and_reject_mismatches():
  for arg in ("", "runlocal,mask", "res=64", "loss=wasserstein",
              "dims=3,res=16,runlocal"):
    config_check.validate(dcgan_config.get_config(arg))
    config_check.validate(acgan_config.get_config(arg))
  config_check.validate(acgan_config.get_config("head=acgan"))
  c = dcgan_config.get_config("head=acgan")
  with pytest.raises(config_check.ConfigError, match="needs data.cond"):
    config_check.validate(c)
  c = dcgan_config.get_config("loss=wasserstein")
  c.method.gp_weight = 0.0
  with pytest.raises(config_check.ConfigError, match="gp_weight"):
    config_check.validate(c)


def test_pix2pix_learns_the_paired_mapping_and_translates(data_dir):
  from configs import pix2pix as p2p_config  # pylint: disable=import-outside-toplevel
  c = p2p_config.get_config("res=16,runlocal")
  c.data.update(data_dir=data_dir, num_subjects=5)
  c.optim.lr = 2e-3
  exp = trainer.build_experiment(c)
  state = trainer.init_state(exp)
  batch = trainer.example_batch(exp.data, exp.mesh)
  step = jax.jit(exp.method.train_step)
  l1 = []
  for i in range(25):
    state, m = step(state, batch, jax.random.key(i))
    l1.append(float(m["l1"]))
    assert np.isfinite(float(m["d_loss"]))
  assert int(state.step) == 25 and set(state.params) == {"gen", "disc"}
  assert np.mean(l1[-5:]) < 0.7 * np.mean(l1[:3])
  src = np.asarray(batch["image"][..., :1])
  out = sampling.translate(exp.method, state, src, jax.random.key(0), 8)
  assert out.shape == src.shape and np.all(np.abs(out) <= 1.0)


def test_translation_config_names_contrasts_it_lacks():
  from configs import pix2pix as p2p_config  # pylint: disable=import-outside-toplevel
  config_check.validate(p2p_config.get_config("source=t1w+t2w,target=flair"))
  c = p2p_config.get_config("runlocal")
  c.translation.target = ("dwi",)
  with pytest.raises(config_check.ConfigError,
                     match="translation.target: 'dwi' is not in"):
    config_check.validate(c)


def test_collapse_score_between_real_diversity_and_one_image():
  from medgen_jax.eval import generative  # pylint: disable=import-outside-toplevel
  assert generative.collapse_score(0.3, 0.3) == pytest.approx(0.0)
  assert generative.collapse_score(1.0, 0.3) == pytest.approx(1.0)
  assert generative.collapse_score(0.65, 0.3) == pytest.approx(0.5)
  assert generative.collapse_score(0.2, 0.3) < 0  # more diverse than real


@pytest.fixture(scope="module")
def cyclegan_exp(data_dir):
  from configs import cyclegan as cyclegan_config  # pylint: disable=import-outside-toplevel
  c = cyclegan_config.get_config("res=16,runlocal")
  c.data.update(data_dir=data_dir, num_subjects=5)
  exp = trainer.build_experiment(c)
  return exp, trainer.init_state(exp)


def test_unpaired_batches_take_the_two_domains_from_other_subjects(
    cyclegan_exp):
  exp, _ = cyclegan_exp
  batcher = exp.data.batcher
  subjects = batcher.arrays["subject_id"]
  for step in range(5):
    idx = batcher.indices(step)
    partner = batcher.partner_indices(step, idx)
    assert np.all(subjects[idx] != subjects[partner])
    np.testing.assert_array_equal(batcher.batch(step)["image_b"],
                                  batcher.arrays["image"][partner])
  # Deterministic: a resumed run sees the same pairs.
  np.testing.assert_array_equal(batcher.partner_indices(3, batcher.indices(3)),
                                batcher.partner_indices(3, batcher.indices(3)))


def test_cycle_and_identity_of_identity_generators_are_zero(cyclegan_exp,
                                                            monkeypatch):
  exp, state = cyclegan_exp
  method = exp.method
  monkeypatch.setattr(method, "_g", lambda net, params, x: x)
  batch = trainer.example_batch(exp.data, exp.mesh)
  a, b = method._domains(batch)  # pylint: disable=protected-access
  _, (m, _) = method.g_terms(state.params["gen"], state.params["disc"], a, b)
  assert float(m["cycle"]) == 0.0 and float(m["identity"]) == 0.0


def test_cyclegan_step_and_image_pool(cyclegan_exp):
  from medgen_jax.methods import cyclegan  # pylint: disable=import-outside-toplevel
  exp, state = cyclegan_exp
  batch = trainer.example_batch(exp.data, exp.mesh)
  new, m = jax.jit(exp.method.train_step)(state, batch, jax.random.key(0))
  assert int(new.step) == 1
  assert int(new.model_state["count_a"]) == batch["image"].shape[0]
  assert all(np.isfinite(float(v)) for v in m.values())
  # The pool: filling returns the fakes; full, it returns old ones or new.
  pool = jnp.zeros((3, 2)); count = jnp.asarray(0, jnp.int32)
  fakes = jnp.arange(4.0)[:, None] * jnp.ones((4, 2))
  out, pool, count = cyclegan.pool_query(pool, count, fakes,
                                         jax.random.key(1))
  np.testing.assert_array_equal(out[:3], fakes[:3])
  assert int(count) == 3
  out, pool2, _ = cyclegan.pool_query(pool, count, fakes + 10,
                                      jax.random.key(2))
  for row in np.asarray(out):
    assert row[0] in (0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0)
  assert set(np.asarray(pool2)[:, 0]) <= {0.0, 1.0, 2.0, 3.0, 10.0, 11.0,
                                          12.0, 13.0}


def test_spade_gan_draws_images_for_the_given_masks(data_dir):
  from configs import spade_gan as spade_config  # pylint: disable=import-outside-toplevel
  from medgen_jax.methods import base as methods  # pylint: disable=import-outside-toplevel
  c = spade_config.get_config("res=16,runlocal")
  c.data.update(data_dir=data_dir, num_subjects=5)
  exp = trainer.build_experiment(c)
  state = trainer.init_state(exp)
  batch = trainer.example_batch(exp.data, exp.mesh)
  state, m = jax.jit(exp.method.train_step)(state, batch, jax.random.key(0))
  assert int(state.step) == 1
  assert all(np.isfinite(float(v)) for v in m.values())
  pool = exp.data.batcher.arrays["image"]
  out = sampling.draw_for_classes(exp.method, state, c.data, 5,
                                  jax.random.key(1), 4, mask_source=pool)
  want = sampling.masks_for(pool, c.data, 5)[..., 0] > 0
  np.testing.assert_array_equal(out["lesion_mask"], want.astype(np.uint8))
  assert out["image"].shape == (5, 16, 16, 1) and "label" not in out
  with pytest.raises(methods.CapabilityError, match="given masks"):
    sampling.draw_for_classes(exp.method, state, c.data, 5,
                              jax.random.key(1), 4)
  with pytest.raises(config_check.ConfigError, match="mask_channels"):
    bad = spade_config.get_config("runlocal")
    bad.data.mask_channels = ()
    config_check.validate(bad)


@pytest.mark.parametrize("name,arg", [("dcgan", "mask"), ("acgan", ""),
                                      ("pix2pix", ""), ("cyclegan", ""),
                                      ("spade_gan", "")])
def test_3d_shapes(name, arg):
  """Init and the main capability on 8^3 volumes (traced, not run)."""
  import importlib  # pylint: disable=import-outside-toplevel
  from medgen_jax.methods import base as methods  # pylint: disable=import-outside-toplevel
  c = importlib.import_module(f"configs.{name}").get_config(
      f"res=8,dims=3,runlocal,{arg}".rstrip(","))
  config_check.validate(c)
  channels = len(c.data.contrasts) + len(c.data.get("mask_channels", ()))
  x = jnp.zeros((2, 8, 8, 8, channels))
  batch = {"image": x, "label": jnp.zeros(2, jnp.int32), "image_b": x}
  method = methods.build(c, batch)
  state = jax.eval_shape(method.init, jax.random.key(0), batch)
  new, _ = jax.eval_shape(method.train_step, state, batch, jax.random.key(0))
  assert jax.tree.structure(new) == jax.tree.structure(state)
  if methods.has(method, "translate"):
    src = jnp.zeros((2, 8, 8, 8, len(c.translation.source)))
    out = jax.eval_shape(method.translate, state, {"source": src},
                         jax.random.key(0))
    assert out["image"].shape == (2, 8, 8, 8, len(c.translation.target))
  else:
    cond = {"mask": x[..., -1:]} if sampling.needs(method, "mask") else None
    out = jax.eval_shape(lambda s, k: method.sample(s, k, 2, cond), state,
                         jax.random.key(0))
    assert out["image"].shape == x.shape


@pytest.mark.parametrize("arg,capability", [("mask", "sample"),
                                            ("translate", "translate")])
def test_vaegan_generates_or_translates(data_dir, arg, capability):
  from configs import vaegan as vaegan_config  # pylint: disable=import-outside-toplevel
  from medgen_jax.methods import base as methods  # pylint: disable=import-outside-toplevel
  c = vaegan_config.get_config(f"res=16,runlocal,{arg}")
  c.data.update(data_dir=data_dir, num_subjects=5)
  c.optim.lr = 2e-3
  exp = trainer.build_experiment(c)
  method = exp.method
  assert methods.has(method, capability)
  other = "translate" if capability == "sample" else "sample"
  assert not methods.has(method, other)
  state = trainer.init_state(exp)
  batch = trainer.example_batch(exp.data, exp.mesh)
  step = jax.jit(method.train_step)
  l1 = []
  for i in range(20):
    state, m = step(state, batch, jax.random.key(i))
    l1.append(float(m["l1"]))
  assert int(state.step) == 20 and state.ema_of == "ae"
  assert np.mean(l1[-4:]) < np.mean(l1[:3])
  if capability == "sample":
    out = sampling.draw_for_classes(method, state, c.data, 4,
                                    jax.random.key(0), 4)
    assert out["image"].shape == (4, 16, 16, 1)
    np.testing.assert_array_equal(out["label"], [0, 0, 1, 1])
  else:
    src = np.asarray(batch["image"][..., :1])
    assert sampling.translate(method, state, src, jax.random.key(0),
                              8).shape == src.shape


def test_one_image_per_class_is_flagged_as_collapse():
  """Pooled pairs (mostly across classes) hide a per-class collapse."""
  from medgen_jax.eval import generative  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  real = rng.uniform(-1, 1, (16, 32, 32, 1)).astype(np.float32)
  labels = np.repeat([0, 1], 8)
  fake = np.concatenate([np.repeat(real[:1], 8, axis=0),
                         np.repeat(real[8:9], 8, axis=0)])
  scores = generative.class_collapse({"image": fake, "label": labels},
                                     {"image": real, "label": labels}, 20,
                                     jax.random.key(0))
  assert set(scores) == {"0", "1"}
  assert all(v > 0.99 for v in scores.values())
  diverse = generative.class_collapse({"image": real, "label": labels},
                                      {"image": real, "label": labels}, 20,
                                      jax.random.key(0))
  assert all(abs(v) < 1e-6 for v in diverse.values())
