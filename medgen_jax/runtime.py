"""Process-level JAX set-up shared by launch.py, the benchmark and tests."""

import logging
import os
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import jax
import ml_collections
from absl import logging as absl_logging

from medgen_jax import errors


# XLA:CPU flags the project sets (a flag already in $XLA_FLAGS wins). They
# take effect only if set before the CPU backend starts, as setup() does.
XLA_CPU_FLAGS = (
    # Order the HLO schedule to minimise live memory instead of maximising
    # concurrency: the ref6m U-Net train step needs 0.8 GB of temporaries
    # instead of 2.6 GB, and on CPUs every fresh page of them is a page fault
    # in every step (~10 us each on the 2-core VMs we measure on).
    "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
)
# jaxlib 0.10 hands every convolution to YNNPACK by default, which at
# medical-image sizes (8-64 px, 16-192 channels) runs 2x slower than XLA's
# Eigen convolutions (forward and input gradient) and 3x slower for kernel
# gradients. Keeping YNNPACK for matrix products and reductions only took
# the ref6m U-Net train step from 2.41 to 2.1-2.2 s and a sampling step from
# 1.61 to 1.14-1.22 s (python -m medgen_jax.bench). The flag is
# experimental: it is set only for jaxlib versions it was measured on,
# because XLA aborts on an unknown flag.
YNN_FLAG = ("--xla_cpu_experimental_ynn_fusion_type="
            "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE")
YNN_FLAG_JAXLIB = ("0.10.",)


# LLVM -O1 instead of -O2 for the kernels XLA generates itself: on CPUs the
# heavy ops (convolutions, matrix products, reductions) are library calls and
# XLA's own loops are memory-bound, so the ref6m train step compiles in
# 9.7 s instead of 10.8 s at the same step time. The flag sets the GPU
# backend's LLVM level too, so it is only added where no accelerator plugin
# is installed.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=1"


def _cpu_only_install() -> bool:
  """No PJRT accelerator plugin (CUDA, ROCm, TPU) is importable."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms == "cpu"
  return all(importlib.util.find_spec(m) is None
             for m in ("jax_plugins", "libtpu"))


def default_xla_cpu_flags() -> Tuple[str, ...]:
  """``XLA_CPU_FLAGS``, plus the YNNPACK fusion flag where jaxlib has it and
  the fast-compile flag on CPU-only installations."""
  import jaxlib.version  # pylint: disable=import-outside-toplevel
  flags = XLA_CPU_FLAGS
  if jaxlib.version.__version__.startswith(YNN_FLAG_JAXLIB):
    flags += (YNN_FLAG,)
  if _cpu_only_install():
    flags += (FAST_COMPILE_FLAG,)
  return flags


# Names of the flags set_xla_cpu_flags added, so that a flag the user set
# can be told from one of ours (the environment, unlike a module global,
# survives the huge-pages re-exec).
ADDED_FLAGS_ENV = "MEDGEN_JAX_ADDED_XLA_FLAGS"
SCHEDULER_FLAG = "--xla_cpu_scheduler_type"


def _flag_names(flags: str) -> List[str]:
  return [f.split("=")[0] for f in flags.split()]


def set_xla_cpu_flags(flags: Optional[Tuple[str, ...]] = None) -> str:
  """Adds ``flags`` (default: ``default_xla_cpu_flags()``) to ``$XLA_FLAGS``
  unless the user set them; returns the new value."""
  if flags is None:
    flags = default_xla_cpu_flags()
  current = os.environ.get("XLA_FLAGS", "")
  given = set(_flag_names(current))
  extra = [f for f in flags if f.split("=")[0] not in given]
  os.environ["XLA_FLAGS"] = " ".join(extra + current.split())
  added = set(_flag_names(os.environ.get(ADDED_FLAGS_ENV, "")))
  added.update(f.split("=")[0] for f in extra)
  os.environ[ADDED_FLAGS_ENV] = " ".join(sorted(added))
  return os.environ["XLA_FLAGS"]


def user_set_flag(name: str) -> bool:
  """``$XLA_FLAGS`` has ``name`` and set_xla_cpu_flags did not put it there."""
  added = _flag_names(os.environ.get(ADDED_FLAGS_ENV, ""))
  return (name in _flag_names(os.environ.get("XLA_FLAGS", ""))
          and name not in added)


def train_step_compiler_options(
    microbatches: int) -> Optional[Dict[str, str]]:
  """Per-program XLA options for a train step (``jax.jit(compiler_options=)``).

  The memory-optimised scheduler (``XLA_CPU_FLAGS``) bounds an unsplit
  step's temporaries. A step that accumulates gradients over microbatches
  is already bounded by its microbatch, and there XLA's default scheduler,
  which keeps more independent work in flight, is faster: the ref6m U-Net
  step in 4 microbatches ran 4-6% faster (1.65-1.68 vs 1.73-1.77 s),
  compiled ~1 s faster and needed fewer temporaries (177 vs 206 MB). None
  (the process flags) on accelerators, for unsplit steps, or when the user
  chose a scheduler in ``$XLA_FLAGS``.
  """
  if (microbatches <= 1 or jax.default_backend() != "cpu" or
      user_set_flag(SCHEDULER_FLAG)):
    return None
  return {SCHEDULER_FLAG[2:]: "CPU_SCHEDULER_TYPE_DEFAULT"}


def _thp_available() -> bool:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def use_huge_pages() -> None:
  """Re-executes this process with glibc's malloc using transparent huge
  pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``).

  XLA:CPU allocates each step's temporaries afresh and glibc returns large
  blocks to the OS when freed, so every step page-faults all of them in
  again: ~200k faults of 4 KB per step for the ref6m U-Net, seconds of
  system time. With 2 MB pages that is ~1000x fewer faults. A glibc tunable
  is read only at process start, hence the re-exec (call this first thing in
  ``main``; imports are redone once). No-op when already set, when the
  kernel has THP disabled, outside Linux, or with ``MEDGEN_JAX_HUGE_PAGES=0``.
  """
  import sys  # pylint: disable=import-outside-toplevel
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if ("glibc.malloc.hugetlb" in tunables or not sys.platform.startswith(
      "linux") or os.environ.get("MEDGEN_JAX_HUGE_PAGES", "1") == "0" or
      not _thp_available()):
    return
  env = dict(os.environ)
  env["GLIBC_TUNABLES"] = ":".join(
      filter(None, [tunables, "glibc.malloc.hugetlb=1"]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), env)


def release_free_memory() -> None:
  """Hands memory that the process has freed back to the OS (glibc's
  ``malloc_trim``).

  XLA's compiler frees hundreds of MB when it finishes (about 400 MB for the
  ref6m train step), but glibc keeps freed blocks in its arenas, so the
  process's footprint stays at the compiler's high-water mark on top of
  what the program then allocates. Call it after compiling. A no-op where
  the C library has no ``malloc_trim``.
  """
  import ctypes  # pylint: disable=import-outside-toplevel
  try:
    ctypes.CDLL(None).malloc_trim(0)
  except (OSError, AttributeError):
    pass


def default_cache_dir() -> str:
  return os.environ.get(
      "MEDGEN_JAX_CACHE",
      os.path.join(os.path.expanduser("~"), ".cache", "medgen_jax", "xla"))


def enable_compilation_cache(path: str = "") -> None:
  """Persistent XLA cache: a rerun or resume skips recompilation."""
  jax.config.update("jax_compilation_cache_dir", path or default_cache_dir())
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


class _QuietLibraries(logging.Filter):
  """Drops INFO chatter of orbax/TFDS internals; their warnings and errors
  pass as one line each, without the traceback: the exception reaches the
  caller, and ``launch.py`` reports it (with its traceback when it is not
  an expected failure such as a full disk)."""

  _NOISY = ("/orbax/", "/tensorflow_datasets/", "/array_record/")

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == "asyncio" and record.exc_info and errors.os_error(
        record.exc_info[1]) is not None:
      # orbax's write tasks that failed with the same full disk, reported
      # again when their loop is collected at exit.
      return False
    if not any(p in record.pathname for p in self._NOISY):
      return True
    if record.levelno < logging.WARNING:
      return False
    if "after interpreter shutdown" in str(record.msg) or any(
        "after interpreter shutdown" in str(a) for a in record.args or ()):
      # An orbax helper thread still starting when the process exits after
      # an error has been reported: noise after the real message.
      return False
    record.exc_info, record.exc_text = None, None
    return True


def _drop_closed_loop_callbacks(previous: Callable[[Any], None]):
  def hook(unraisable) -> None:
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      previous(unraisable)
  hook.drops_closed_loop_callbacks = True
  return hook


def quiet_library_logs() -> None:
  """Filters orbax/TFDS INFO logs, and the "Event loop is closed" reports
  that follow a failed orbax read.

  When reading a checkpoint fails, TensorStore finishes its other reads on
  threads whose asyncio loop orbax has already closed, and each of their
  callbacks reports ``RuntimeError('Event loop is closed')`` as an
  unraisable exception: hundreds of tracebacks, some printed after the real
  error. Only those are dropped; every other unraisable exception reaches
  the previous hook.
  """
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
  if not getattr(sys.unraisablehook, "drops_closed_loop_callbacks", False):
    sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)


def progress(iterable, total: int, initial: int = 0, desc: str = "",
             leave: bool = True):
  """A tqdm bar on process 0; redraws rarely when stderr is not a terminal.

  ``leave=False`` clears the bar when done (for inner loops).
  """
  import sys  # pylint: disable=import-outside-toplevel
  import tqdm  # pylint: disable=import-outside-toplevel
  tty = sys.stderr.isatty()
  return tqdm.tqdm(iterable, total=total, initial=initial, desc=desc,
                   disable=jax.process_index() > 0, dynamic_ncols=tty,
                   mininterval=0.5 if tty else 30.0, leave=leave)


def init_key(seed: int) -> jax.Array:
  """PRNG key for parameter initialisation.

  Uses the ``rbg`` generator (XLA's RngBitGenerator, keys derived by
  threefry): on XLA:CPU an init program full of threefry draws of many
  shapes takes 5-10x longer to compile (26 s vs 4 s for a small ResNet).
  Values are deterministic on a given backend.
  """
  return jax.random.key(seed, impl="rbg")


class DistributedSetupError(errors.UserError, ValueError):
  """The multi-process settings are incomplete or inconsistent."""


# Read by :func:`distributed_args`; of these, jax 0.10's initialize reads only
# the coordinator's address itself.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"


def _env_int(environ: Mapping[str, str], name: str) -> Optional[int]:
  raw = environ.get(name, "").strip()
  if not raw:
    return None
  try:
    return int(raw)
  except ValueError:
    raise DistributedSetupError(
        f"${name}={raw!r} is not an integer; unset it or give a "
        "number") from None


def distributed_args(train_cfg: Optional[ml_collections.ConfigDict],
                     environ: Optional[Mapping[str, str]] = None
                     ) -> Optional[Dict[str, Any]]:
  """``jax.distributed.initialize`` arguments, or None for a one-process run.

  Each of ``coordinator_address``, ``num_processes`` and ``process_id`` comes
  from ``train.<name>`` if set (``""``, ``0``, ``-1`` mean unset), else from
  ``$JAX_COORDINATOR_ADDRESS``, ``$JAX_NUM_PROCESSES``, ``$JAX_PROCESS_ID``;
  what is still None JAX detects from the cluster (SLURM, TPU pods, Open
  MPI, ...). A run is distributed with ``train.distributed=True`` or when
  more than one process is asked for.
  """
  environ = os.environ if environ is None else environ
  t = train_cfg if train_cfg is not None else ml_collections.ConfigDict()
  address = t.get("coordinator_address", "") or environ.get(
      COORDINATOR_ENV, "").strip() or None
  num = t.get("num_processes", 0) or _env_int(environ, NUM_PROCESSES_ENV)
  pid = t.get("process_id", -1)
  pid = _env_int(environ, PROCESS_ID_ENV) if pid is None or pid < 0 else pid
  if not (t.get("distributed", False) or (num or 1) > 1):
    return None
  if num is not None and num < 1:
    raise DistributedSetupError(
        f"train.num_processes / ${NUM_PROCESSES_ENV} = {num}: must be >= 1")
  if pid is not None and (pid < 0 or (num is not None and pid >= num)):
    raise DistributedSetupError(
        f"process id {pid} (train.process_id / ${PROCESS_ID_ENV}) is not in "
        f"[0, {num}): give each process its own id below the number of "
        "processes")
  if address is not None and ":" not in address:
    raise DistributedSetupError(
        f"coordinator address {address!r} needs a port (host:port, e.g. "
        "10.0.0.1:1234); set train.coordinator_address or "
        f"${COORDINATOR_ENV}")
  return {"coordinator_address": address, "num_processes": num,
          "process_id": pid}


def init_distributed(args: Dict[str, Any]) -> None:
  """``jax.distributed.initialize(**args)``; on CPU, cross-process
  collectives over gloo (TCP) unless ``$JAX_CPU_COLLECTIVES_IMPLEMENTATION``
  chose another. Must run before JAX creates its backends."""
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
    # Only the CPU client reads this. Explicit because older jax versions
    # default to no cross-process collectives on CPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**args)
  except ValueError as e:
    # No cluster was detected and an argument is missing.
    raise DistributedSetupError(
        f"cannot start a multi-process run: {str(e).rstrip('.')}. Outside "
        f"SLURM / TPU pods / Open MPI set ${COORDINATOR_ENV} (host:port of "
        f"process 0), ${NUM_PROCESSES_ENV} and ${PROCESS_ID_ENV} in every "
        "process (or train.coordinator_address, train.num_processes, "
        "train.process_id); see docs/multihost.md") from None
  absl_logging.info(
      "process %d of %d, %d local / %d global devices", jax.process_index(),
      jax.process_count(), jax.local_device_count(), jax.device_count())


def setup(config: ml_collections.ConfigDict) -> None:
  """XLA:CPU flags, multi-process init (see :func:`distributed_args`),
  caching, log filters."""
  set_xla_cpu_flags()
  quiet_library_logs()
  args = distributed_args(config.get("train"))
  if args is not None:
    init_distributed(args)
  enable_compilation_cache()
