"""The evaluator registry: config validation, periodic evaluation during
training, ``--mode=eval`` on a trained checkpoint, and Inception FID from a
weights file."""

import json
import os

import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from medgen_jax import commands
from medgen_jax import config_check
from medgen_jax import sampling
from medgen_jax.eval import defaults as eval_defaults
from medgen_jax.eval import encoder as encoder_lib
from medgen_jax.eval import features
from medgen_jax.eval import inception
from medgen_jax.eval import registry
from medgen_jax.train import trainer

GENERATIVE_METRICS = ("fid", "kid_mean", "kid_std", "precision", "recall",
                      "density", "coverage", "ms_ssim", "memorized_fraction",
                      "memorized_fraction_features")


def _jsonl(path):
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def _config(tiny_config, **evals_every):
  c = tiny_config.copy_and_resolve_references()
  c.train.update(num_steps=4, log_every=1, ckpt_every=4, sample_every=0)
  for name, every in evals_every.items():
    c.evals[name].every_steps = every
  return c


@pytest.fixture(scope="module")
def runs(tiny_config, tmp_path_factory):
  """The same 4 training steps with and without periodic evaluation."""
  root = tmp_path_factory.mktemp("evals")
  with_evals, plain = str(root / "with_evals"), str(root / "plain")
  trainer.train(_config(tiny_config, generative=2, loss=3), with_evals)
  trainer.train(_config(tiny_config), plain)
  return dict(with_evals=with_evals, plain=plain)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
  """Random Inception variables of the right shapes, saved as .npz."""
  rng = np.random.default_rng(0)
  flat = {}
  for name, shape in inception.expected_shapes().items():
    if name.endswith("/kernel"):
      flat[name] = rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape)
    elif name.endswith(("/scale", "/var")):
      flat[name] = rng.uniform(0.5, 1.5, shape)
    else:
      flat[name] = rng.normal(0, 0.1, shape)
  path = str(tmp_path_factory.mktemp("inception") / "inception_fid.npz")
  inception.save_variables(traverse_util.unflatten_dict(
      {k: v.astype(np.float32) for k, v in flat.items()}, sep="/"), path)
  return path


def test_registry_lookup_and_config_errors(tiny_config):
  assert registry.available() == ("generative", "inception_fid", "loss",
                                 "mask_fidelity", "reconstruction",
                                 "translation")
  assert registry.lookup("loss") is registry.TYPES["loss"]
  with pytest.raises(ValueError, match=r"unknown evaluator type 'fid'; "
                     r"registered: \('generative', 'inception_fid', 'loss', "
                     r"'mask_fidelity', 'reconstruction', 'translation'\)"):
    registry.lookup("fid")

  c = tiny_config.copy_and_resolve_references()
  assert config_check.method_errors(c) == []
  c.evals.fid = dict(type="fid")
  c.evals.untyped = dict(every_steps=5)
  c.evals.loss.update(every_steps=-1, params="best")
  c.evals.generative.update(memorization_quantile=1.5, labels="uniform")
  c.evals.generative.encoder.steps = 5  # not a multiple of steps_per_call=2
  c.evals.typo = dict(type="loss", num_batchs=3)
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(c)
  msg = str(e.value)
  for part in (
      "evals.fid.type='fid' is not a registered evaluator type; registered: "
      "('generative', 'inception_fid', 'loss', 'mask_fidelity', "
      "'reconstruction', 'translation')",
      "evals.untyped.type is missing",
      "evals.loss.every_steps=-1 must be an integer >= 0",
      "evals.loss.params='best' must be one of ('ema', 'raw')",
      "evals.generative.memorization_quantile=1.5 must be in (0, 1)",
      "evals.generative.labels='uniform' must be one of",
      "evals.generative.encoder.steps=5 must be a multiple of "
      "steps_per_call=2",
      "evals.typo.num_batchs: unknown field"):
    assert part in msg, (part, msg)

  c = tiny_config.copy_and_resolve_references()
  c.evals.generative.encoder.num_classes = 1
  # An unlabelled data set validates: its encoder learns a rotation pretext.
  assert config_check.method_errors(c) == []
  # No evals section: --mode=eval falls back to the generative evaluator.
  del c["evals"]
  assert config_check.method_errors(c) == []
  assert registry.entries(c) == {"generative": {"type": "generative"}}


def test_sample_labels_balanced_and_heldout_mix():
  np.testing.assert_array_equal(sampling.labels_for("balanced", 7, 2),
                                [0, 0, 0, 0, 1, 1, 1])
  held = np.array([0, 0, 0, 1])  # 3:1
  np.testing.assert_array_equal(
      np.bincount(sampling.labels_for("heldout", 10, 2, held)), [8, 2])
  with pytest.raises(ValueError, match="labels='x'"):
    sampling.labels_for("x", 4, 2)


def test_split_scalars_flattens_one_level():
  metrics, details = registry.split_scalars(
      dict(fid=3, kid=dict(mean=0.1, std=0.2), pr_k=2,
           memorization=dict(pixels=dict(fraction=0.0)), pairs=[(0, 1)]),
      detail_keys=("pr_k",))
  assert metrics == dict(fid=3.0, kid_mean=0.1, kid_std=0.2)
  assert set(details) == {"pr_k", "memorization", "pairs"}


def test_periodic_evaluation_writes_eval_lines_and_leaves_training_alone(
    runs):
  rows = _jsonl(os.path.join(runs["with_evals"], "metrics.jsonl"))
  by_split = {}
  for r in rows:
    by_split.setdefault(r["split"], []).append(r)
  assert [r["step"] for r in by_split["eval/generative"]] == [2, 4]
  assert [r["step"] for r in by_split["eval/loss"]] == [3, 4]
  for r in by_split["eval/generative"]:
    for k in GENERATIVE_METRICS:
      assert np.isfinite(r[k]), (k, r)
  assert all(np.isfinite(r["loss"]) and r["loss"] > 0
             for r in by_split["eval/loss"])
  # Evaluators draw their own keys: training is bit-identical.
  plain = [r for r in _jsonl(os.path.join(runs["plain"], "metrics.jsonl"))]
  assert {r["split"] for r in plain} == {"train"}
  assert by_split["train"] == plain
  for name, step in (("generative", 2), ("generative", 4), ("loss", 3)):
    assert os.path.exists(registry.record_path(runs["with_evals"], name,
                                               step))
  assert not os.path.exists(os.path.join(runs["plain"], "eval"))


def test_eval_mode_writes_all_metrics_and_cards(runs, tiny_config,
                                                weights_file, capsys):
  workdir = runs["with_evals"]
  config = _config(tiny_config)
  # Batches of 4 real (16) and synthetic (4) images: one Inception shape.
  config.evals.inception_fid = dict(
      type="inception_fid", weights=weights_file, num_samples=4,
      kid_subset_size=4, feature_batch_size=4)
  with open(registry.record_path(workdir, "generative", 4)) as f:
    during_training = json.load(f)
  encoder_card = os.path.join(workdir, "encoder", "encoder.json")
  card_mtime = os.path.getmtime(encoder_card)

  out = commands.run("eval", config, workdir)
  assert out["step"] == 4
  assert "Evaluation finished" in capsys.readouterr().out
  gen = out["results"]["generative"].metrics
  for k in GENERATIVE_METRICS:
    assert k in gen and np.isfinite(gen[k]), k
  assert 0.0 <= gen["precision"] <= 1.0 and 0.0 <= gen["recall"] <= 1.0
  assert np.isfinite(out["results"]["loss"].metrics["loss"])
  inc = out["results"]["inception_fid"].metrics
  assert set(inc) == {"fid", "kid_mean", "kid_std"}
  assert all(np.isfinite(v) for v in inc.values()) and inc["fid"] > 0
  # Same checkpoint, same fixed keys, same cached encoder: same numbers.
  assert os.path.getmtime(encoder_card) == card_mtime
  for k in GENERATIVE_METRICS:
    np.testing.assert_allclose(gen[k], during_training["metrics"][k],
                               rtol=1e-4, atol=1e-6, err_msg=k)

  with open(registry.record_path(workdir, "generative", 4)) as f:
    record = json.load(f)
  card = record["card"]
  assert card["extractor"] == "in-domain encoder"
  assert card["encoder"]["settings"]["arch"] == "ResNet"
  assert card["real"]["split"] == config.data.eval_split
  assert card["synthetic"]["num"] == config.evals.generative.num_samples
  assert record["details"]["num_synthetic"] == 16
  assert "memorization" in record["details"]
  with open(registry.record_path(workdir, "loss", 4)) as f:
    assert json.load(f)["card"]["params"] == "ema"
  with open(registry.record_path(workdir, "inception_fid", 4)) as f:
    card = json.load(f)["card"]
  assert card["weights"] == os.path.abspath(weights_file)
  assert len(card["weights_sha256"]) == 64
  assert card["preprocessing"]["channels"] == ["t2w"]
  assert card["preprocessing"]["input_range"] == [-1.0, 1.0]
  # Re-evaluating a step replaces its lines instead of duplicating them.
  rows = _jsonl(os.path.join(workdir, "metrics.jsonl"))
  keys = [(r["step"], r["split"]) for r in rows]
  assert len(keys) == len(set(keys))
  for name in ("generative", "loss", "inception_fid"):
    assert (4, f"eval/{name}") in keys


def test_sampling_cost_table_per_sampler_and_nfe(runs, tiny_config, capsys):
  workdir = runs["plain"]
  config = _config(tiny_config)
  config.sample.cost_steps = (2, 3)
  out = commands.run("sampling_cost", config, workdir)
  # The ancestral sampler needs all T steps, which are not asked for.
  assert [(r["sampler"], r["nfe"]) for r in out["rows"]] == [
      ("ddim", 2), ("ddim", 3), ("dpmpp_2m", 2), ("dpmpp_2m", 3)]
  for r in out["rows"]:
    for k in ("fid", "kid", "precision", "recall", "ms_per_image"):
      assert np.isfinite(r[k]), (r, k)
    assert r["seconds"] > 0
  printed = capsys.readouterr().out
  assert "| dpmpp_2m | 3 | " in printed
  md = os.path.join(workdir, "eval", "sampling_cost_step_4.md")
  with open(md) as f:
    assert f.read().count("\n") == 2 + len(out["rows"])


def test_launch_accepts_eval_mode():
  import launch  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  assert "eval" in flags.FLAGS["mode"].parser.enum_values
  assert commands.MODES["eval"] is commands.evaluate
  del launch


def test_inception_fid_missing_weights_file_is_named(tiny_config, tmp_path):
  config = _config(tiny_config)
  missing = str(tmp_path / "no_such_weights.npz")
  config.evals.inception_fid = dict(type="inception_fid", weights=missing)
  errors = config_check.method_errors(config)
  assert any(missing in e and "not found" in e for e in errors), errors
  with pytest.raises(ValueError, match="no_such_weights.npz not found"):
    registry.build(config, "inception_fid", config.evals.inception_fid,
                   str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing written


def test_fid_in_the_joint_span_equals_fid():
  rng = np.random.default_rng(0)
  real = rng.normal(size=(20, 128)) * rng.uniform(0.5, 2.0, 128)
  fake = rng.normal(0.3, 1.0, size=(12, 128))
  r, f = registry.joint_span(real, fake)
  assert r.shape == (20, 33) and f.shape == (12, 33)
  np.testing.assert_allclose(features.fid_from_features(r, f),
                             features.fid_from_features(real, fake),
                             rtol=1e-6)


def test_mask_fidelity_scores_images_drawn_for_heldout_masks(data_dir,
                                                             tmp_path):
  from configs import ddpm as ddpm_config  # pylint: disable=import-outside-toplevel
  c = ddpm_config.get_config("res=16,runlocal,condition=mask")
  c.data.update(data_dir=data_dir, num_subjects=5)
  c.train.update(num_steps=2, ckpt_every=2, sample_every=0)
  c.evals = {"mask_fidelity": c.evals.mask_fidelity}
  trainer.train(c, str(tmp_path))
  out = commands.run("eval", c, str(tmp_path))
  m = out["results"]["mask_fidelity"].metrics
  assert 0.0 <= m["dice"] <= 1.0 and 0.0 <= m["dice_real"] <= 1.0
  card = out["results"]["mask_fidelity"].card
  assert card["split"] == c.data.eval_split and card["num_examples"] == 16
  # A generator that draws its own masks cannot be scored this way.
  plain = ddpm_config.get_config("res=16,runlocal")
  plain.evals = {"mask_fidelity": {"type": "mask_fidelity"}}
  assert any("needs data.mask_channels" in e
             for e in registry.config_errors(plain))


def test_unlabelled_data_trains_the_encoder_on_rotations(tmp_path):
  """No classes: the in-domain encoder predicts which of 4 rotations was
  applied; an asymmetric shape makes that learnable, and held-out accuracy
  must beat chance (0.25) clearly."""
  rng = np.random.default_rng(0)

  def images(n):
    x = rng.normal(0, 0.1, (n, 8, 8, 1)).astype(np.float32)
    x[:, 1:7, 1:3] += 1.0   # an "L": a bar down the left ...
    x[:, 5:7, 1:6] += 1.0   # ... and a foot to the right
    return dict(image=x, label=np.zeros(n, np.int32))

  cfg = ml_collections.ConfigDict(eval_defaults.ENCODER_DEFAULTS)
  cfg.update(num_classes=1, width=8, stage_sizes=(1, 1), num_groups=4,
             steps=30, steps_per_call=30, batch_size=32,
             conv_lowering="explicit")
  enc = encoder_lib.train_or_load(cfg, ("t1",), 2, images(32), images(16),
                                  str(tmp_path / "enc"))
  assert enc.card["settings"]["pretext"] == "rotation"
  assert "rotations" in enc.card["description"]
  assert enc.card["held_out_scores"]["accuracy"] > 0.6, enc.card
  rot = encoder_lib.rotated(images(3))
  assert rot["image"].shape == (12, 8, 8, 1)
  np.testing.assert_array_equal(rot["label"], np.repeat(np.arange(4), 3))
  np.testing.assert_array_equal(rot["image"][3], np.rot90(rot["image"][0]))
