"""Config parsing and validation fail early with messages that name the key."""

import os
import subprocess
import sys

import pytest

from configs import common, ddpm
from medgen_jax import config_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_arg_types_and_switches():
  a = common.parse_arg("res=64,runlocal,contrast=t1w", res=32, runlocal=False,
                       contrast="t2w")
  assert (a.res, a.runlocal, a.contrast) == (64, True, "t1w")


def test_parse_arg_unknown_key_names_it():
  with pytest.raises(ValueError, match=r"unknown config arg 'resolution'"):
    common.parse_arg("resolution=64", res=32)


def test_parse_arg_bad_value_names_key():
  with pytest.raises(ValueError, match=r"config arg 'res'"):
    common.parse_arg("res=big", res=32)


def test_ddpm_config_rejects_unknown_contrast():
  with pytest.raises(ValueError, match="contrast 'dwi'"):
    ddpm.get_config("contrast=dwi")


def test_default_configs_validate():
  for arg in ("", "res=64", "runlocal", "res=32,cond=label,contrast=t1w+t2w"):
    config_check.validate(ddpm.get_config(arg))


def test_validate_lists_every_problem():
  c = ddpm.get_config("runlocal")
  c.data.res = 33          # not divisible by 2
  c.method.prediction = "x"
  c.model.num_groups = 3   # does not divide 16
  c.sample.guidance_per_class = (0.0, 3.0)  # an unconditional model
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(c, num_devices=3)
  msg = str(e.value)
  assert "sample.guidance_per_class=(0.0, 3.0) needs data.cond='label'" in msg
  assert "data.res=33" in msg
  assert "method.prediction='x'" in msg
  assert "model.num_groups=3" in msg
  assert "data.batch_size=8 must be divisible by the number of devices (3)" in msg


def test_validate_unknown_dataset_and_method():
  c = ddpm.get_config("runlocal")
  c.data.dataset = "nope"
  c.method.name = "gan9000"
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(c)
  assert "unknown data.dataset 'nope'" in str(e.value)
  assert "method.name='gan9000'" in str(e.value)


def _launch(*args, timeout=120):
  return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def test_launch_rejects_unknown_override_before_compiling(tmp_path):
  r = _launch("--config=configs/ddpm.py:runlocal", "--config.train.num_stepz=5",
              f"--workdir={tmp_path}")
  assert r.returncode != 0
  # One line naming the override and the key it probably meant.
  assert ("error: a --config override names no key of the config "
          "(--config.train.num_stepz=5): 'num_stepz' Did you mean "
          '"num_steps"') in r.stderr
  assert "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_launch_rejects_bad_value_before_compiling(tmp_path):
  r = _launch("--config=configs/ddpm.py:runlocal",
              "--config.sample.sampler=heun", f"--workdir={tmp_path}")
  assert r.returncode != 0
  assert ("sample.sampler='heun' must be one of ('ddpm', 'ddim', "
          "'dpmpp_2m')") in r.stderr
  assert not os.path.exists(tmp_path / "checkpoints")
