"""Device mesh, batch sharding and rule-based parameter sharding.

One ``jax.sharding.Mesh`` with axes ``("data", "fsdp")``. Batches are split
over both axes (every device sees a distinct slice). Parameters are replicated
unless a rule or the size-based FSDP heuristic shards one of their axes over
``"fsdp"``. The same code runs on one CPU, several GPUs or a TPU slice; XLA
inserts the collectives.
"""

import re
from typing import Any, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
BATCH_AXES = ("data", "fsdp")


def make_mesh(train_cfg: ml_collections.ConfigDict,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ``(data, fsdp)`` mesh over ``devices`` (default: all devices).

  ``train_cfg.mesh_data = -1`` uses every device not taken by ``mesh_fsdp``.
  """
  devices = list(jax.devices() if devices is None else devices)
  fsdp = int(train_cfg.mesh_fsdp)
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"train.mesh_fsdp={fsdp} must divide the number of "
                     f"devices ({len(devices)})")
  data = len(devices) // fsdp if train_cfg.mesh_data == -1 else int(
      train_cfg.mesh_data)
  if data * fsdp != len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} != {len(devices)} "
                     "devices; set train.mesh_data=-1 to use all")
  return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _auto_fsdp_spec(shape: Tuple[int, ...], fsdp: int, min_size: int) -> P:
  """Shards the largest axis divisible by ``fsdp`` of large arrays."""
  if fsdp == 1 or int(np.prod(shape)) < min_size:
    return P()
  for axis in np.argsort(shape)[::-1]:
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def param_spec(path: str, shape: Tuple[int, ...], mesh: Mesh,
               rules: Sequence[Tuple[str, Tuple[Optional[str], ...]]],
               min_size: int) -> P:
  """PartitionSpec of one array: the first matching regex rule wins.

  Args:
    path: "/"-joined pytree path, e.g. ``params/ResBlock_0/Conv_0/kernel``.
    shape: the array's shape.
    mesh: the mesh (for the fsdp axis size).
    rules: ``(regex, spec)`` pairs; ``spec`` names a mesh axis or None per
      array axis, e.g. ``(".*Dense.*/kernel", (None, "fsdp"))``.
    min_size: arrays with fewer elements stay replicated under the heuristic.
  """
  for pattern, spec in rules:
    if re.fullmatch(pattern, path):
      if len(spec) != len(shape):
        raise ValueError(f"sharding rule {pattern!r} has {len(spec)} axes but "
                         f"{path} has shape {shape}")
      for dim, name in zip(shape, spec):
        if name is not None and dim % mesh.shape[name]:
          raise ValueError(f"sharding rule {pattern!r}: axis of size {dim} of "
                           f"{path} is not divisible by mesh axis {name}")
      return P(*spec)
  return _auto_fsdp_spec(tuple(shape), mesh.shape["fsdp"], min_size)


def state_shardings(mesh: Mesh, abstract_state: PyTree,
                    train_cfg: ml_collections.ConfigDict) -> PyTree:
  """NamedShardings for every leaf of ``abstract_state`` (from eval_shape).

  Scalars and small arrays are replicated; optimizer moments follow the
  parameters they belong to because they share shapes and path suffixes.
  """
  rules = tuple(train_cfg.get("param_rules", ()))
  min_size = int(train_cfg.get("fsdp_min_size", 2**18))

  def spec(path, leaf):
    if not hasattr(leaf, "shape") or leaf.ndim == 0:
      return replicated(mesh)
    return NamedSharding(
        mesh, param_spec(_path_str(path), leaf.shape, mesh, rules, min_size))

  return jax.tree_util.tree_map_with_path(spec, abstract_state)


def global_batch(local: PyTree, sharding: NamedSharding) -> PyTree:
  """Assembles this process's host arrays into one global sharded batch."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local)
