"""Orbax checkpointing with automatic resume.

Each checkpoint holds the whole ``TrainState`` and a small JSON ``meta`` item
(normalisation statistics, config name, ...). Orbax writes a step into a
temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoints intact and the half-written one is ignored.
"""

import os
from typing import Any, Dict, List, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from etils import epath

from medgen_jax import errors

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


def steps_on_disk(workdir: str) -> List[int]:
  """The finished checkpoint steps in ``workdir/checkpoints``, sorted, read
  from the directory names (no manager: it starts helper threads)."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
  return sorted(int(p) for p in names if p.isdigit())


def save(mngr: ocp.CheckpointManager, step: int, state: PyTree,
         meta: Dict[str, Any]) -> None:
  """Saves ``state`` at ``step``; refuses non-finite parameters."""
  if not all_finite(state.params):
    raise errors.NonFiniteError(
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
    raise errors.MissingFileError(f"no checkpoint in {mngr.directory}")
  check_fits(mngr, step, abstract_state)
  target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, shardings)
  try:
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises many types; name the checkpoint.
    # TensorStore errors end in a page-long spec dump: keep the cause.
    cause = str(e).split(" See full TensorStore details")[0][:400].rstrip(". ")
    earlier = [s for s in mngr.all_steps() if s < step]
    hint = (f"Move {os.path.join(str(mngr.directory), str(step))} out of the "
            f"workdir to resume from step {earlier[-1]} (checkpoints: "
            f"{earlier})." if earlier else "There is no earlier checkpoint.")
    raise CheckpointRestoreError(
        f"could not read checkpoint step {step} in {mngr.directory} (a "
        f"damaged or incomplete file?): {type(e).__name__}: {cause}. "
        f"{hint}") from e
  return step, out.state, dict(out.meta)


class CheckpointRestoreError(errors.UserError, RuntimeError):
  """A checkpoint that fits the config could not be read."""


class CheckpointMismatchError(errors.UserError, ValueError):
  """The stored state does not have the structure or shapes the config
  builds (typically: the model or optimizer config changed)."""


def _path_str(path) -> str:
  """``params/Conv_0/kernel`` for a key path of dicts, dataclasses or lists
  (orbax stores a ``TrainState`` as nested dicts of its fields)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _shapes(tree: PyTree) -> Dict[str, Tuple[int, ...]]:
  return {_path_str(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_fits(mngr: ocp.CheckpointManager, step: int,
               abstract_state: PyTree, show: int = 5) -> None:
  """Raises :class:`CheckpointMismatchError` when checkpoint ``step`` holds
  other arrays or shapes than ``abstract_state``, naming the first ``show``.

  Reads only the checkpoint's metadata, so a wrong config fails with this
  message before any array is read. Dtypes may differ (orbax casts).
  """
  path = epath.Path(str(mngr.directory)) / str(step) / "state"
  try:
    # The item's own tree metadata (a Checkpointer would also look for a
    # step-level metadata file inside the item and warn that it is missing).
    stored = _shapes(ocp.StandardCheckpointHandler().metadata(path))
  except Exception:  # pylint: disable=broad-except
    stored = {}
  if not stored:
    return  # no readable metadata: the restore itself reports problems.
  wanted = _shapes(abstract_state)
  problems = [f"{k}: checkpoint {stored[k]}, config {wanted[k]}"
              for k in sorted(wanted) if k in stored and stored[k] != wanted[k]]
  problems += [f"{k}: not in the checkpoint"
               for k in sorted(set(wanted) - set(stored))]
  problems += [f"{k}: in the checkpoint, not built by the config"
               for k in sorted(set(stored) - set(wanted))]
  if problems:
    more = f" (and {len(problems) - show} more)" if len(problems) > show else ""
    raise CheckpointMismatchError(
        f"checkpoint step {step} in {mngr.directory} does not fit this "
        f"config: {len(problems)} of {len(wanted)} arrays differ, e.g. "
        + "; ".join(problems[:show]) + more + ". The run's own settings are "
        "in the workdir's config.json.")


@jax.jit
def _finite(tree: PyTree) -> jax.Array:
  leaves = [jax.numpy.isfinite(x).all() for x in jax.tree.leaves(tree)]
  return jax.numpy.stack(leaves).all() if leaves else jax.numpy.array(True)


def all_finite(tree: PyTree) -> bool:
  return bool(_finite(tree))
