"""Microbatch resolution and splitting (medgen_jax.train.microbatch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ddpm as ddpm_config
from medgen_jax import config_check
from medgen_jax.train import microbatch


def test_auto_splits_large_cpu_batches_into_microbatches_of_at_least_8():
  assert microbatch.resolve(0, 32, 1, "cpu") == 4
  assert microbatch.resolve(0, 64, 1, "cpu") == 4
  assert microbatch.resolve(0, 36, 1, "cpu") == 4   # 9 each
  assert microbatch.resolve(0, 33, 1, "cpu") == 3   # 11 each
  assert microbatch.resolve(0, 16, 1, "cpu") == 1   # too small to gain
  assert microbatch.resolve(0, 128, 4, "cpu") == 4  # 32 per device
  assert microbatch.resolve(0, 32, 4, "cpu") == 1   # 8 per device
  assert microbatch.resolve(0, 256, 1, "gpu") == 1
  assert microbatch.resolve(2, 8, 1, "gpu") == 2


def test_explicit_count_must_divide_the_per_device_batch():
  with pytest.raises(ValueError, match="train.microbatches=3 must divide"):
    microbatch.resolve(3, 32, 1, "cpu")
  c = ddpm_config.get_config("runlocal")
  c.train.microbatches = 3
  errors = config_check.method_errors(c)
  assert any("train.microbatches=3" in e for e in errors), errors
  c.train.microbatches = -1
  assert any("train.microbatches=-1" in e for e in config_check.method_errors(c))


def test_split_is_strided_so_device_shards_stay_put():
  x = {"a": jnp.arange(12).reshape(6, 2), "b": jnp.arange(6)}
  parts = microbatch.split(x, 3)
  np.testing.assert_array_equal(parts["b"], [[0, 3], [1, 4], [2, 5]])
  np.testing.assert_array_equal(parts["a"][1], [[2, 3], [8, 9]])
  with pytest.raises(ValueError, match="not divisible"):
    microbatch.split(x, 4)


def test_mean_value_and_grad_equals_the_full_batch_gradient():
  w = jnp.array([0.5, -1.0, 2.0])
  x = jax.random.normal(jax.random.key(0), (8, 3))
  y = jax.random.normal(jax.random.key(1), (8,))
  loss = lambda w, xy: jnp.mean((xy[0] @ w - xy[1]) ** 2)
  want_v, want_g = jax.value_and_grad(loss)(w, (x, y))
  for n in (1, 2, 4):
    v, g = microbatch.mean_value_and_grad(loss, w, (x, y), n)
    np.testing.assert_allclose(v, want_v, rtol=1e-6)
    np.testing.assert_allclose(g, want_g, rtol=1e-6)
  assert float(jnp.abs(want_g).max()) > 0.1


def test_chunked_forward_equals_one_call():
  w = jax.random.normal(jax.random.key(2), (3, 4))
  x = jax.random.normal(jax.random.key(3), (8, 3))
  t = jnp.arange(8)
  fn = lambda x, t, y=None: (x @ w) * t[:, None]
  want = fn(x, t)
  for n in (1, 2, 4):
    np.testing.assert_allclose(microbatch.chunked(fn, n)(x, t), want,
                               rtol=1e-6)
