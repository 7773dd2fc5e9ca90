"""Process-level JAX set-up shared by launch.py, the benchmark and tests."""

import logging
import os

import jax
import ml_collections
from absl import logging as absl_logging


def default_cache_dir() -> str:
  return os.environ.get(
      "MEDGEN_JAX_CACHE",
      os.path.join(os.path.expanduser("~"), ".cache", "medgen_jax", "xla"))


def enable_compilation_cache(path: str = "") -> None:
  """Persistent XLA cache: a rerun or resume skips recompilation."""
  jax.config.update("jax_compilation_cache_dir", path or default_cache_dir())
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


class _QuietLibraries(logging.Filter):
  """Drops INFO chatter of orbax/TFDS internals; warnings still pass."""

  _NOISY = ("/orbax/", "/tensorflow_datasets/", "/array_record/")

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(
        p in record.pathname for p in self._NOISY)


def quiet_library_logs() -> None:
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())


def progress(iterable, total: int, initial: int = 0, desc: str = ""):
  """A tqdm bar on process 0; redraws rarely when stderr is not a terminal."""
  import sys  # pylint: disable=import-outside-toplevel
  import tqdm  # pylint: disable=import-outside-toplevel
  tty = sys.stderr.isatty()
  return tqdm.tqdm(iterable, total=total, initial=initial, desc=desc,
                   disable=jax.process_index() > 0, dynamic_ncols=tty,
                   mininterval=0.5 if tty else 30.0)


def setup(config: ml_collections.ConfigDict) -> None:
  """Multi-host init (behind ``train.distributed``), caching, log filters."""
  quiet_library_logs()
  if config.get("train") and config.train.get("distributed", False):
    # Reads coordinator address / process ids from the cluster environment
    # (SLURM, TPU pods, or JAX_COORDINATOR_ADDRESS & co).
    jax.distributed.initialize()
  enable_compilation_cache()
