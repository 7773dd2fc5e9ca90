"""The generic trainer: resume, NaN handling, kill-and-resume, sampling."""

import json
import os
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax import commands
from medgen_jax import profiling
from medgen_jax import runtime
from medgen_jax.methods import base as methods
from medgen_jax.train import checkpoint, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(tiny_config, **train):
  c = tiny_config.copy_and_resolve_references()
  c.train.update(sample_every=0, log_every=1, ckpt_every=2, **train)
  return c


def _params(workdir, config):
  _, step, state, _ = trainer.load_for_sampling(config, str(workdir))
  return step, jax.device_get(state.params)


def _jsonl(path):
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_config,
                                                            tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  trainer.train(_config(tiny_config, num_steps=4), str(a))
  out = trainer.train(_config(tiny_config, num_steps=6), str(a))  # resumes
  trainer.train(_config(tiny_config, num_steps=6), str(b))
  assert out["step"] == 6
  step_a, pa = _params(a, _config(tiny_config, num_steps=6))
  step_b, pb = _params(b, _config(tiny_config, num_steps=6))
  assert step_a == step_b == 6
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  la, lb = _jsonl(a / "metrics.jsonl"), _jsonl(b / "metrics.jsonl")
  assert [r["step"] for r in la] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([r["loss"] for r in la], [r["loss"] for r in lb],
                             rtol=1e-5)
  assert os.path.exists(a / "config.json")
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(a))


class _NaNAfter:
  """Wraps a method so its loss turns NaN from a given step on."""

  def __init__(self, method, step):
    self._m, self._step = method, step

  def init(self, rng, batch):
    return self._m.init(rng, batch)

  def sample(self, state, rng, num, cond=None):
    return self._m.sample(state, rng, num, cond)

  def train_step(self, state, batch, rng):
    new, m = self._m.train_step(state, batch, rng)
    m = dict(m, loss=jnp.where(state.step >= self._step, jnp.nan, m["loss"]))
    return new, m


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoints(
    tiny_config, tmp_path, monkeypatch):
  real_build = methods.build
  monkeypatch.setattr(methods, "build",
                      lambda c, b: _NaNAfter(real_build(c, b), 4))
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r"step 5: .*last good checkpoint is step 4"):
    trainer.train(_config(tiny_config, num_steps=8), str(tmp_path))
  mngr = checkpoint.manager(str(tmp_path), async_save=False)
  assert mngr.all_steps() == [2, 4]
  assert [r["step"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_resume_with_another_model_config_names_the_change(tiny_config,
                                                           tmp_path):
  trainer.train(_config(tiny_config, num_steps=2), str(tmp_path))
  before = (tmp_path / "config.json").read_text()
  other = _config(tiny_config, num_steps=4)
  other.model.ch = tiny_config.model.ch // 2
  # Fails on the checkpoint's metadata, before any array is read.
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"step 2 .* arrays differ, e.g. .*kernel: "
                           r"checkpoint \(.*Changed since: model\.ch "
                           rf"{tiny_config.model.ch} -> {other.model.ch}, "
                           r"train\.num_steps 2 -> 4\."):
    trainer.train(other, str(tmp_path))
  # The record of the run and its checkpoint are untouched.
  assert (tmp_path / "config.json").read_text() == before
  assert checkpoint.manager(str(tmp_path), async_save=False).all_steps() == [2]
  with pytest.raises(checkpoint.CheckpointMismatchError, match="does not fit"):
    trainer.load_for_sampling(other, str(tmp_path))
  assert _params(tmp_path, _config(tiny_config, num_steps=2))[0] == 2


def test_damaged_checkpoint_names_itself_and_the_one_to_resume_from(
    tiny_config, tmp_path):
  trainer.train(_config(tiny_config, num_steps=4), str(tmp_path))
  damaged = tmp_path / "checkpoints" / "4"
  chunks = [p for p in damaged.glob("state/ocdbt.process_*/d/*")]
  assert chunks
  for p in chunks:  # truncated array data, as after a disk fault
    p.write_bytes(p.read_bytes()[:100])
  env = dict(os.environ, MEDGEN_DATA_DIR=tiny_config.data.data_dir)
  r = subprocess.run(
      [sys.executable, "launch.py", "--config=configs/ddpm.py:res=16,runlocal",
       "--config.data.num_subjects=5", "--config.train.num_steps=6",
       "--config.train.ckpt_every=2", "--config.train.sample_every=0",
       f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=300)
  assert r.returncode == 1
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: could not read checkpoint step 4 in "
                         f"{tmp_path}/checkpoints"), r.stderr[-2000:]
  assert last.endswith(f"Move {damaged} out of the workdir to resume from step "
                       "2 (checkpoints: [2]).")
  assert "Event loop is closed" not in r.stderr
  # Following the hint resumes from step 2; nothing else was touched.
  damaged.rename(tmp_path / "damaged_4")
  assert trainer.train(_config(tiny_config, num_steps=6),
                       str(tmp_path))["step"] == 6
  assert [r["step"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [
      1, 2, 3, 4, 5, 6]


def test_only_closed_loop_reports_are_dropped():
  seen = []
  hook = runtime._drop_closed_loop_callbacks(seen.append)  # pylint: disable=protected-access
  closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
  other = types.SimpleNamespace(exc_value=RuntimeError("disk full"))
  hook(closed)
  hook(other)
  assert seen == [other]


def test_checkpoint_refuses_non_finite_params(tmp_path):
  state = type("S", (), {"params": {"w": jnp.array([1.0, jnp.inf])}})()
  mngr = checkpoint.manager(str(tmp_path), async_save=False)
  with pytest.raises(FloatingPointError, match="contain NaN/Inf"):
    checkpoint.save(mngr, 1, state, {})
  assert mngr.all_steps() == []


def test_sigkill_then_rerun_resumes_and_sample_mode(tiny_config, tmp_path):
  """The acceptance scenario, through launch.py in a subprocess."""
  env = dict(os.environ, MEDGEN_DATA_DIR=tiny_config.data.data_dir)

  def args(num_steps, sample_every, *extra):
    return [sys.executable, "launch.py",
            "--config=configs/ddpm.py:res=16,runlocal",
            "--config.data.num_subjects=5",
            f"--config.train.num_steps={num_steps}",
            "--config.train.ckpt_every=2", "--config.train.log_every=1",
            f"--config.train.sample_every={sample_every}",
            f"--workdir={tmp_path}", *extra]

  proc = subprocess.Popen(args(400, 0), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  ckpts = tmp_path / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    done = [d for d in os.listdir(ckpts) if d.isdigit()] if ckpts.exists() else []
    if len(done) >= 2:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
  before = {r["step"]: r["loss"] for r in _jsonl(tmp_path / "metrics.jsonl")}

  final = killed_at + 4
  r = subprocess.run(args(final, 4), cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=400)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"Resumed from checkpoint step {killed_at}" in r.stderr
  # The killed run's lock died with it; the rerun says whose it took over.
  assert f"the previous holder, pid {proc.pid} on " in r.stderr
  assert f"final step" in r.stdout and str(final) in r.stdout
  rows = _jsonl(tmp_path / "metrics.jsonl")
  assert [x["step"] for x in rows] == list(range(1, final + 1))
  for x in rows:  # the curve before the kill is kept as it was
    if x["step"] <= killed_at:
      assert x["loss"] == before[x["step"]]
  assert os.path.exists(tmp_path / "samples" / f"step_{final}.png")

  r = subprocess.run(args(final, 4, "--mode=sample", "--config.sample.num=6"),
                     cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=400)
  assert r.returncode == 0, r.stderr[-3000:]
  with np.load(tmp_path / "samples" / f"final_step_{final}.npz") as z:
    assert z["image"].shape == (6, 16, 16, 1)
    assert np.isfinite(z["image"]).all() and np.abs(z["image"]).max() <= 1.0
    assert z["image_signal"].shape == (6, 16, 16, 1)


def test_sigterm_checkpoints_the_current_step(tiny_config, tmp_path):
  env = dict(os.environ, MEDGEN_DATA_DIR=tiny_config.data.data_dir)
  proc = subprocess.Popen(
      [sys.executable, "launch.py", "--config=configs/ddpm.py:res=16,runlocal",
       "--config.data.num_subjects=5", "--config.train.num_steps=100000",
       "--config.train.ckpt_every=100000", "--config.train.log_every=1",
       "--config.train.sample_every=0", f"--workdir={tmp_path}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  jsonl = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if jsonl.exists() and len(_jsonl(jsonl)) >= 3:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0].decode()
  assert proc.returncode != 0
  assert "Interrupted at step" in out
  steps = checkpoint.manager(str(tmp_path), async_save=False).all_steps()
  assert len(steps) == 1 and steps[0] >= 3


def test_cpu_train_step_is_two_programs_with_the_same_result(tiny_config):
  exp = trainer.build_experiment(_config(tiny_config, num_steps=2))
  step = trainer.jit_train_step(exp)
  assert step.split  # DDPM exposes grad_step and apply_step; this is a CPU
  state = trainer.init_state(exp)
  batch = trainer.example_batch(exp.data, exp.mesh)
  rng = jax.random.key(3)
  ref_state, ref_m = jax.jit(exp.method.train_step)(state, batch, rng)
  compiled = step.compile(state, batch, rng)
  assert len(compiled.programs) == 2
  # Both modules' instructions, kept apart although their names collide.
  modules = {k.split("/")[0] for k in profiling.parse_hlo(compiled.as_text())}
  assert len(modules) == 2
  new_state, m = step(state, batch, rng)  # donates state
  assert sorted(m) == sorted(ref_m) == ["grad_norm", "loss"]
  for k in m:
    np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-6)
  assert int(new_state.step) == 1
  for a, b in zip(jax.tree.leaves((new_state.params, new_state.opt_state,
                                   new_state.ema_params)),
                  jax.tree.leaves((ref_state.params, ref_state.opt_state,
                                   ref_state.ema_params))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
