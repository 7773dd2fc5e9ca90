"""The VAE family through the method seam: VAE, CVAE (+ mask), VQ-VAE and
the KL autoencoder with its discriminator; multi-optimizer states and
frozen inputs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import autoencoder_kl as aekl_config
from configs import cvae as cvae_config
from configs import vae as vae_config
from configs import vqvae as vqvae_config
from medgen_jax import config_check
from medgen_jax import sampling
from medgen_jax.downstream import study as study_lib
from medgen_jax.methods import base as methods
from medgen_jax.methods import losses
from medgen_jax.train import frozen as frozen_lib
from medgen_jax.train import state as state_lib
from medgen_jax.train import trainer


def _config(module, arg, data_dir, **train):
  c = module.get_config(f"res=16,runlocal,{arg}".rstrip(","))
  c.data.update(data_dir=data_dir, num_subjects=5)
  c.train.update(sample_every=0, log_every=1, **train)
  c.evals = {}
  return c


def _fit(config, steps):
  """``steps`` train steps on one fixed batch; the losses."""
  exp = trainer.build_experiment(config)
  state = trainer.init_state(exp)
  batch = trainer.example_batch(exp.data, exp.mesh)
  step = jax.jit(exp.method.train_step)
  out = []
  for i in range(steps):
    state, m = step(state, batch, jax.random.fold_in(exp.train_rng, i))
    out.append(float(m["loss"]))
  return exp, state, batch, np.asarray(out)


@pytest.fixture(scope="module")
def cvae_mask(data_dir):
  c = _config(cvae_config, "mask", data_dir)
  c.method.kl_warmup_steps = 0
  return _fit(c, 30)


def test_cvae_with_mask_learns_and_samples_image_and_mask(cvae_mask):
  exp, state, batch, loss = cvae_mask
  assert loss[-5:].mean() < 0.7 * loss[:3].mean()
  assert int(state.step) == 30
  # 3 contrasts? No: one (t2w) plus the lesion mask channel.
  assert exp.method.image_shape == (16, 16, 2)
  out = sampling.draw(exp.method, state, exp.config.data, 5,
                      jax.random.key(0), 4, cond={"label": [0, 1, 1, 0, 1]})
  assert out["image"].shape == (5, 16, 16, 1)
  assert out["lesion_mask"].shape == (5, 16, 16)
  assert out["lesion_mask"].dtype == np.uint8
  np.testing.assert_array_equal(out["label"], [0, 1, 1, 0, 1])
  assert np.all(np.abs(out["image"]) <= 1.0)
  rec = sampling.reconstruct(exp.method, state, exp.config.data,
                             jax.device_get(batch), jax.random.key(1), 8)
  assert rec["image"].shape == batch["image"].shape[:-1] + (1,)


def test_cvae_rejects_conditioning_it_cannot_use(cvae_mask):
  exp, state, _, _ = cvae_mask
  with pytest.raises(ValueError, match="labels only"):
    exp.method.sample(state, jax.random.key(0), 2,
                      {"label": jnp.zeros(2, jnp.int32),
                       "source": jnp.zeros((2, 16, 16, 1))})


def test_cvae_inpaint_keeps_pixels_outside_the_mask(cvae_mask):
  exp, state, batch, _ = cvae_mask
  image = np.asarray(batch["image"][:2, ..., :1])
  mask = np.zeros((2, 16, 16), np.float32)
  mask[:, 6:9, 6:9] = 1.0
  out = jax.jit(exp.method.inpaint)(
      state, {"image": image, "mask": mask,
              "label": jnp.ones(2, jnp.int32)}, jax.random.key(0))["image"]
  assert out.shape == (2, 16, 16, 2)
  outside = mask[..., None] == 0
  np.testing.assert_array_equal(np.asarray(out[..., :1])[outside.repeat(1, -1)],
                                image[outside.repeat(1, -1)])
  # The mask channel is the given mask in {-1, 1}.
  np.testing.assert_array_equal(np.asarray(out[..., 1]), 2 * mask - 1)
  assert not np.allclose(np.asarray(out[..., 0])[mask > 0],
                         image[..., 0][mask > 0])


def test_vae_negative_elbo_by_hand(data_dir):
  """The loss of a 1-pixel batch against the formulas: NLL + beta * KL."""
  c = _config(vae_config, "", data_dir)
  c.method.update(kl_warmup_steps=0, beta=0.5, scale="fixed",
                  fixed_scale=0.5)
  exp = trainer.build_experiment(c)
  state = trainer.init_state(exp)
  batch = trainer.example_batch(exp.data, exp.mesh)
  rng = jax.random.key(3)
  loss, m = exp.method.loss_terms(state.params, jnp.asarray(0), batch, rng)
  x = np.asarray(batch["image"], np.float64)
  mean, logvar = map(np.asarray, exp.method._posterior(  # pylint: disable=protected-access
      state.params, batch["image"], None))
  z = mean + np.exp(0.5 * logvar) * np.asarray(
      jax.random.normal(rng, mean.shape))
  loc = np.asarray(exp.method._decode_raw(state.params, z, None))  # pylint: disable=protected-access
  nll = (0.5 * ((x - loc) / 0.5) ** 2 + np.log(0.5) +
         0.5 * np.log(2 * np.pi)).sum(axis=(1, 2, 3)).mean()
  kl = (0.5 * (np.exp(logvar) + mean ** 2 - 1 - logvar)).sum(-1).mean()
  pixels = x[0].size
  np.testing.assert_allclose(float(m["nll"]), nll / pixels, rtol=1e-4)
  np.testing.assert_allclose(float(m["kl"]), kl, rtol=1e-4)
  np.testing.assert_allclose(float(loss), (nll + 0.5 * kl) / pixels,
                             rtol=1e-4)


def test_vqvae_learns_restarts_codes_and_logs_usage(data_dir):
  c = _config(vqvae_config, "", data_dir)
  exp, state, batch, loss = _fit(c, 25)
  assert loss[-5:].mean() < 0.7 * loss[:3].mean()
  codes = state.model_state
  # Every code starts dead and is restarted on the first step's batch.
  assert float(codes["cluster_size"].min()) > 0
  m = jax.jit(exp.method.train_step)(state, batch, jax.random.key(9))[1]
  assert 1.0 <= float(m["perplexity"]) <= c.model.num_codes
  assert 0.0 < float(m["codebook_usage"]) <= 1.0
  idx = exp.method.encode(state, batch, None)
  assert idx.shape == (8, 8, 8) and idx.dtype == jnp.int32
  assert exp.method.decode(state, idx)["image"].shape == batch["image"].shape
  assert not methods.has(exp.method, "sample")


def test_two_optimizer_state_advances_one_step_per_trainer_step(
    data_dir, tmp_path):
  c = _config(aekl_config, "", data_dir)
  c.method.update(disc_start=0, perceptual_weight=0.0)
  c.optim.warmup_steps = 0  # the first update moves the parameters.
  exp = trainer.build_experiment(c)
  state = trainer.init_state(exp)
  assert set(state.params) == {"ae", "disc"}
  assert set(state.opt_state) == {"ae", "disc"}
  assert state.ema_of == "ae"
  assert set(state.ema_params) == {"encoder", "decoder"}
  batch = trainer.example_batch(exp.data, exp.mesh)
  before = jax.device_get(state.params)
  new, m = jax.jit(exp.method.train_step)(state, batch, jax.random.key(0))
  assert int(new.step) == 1
  for k in ("ae", "disc"):
    moved = [not np.allclose(a, b) for a, b in zip(
        jax.tree.leaves(before[k]), jax.tree.leaves(jax.device_get(
            new.params[k])))]
    assert any(moved), k
  assert np.isfinite(float(m["d_adv"])) and np.isfinite(float(m["g_adv"]))
  # Sampling/evaluation parameters put the EMA in place of "ae" only.
  ev = state_lib.eval_params(new)
  assert ev["disc"] is new.params["disc"]
  assert ev["ae"] is new.ema_params


def test_kl_autoencoder_resumes_exactly(data_dir, tmp_path):
  def cfg(steps):
    c = _config(aekl_config, "", data_dir, num_steps=steps, ckpt_every=2)
    c.method.update(disc_start=1, perceptual_weight=0.0)
    return c

  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  trainer.train(cfg(2), a)
  trainer.train(cfg(4), a)  # resumes from step 2
  trainer.train(cfg(4), b)
  _, step_a, sa, _ = trainer.load_for_sampling(cfg(4), a)
  _, step_b, sb, _ = trainer.load_for_sampling(cfg(4), b)
  assert step_a == step_b == 4
  for x, y in zip(jax.tree.leaves(jax.device_get((sa.params, sa.opt_state))),
                  jax.tree.leaves(jax.device_get((sb.params, sb.opt_state)))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def _write_encoder(directory, width=4):
  """A tiny in-domain classifier directory, as the generative evaluator
  writes it."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from medgen_jax.nn import classifier  # pylint: disable=import-outside-toplevel
  model = classifier.ResNet(num_classes=2, width=width, stage_sizes=(1, 1),
                            num_groups=2)
  params = model.init(jax.random.key(width), jnp.zeros((1, 16, 16, 1)))
  os.makedirs(directory, exist_ok=True)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(directory, "params"), params["params"])
  ckpt.wait_until_finished()
  settings = dict(arch="ResNet", width=width, stage_sizes=[1, 1],
                  num_groups=2, inputs=["t2w"])
  with open(os.path.join(directory, "encoder.json"), "w") as f:
    json.dump(dict(settings=settings), f)


def test_frozen_inputs_are_loaded_not_saved_and_guard_the_checkpoint(
    data_dir, tmp_path):
  net, run = str(tmp_path / "net"), str(tmp_path / "run")
  _write_encoder(net)
  c = _config(aekl_config, "", data_dir, num_steps=2, ckpt_every=2)
  c.method.update(perceptual_weight=1.0, perceptual_net=net)
  out = trainer.train(c, run)
  assert np.isfinite(out["metrics"]["perceptual"])
  with open(os.path.join(run, "frozen_inputs.json")) as f:
    record = json.load(f)
  assert record["perceptual"]["directory"] == os.path.abspath(net)
  # The checkpoint holds the trained networks, not the frozen one.
  saved = os.listdir(os.path.join(run, "checkpoints", "2", "state"))
  assert not any("frozen" in s for s in saved)
  _, _, state, meta = trainer.load_for_sampling(c, run)
  assert meta["frozen"] == record
  np.testing.assert_array_equal(
      jax.device_get(state.frozen["perceptual"]["head"]["kernel"]),
      frozen_lib.load_encoder(net)[0]["head"]["kernel"])
  # The same run with another frozen network is refused, by name.
  other = str(tmp_path / "other")
  _write_encoder(other, width=8)
  c.method.perceptual_net = other
  with pytest.raises(frozen_lib.FrozenInputError, match="frozen inputs"):
    trainer.load_for_sampling(c, run)


def test_frozen_inputs_enter_the_synthetic_cache_key(tmp_path):
  from configs import study as study_config  # pylint: disable=import-outside-toplevel
  config = study_config.get_config("runlocal")
  gen = {"workdir": str(tmp_path), "config": config.generators.ddpm}
  before = study_lib.synthetic_inputs(config, gen)
  assert before["frozen_inputs"] is None
  with open(tmp_path / "frozen_inputs.json", "w") as f:
    json.dump({"stage1": {"workdir": "/x", "step": 10}}, f)
  after = study_lib.synthetic_inputs(config, gen)
  assert after["frozen_inputs"] == {"stage1": {"workdir": "/x", "step": 10}}
  assert after != before


def test_load_run_reads_another_runs_ema_parameters(data_dir, tmp_path):
  c = _config(vae_config, "", data_dir, num_steps=2, ckpt_every=2)
  trainer.train(c, str(tmp_path))
  params, config, record = frozen_lib.load_run(str(tmp_path))
  _, _, state, _ = trainer.load_for_sampling(c, str(tmp_path))
  for x, y in zip(jax.tree.leaves(params),
                  jax.tree.leaves(jax.device_get(state.ema_params))):
    np.testing.assert_array_equal(x, y)
  assert record["step"] == 2 and record["method"] == "vae"
  assert config["method"]["name"] == "vae"
  with pytest.raises(frozen_lib.FrozenInputError, match="no checkpoint 7"):
    frozen_lib.load_run(str(tmp_path), step=7)


@pytest.mark.parametrize("module,arg", [(vae_config, "dims=3"),
                                        (vqvae_config, "dims=3,mask"),
                                        (aekl_config, "dims=3")])
def test_3d_shapes(module, arg, data_dir):
  """Init and reconstruction shapes of 8^3 volumes (traced, not run)."""
  c = module.get_config(f"res=8,runlocal,{arg}")
  c.method.update(**({"perceptual_weight": 0.0}
                     if c.method.name == "autoencoder_kl" else {}))
  x = jnp.zeros((2, 8, 8, 8, 2 if c.data.get("mask_channels") else 1))
  method = methods.build(c, {"image": x})
  state = jax.eval_shape(method.init, jax.random.key(0), {"image": x})
  rec = jax.eval_shape(method.reconstruct, state, {"image": x},
                       jax.random.key(0))
  assert rec["image"].shape == x.shape
  if methods.has(method, "sample"):
    out = jax.eval_shape(lambda s, k: method.sample(s, k, 3), state,
                         jax.random.key(0))
    assert out["image"].shape == (3, 8, 8, 8, 1)


def test_a_ddpm_key_in_a_vae_config_is_one_clear_error():
  c = vae_config.get_config("runlocal")
  c.method.prediction = "v"
  c.model.attn_resolutions = (16,)
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(c)
  msg = str(e.value)
  assert "method: vae has no key(s) ['prediction']" in msg
  assert "model: the VAE has no key(s) ['attn_resolutions']" in msg


def test_every_family_config_validates():
  for module in (vae_config, cvae_config, vqvae_config, aekl_config):
    for arg in ("", "runlocal", "res=64,mask", "dims=3,res=32,runlocal"):
      config_check.validate(module.get_config(arg))


def test_free_bits_and_warmup_enter_the_objective():
  kl = jnp.asarray([[0.01, 2.0], [0.03, 4.0]])
  assert float(losses.free_bits(kl, 0.5)) == pytest.approx(0.5 + 3.0)
  assert float(losses.kl_weight(jnp.asarray(50), 2.0, 100)) == 1.0


def test_sample_mode_of_a_method_without_a_sampler_names_it(data_dir,
                                                            tmp_path):
  from medgen_jax import commands  # pylint: disable=import-outside-toplevel
  c = _config(vqvae_config, "", data_dir, num_steps=1, ckpt_every=1)
  trainer.train(c, str(tmp_path))
  with pytest.raises(methods.CapabilityError,
                     match="--mode=sample needs a method that can sample; "
                           "VQVAE provides"):
    commands.run("sample", c, str(tmp_path))
