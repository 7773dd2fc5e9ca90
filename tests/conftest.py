"""Shared fixtures: a per-session data dir and the persistent XLA cache."""

import pytest

# The repository root is importable: tests run as `python -m pytest` from it,
# or with the package installed (`pip install -e .`).
from medgen_jax import runtime

# The XLA:CPU flags launch.py sets, so tests run the same programs.
runtime.set_xla_cpu_flags()
runtime.enable_compilation_cache()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """Phantom data sets built once per test session."""
  return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tiny_config(data_dir):
  """The DDPM runlocal config on the session data dir (unlocked copy)."""
  from configs import ddpm  # pylint: disable=import-outside-toplevel
  c = ddpm.get_config("res=16,runlocal")
  c.data.data_dir = data_dir
  c.data.num_subjects = 5
  return c
