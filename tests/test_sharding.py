"""Parameter-sharding rules and the mesh factory."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from medgen_jax.train import sharding


def _mesh_shape(fsdp):
  class FakeMesh:  # param_spec only reads mesh.shape
    shape = {"data": 1, "fsdp": fsdp}
  return FakeMesh()


def test_auto_fsdp_shards_largest_divisible_axis_of_big_arrays():
  mesh = _mesh_shape(4)
  assert sharding.param_spec("a/kernel", (3, 3, 64, 128), mesh, (), 1000) == \
      P(None, None, None, "fsdp")
  assert sharding.param_spec("a/kernel", (3, 3, 66, 130), mesh, (), 10) == P()
  assert sharding.param_spec("a/bias", (128,), mesh, (), 1000) == P()
  assert sharding.param_spec("a/kernel", (3, 3, 64, 128), _mesh_shape(1), (),
                             1) == P()


def test_rules_take_precedence_and_are_checked():
  mesh = _mesh_shape(2)
  rules = ((r".*Dense_0/kernel", (None, "fsdp")),)
  assert sharding.param_spec("x/Dense_0/kernel", (4, 6), mesh, rules,
                             10**9) == P(None, "fsdp")
  with pytest.raises(ValueError, match="has 2 axes"):
    sharding.param_spec("x/Dense_0/kernel", (4, 6, 2), mesh, rules, 0)
  with pytest.raises(ValueError, match="not divisible by mesh axis fsdp"):
    sharding.param_spec("x/Dense_0/kernel", (4, 5), mesh, rules, 0)


def test_make_mesh_checks_sizes():
  cfg = ml_collections.ConfigDict(dict(mesh_data=-1, mesh_fsdp=1))
  mesh = sharding.make_mesh(cfg)
  assert mesh.shape["data"] == jax.device_count()
  cfg.mesh_fsdp = 3
  with pytest.raises(ValueError, match="mesh_fsdp=3 must divide"):
    sharding.make_mesh(cfg, devices=jax.devices() * 2)


def test_global_batch_roundtrip():
  mesh = sharding.make_mesh(ml_collections.ConfigDict(
      dict(mesh_data=-1, mesh_fsdp=1)))
  x = {"image": np.arange(8 * 4, dtype=np.float32).reshape(8, 2, 2, 1)}
  g = sharding.global_batch(x, sharding.batch_sharding(mesh))
  np.testing.assert_array_equal(np.asarray(g["image"]), x["image"])
