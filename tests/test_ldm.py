"""Latent diffusion on a frozen stage-1 autoencoder."""

import json
import os

import jax
import numpy as np
import pytest

from configs import ldm as ldm_config
from medgen_jax import commands
from medgen_jax import config_check
from medgen_jax import sampling
from medgen_jax.train import checkpoint
from medgen_jax.train import frozen as frozen_lib
from medgen_jax.train import trainer


def _config(data_dir, arg="res=16,runlocal,mask,cond=label"):
  c = ldm_config.get_config(arg)
  for d in (c.data, c.stage1.data):
    d.update(data_dir=data_dir, num_subjects=5)
  c.stage1.train.update(num_steps=4, ckpt_every=4, sample_every=0)
  c.stage1.evals = {}
  c.train.update(num_steps=4, ckpt_every=2, sample_every=0, log_every=1)
  c.evals = {}
  c.sample.update(steps=3, num=4, batch_size=4)
  return c


@pytest.fixture(scope="module")
def ldm_run(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ldm"))
  c = _config(data_dir)
  config_check.validate(c)
  commands.run("train", c, workdir)
  return c, workdir


def test_auto_trains_stage1_then_the_ldm_and_records_it(ldm_run):
  c, workdir = ldm_run
  stage1 = os.path.join(workdir, "stage1")
  assert checkpoint.manager(stage1, async_save=False).latest_step() == 4
  with open(os.path.join(workdir, "frozen_inputs.json")) as f:
    record = json.load(f)["stage1"]
  assert record["workdir"] == stage1 and record["step"] == 4
  assert record["method"] == "autoencoder_kl"
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) for r in rows)
  # The scale was taken from the data once and kept.
  assert len({r["latent_scale"] for r in rows}) == 1
  assert rows[0]["latent_scale"] > 0


def test_stage1_stays_frozen_and_out_of_the_checkpoints(ldm_run):
  c, workdir = ldm_run
  resolved = commands.resolve_auto_inputs(c, workdir)
  exp, step, state, meta = trainer.load_for_sampling(resolved, workdir)
  assert step == 4 and meta["frozen"]["stage1"]["step"] == 4
  stage1_params, _, _ = frozen_lib.load_run(
      os.path.join(workdir, "stage1"), with_model_state=True)
  got = jax.tree.leaves(jax.device_get(state.frozen["stage1"]))
  want = jax.tree.leaves(stage1_params)
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  # The checkpoint holds the diffusion network only.
  saved = os.listdir(os.path.join(workdir, "checkpoints", "4", "state"))
  assert saved  # written
  raw = checkpoint.manager(workdir, async_save=False)
  assert "frozen" not in str(raw.item_metadata(4))


def test_samples_decode_to_images_and_masks(ldm_run):
  c, workdir = ldm_run
  resolved = commands.resolve_auto_inputs(c, workdir)
  exp, _, state, _ = trainer.load_for_sampling(resolved, workdir)
  out = sampling.draw(exp.method, state, resolved.data, 4,
                      jax.random.key(0), 4, {"label": np.array([0, 1, 0, 1])})
  assert out["image"].shape == (4, 16, 16, 1)
  assert out["lesion_mask"].shape == (4, 16, 16)
  assert np.abs(out["image"]).max() <= 1.0 and np.isfinite(out["image"]).all()
  np.testing.assert_array_equal(out["label"], [0, 1, 0, 1])


def test_config_names_a_stage1_on_other_data(data_dir, tmp_path):
  c = _config(data_dir)
  c.stage1.data.contrasts = ("t1w",)
  with pytest.raises(config_check.ConfigError,
                     match=r"data.contrasts: \['t2w'\] here, \['t1w'\] in "
                     "stage 1"):
    config_check.validate(c)
  c = _config(data_dir)
  c.method.autoencoder = str(tmp_path / "missing")
  with pytest.raises(config_check.ConfigError, match="no readable "
                     "config.json"):
    config_check.validate(c)


def test_controlnet_trains_the_adapter_and_leaves_the_base_frozen(tiny_config,
                                                                  tmp_path):
  base_dir = str(tmp_path / "base")
  base = tiny_config.copy_and_resolve_references()
  base.train.update(num_steps=2, ckpt_every=2, sample_every=0)
  trainer.train(base, base_dir)
  c = base.copy_and_resolve_references()
  c.data.mask_channels = ("lesion_mask",)
  c.method.update(condition="mask", controlnet=base_dir)
  c.evals = {}
  config_check.validate(c)
  exp = trainer.build_experiment(c)
  state = trainer.init_state(exp)
  assert "zero_0" in state.params and "hint_out" in state.params
  assert "Upsample_0" not in state.params  # the decoder is the base's only
  before = jax.device_get(state.frozen)
  batch = trainer.example_batch(exp.data, exp.mesh)
  step = jax.jit(exp.method.train_step)
  new, m = step(state, batch, jax.random.key(0))
  new, m = step(new, batch, jax.random.key(1))
  assert np.isfinite(float(m["loss"]))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(
      jax.device_get(new.frozen))):
    np.testing.assert_array_equal(a, b)
  moved = [float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(jax.device_get(state.params["zero_0"])),
      jax.tree.leaves(jax.device_get(new.params["zero_0"])))]
  assert max(moved) > 0  # the zero convolutions learn
  # A base trained on another model is refused by name.
  c.model.ch = 32
  with pytest.raises(config_check.ConfigError, match="model.ch is 32 here"):
    config_check.validate(c)


def _mask_ldm(data_dir, base_dir, controlnet):
  """A mask-conditioned LDM on ``base_dir``'s stage 1: concatenated
  masks, or a ControlNet on the base model itself."""
  c = _config(data_dir, "res=16,runlocal,cond=label,condition=mask")
  if controlnet:
    c.method.controlnet = base_dir  # its stage 1 is taken from the base
  else:
    c.method.autoencoder = os.path.join(base_dir, "stage1")
  config_check.validate(c)
  c = commands.resolve_auto_inputs(c, base_dir + "_unused")
  assert c.method.autoencoder == os.path.join(base_dir, "stage1")
  exp = trainer.build_experiment(c)
  return c, exp, trainer.init_state(exp)


@pytest.mark.parametrize("controlnet", [False, True])
def test_latents_generated_from_given_masks(ldm_run, controlnet):
  c_base, base_dir = ldm_run
  c, exp, state = _mask_ldm(c_base.data.data_dir, base_dir, controlnet)
  method = exp.method
  # 16x16 masks fold into the 8x8 latents as 4 channels beside them.
  z = method.stage1.latent_shape[-1]
  assert method.given_channels == [z, z + 1, z + 2, z + 3]
  batch = trainer.example_batch(exp.data, exp.mesh)
  latents = method._latent_batch(state, batch)["image"]  # pylint: disable=protected-access
  masks = np.asarray(batch["image"])[..., -1]
  np.testing.assert_array_equal(np.asarray(latents)[0, 2, 3, z:],
                                masks[0, 4:6, 6:8].reshape(-1))
  new = state
  if controlnet:  # (the folded variant: its batch is checked above)
    before = jax.device_get(state.frozen)
    step = jax.jit(method.train_step)
    new, m = step(state, batch, jax.random.key(0))
    new, m = step(new, batch, jax.random.key(1))
    assert np.isfinite(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(before),
                    jax.tree.leaves(jax.device_get(new.frozen))):
      np.testing.assert_array_equal(a, b)  # stage 1 and the base model
    assert set(state.frozen) == {"stage1", "base"}
    base_scale = frozen_lib.load_run(base_dir, with_model_state=True)[0][
        "model_state"]["latent_scale"]
    assert float(state.model_state["latent_scale"]) == float(base_scale)
  given = np.where(masks[:4, ..., None] > 0, 1.0, -1.0).astype(np.float32)
  out = jax.jit(lambda s, k: method.sample(
      s, k, 4, {"mask": given, "label": np.array([1, 1, 0, 0])}))(
          new, jax.random.key(2))
  assert out["image"].shape == (4, 16, 16, 2)
  np.testing.assert_array_equal(np.asarray(out["image"][..., 1:]), given)
  assert np.isfinite(np.asarray(out["image"])).all()


def test_eps_prediction_without_clipping_is_refused(data_dir):
  c = _config(data_dir)
  assert c.method.prediction == "v" and not c.sample.clip_x0
  c.method.prediction = "eps"
  with pytest.raises(config_check.ConfigError, match="x0 estimates diverge"):
    config_check.validate(c)
