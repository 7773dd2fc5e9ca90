"""Orbax checkpointing with automatic resume.

Each checkpoint holds the whole ``TrainState`` and a small JSON ``meta`` item
(normalisation statistics, config name, ...). Orbax writes a step into a
temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoints intact and the half-written one is ignored.
"""

import os
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

PyTree = Any


def manager(workdir: str, keep: int = 3,
            async_save: bool = True) -> ocp.CheckpointManager:
  """CheckpointManager over ``workdir/checkpoints``."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      item_names=("state", "meta"), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: PyTree,
         meta: Dict[str, Any]) -> None:
  """Saves ``state`` at ``step``; refuses non-finite parameters."""
  if not all_finite(state.params):
    raise FloatingPointError(
        f"refusing to checkpoint step {step}: parameters contain NaN/Inf; "
        f"the last good checkpoint is step {mngr.latest_step()}")
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore(mngr: ocp.CheckpointManager, abstract_state: PyTree,
            shardings: PyTree,
            step: Optional[int] = None) -> Tuple[int, PyTree, Dict[str, Any]]:
  """Restores ``step`` (default: latest) onto ``shardings``.

  Args:
    mngr: the manager.
    abstract_state: ``jax.eval_shape`` of the state (structure and dtypes).
    shardings: NamedShardings matching ``abstract_state``.
    step: which step; ``None`` for the latest.

  Returns:
    ``(step, state, meta)``.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
  target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, shardings)
  try:
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises many types; name the checkpoint.
    raise RuntimeError(
        f"could not restore checkpoint step {step} from {mngr.directory}: "
        f"{type(e).__name__}: {e}. If the model config changed since it was "
        "written, use a new --workdir.") from e
  return step, out.state, dict(out.meta)


@jax.jit
def _finite(tree: PyTree) -> jax.Array:
  leaves = [jax.numpy.isfinite(x).all() for x in jax.tree.leaves(tree)]
  return jax.numpy.stack(leaves).all() if leaves else jax.numpy.array(True)


def all_finite(tree: PyTree) -> bool:
  return bool(_finite(tree))
