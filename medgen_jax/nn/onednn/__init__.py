"""oneDNN convolutions for XLA:CPU, as an XLA FFI custom call.

XLA:CPU runs bfloat16 matrix products on the bf16 units of recent x86 CPUs
(AVX512-BF16, AMX-BF16) but not its convolutions, which run at the float32
rate or below. oneDNN's convolutions use those units. :func:`conv` computes
a channels-last convolution (``[B, *S, Ci] * [*k, Ci, Co]``, 1-3 spatial
axes, any stride and padding) with oneDNN's forward, input-gradient and
kernel-gradient primitives (bf16 or float32 in, float32 accumulation, the
input's dtype out), differentiable through ``jax.custom_vjp``.

The C++ handler (``conv_ffi.cc``) is compiled with g++ on first use, against
the headers and ``libdnnl.so`` of the ``onednn-cpu-gomp`` /
``onednn-devel-cpu-gomp`` wheels and jaxlib's FFI headers, into
``~/.cache/medgen_jax/ext/<hash>/`` (``$MEDGEN_JAX_EXT_CACHE`` overrides the
directory; the hash covers the source, jaxlib's and oneDNN's versions and
the compiler), under a file lock so concurrent processes build it once.

:func:`usable` says whether a convolution can run here and logs once why
not: not the CPU backend, a dtype other than float32/bfloat16, bfloat16 on
a CPU without bf16 units (oneDNN has no bf16 convolutions there), the
wheels or g++ missing, or the build failing. ``MEDGEN_JAX_ONEDNN=0``
switches it off. ``nn.conv`` then falls back to XLA's convolution.

Each call splits the batch over the threads of XLA's intra-op pool and runs
single-threaded oneDNN on each part, so oneDNN shares XLA's threads instead
of adding its own; ``MEDGEN_JAX_ONEDNN_THREADS=omp`` makes each call one
oneDNN call on its own OpenMP threads instead. ``ONEDNN_VERBOSE=1`` (oneDNN's
own switch) prints the kernel each primitive runs.
"""

import ctypes
import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import tempfile
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "conv_ffi.cc")
# The wheels that ship the OpenMP (libgomp) CPU build of oneDNN and its
# headers (the plain "onednn" wheels are a SYCL build that needs ~600 MB of
# Intel runtimes).
RUNTIME_DIST = "onednn-cpu-gomp"
HEADERS_DIST = "onednn-devel-cpu-gomp"
# -fopenmp: the handler sets oneDNN's (OpenMP) thread count per call.
CXXFLAGS = ("-O1", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w")
FORWARD, INPUT_GRAD, KERNEL_GRAD = 0, 1, 2
Padding = Tuple[Tuple[int, int], ...]


class Unavailable(Exception):
  """The extension cannot be used here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Extension:
  """A loaded build: its FFI target name and whether this CPU has oneDNN
  bf16 convolutions."""
  target: str
  bf16: bool
  version: str


@functools.lru_cache(maxsize=None)
def cpu_has_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
  """AVX512-BF16 or AMX-BF16 in the CPU's flags (Linux)."""
  try:
    with open(cpuinfo) as f:
      for line in f:
        if line.startswith("flags"):
          flags = line.split(":", 1)[1].split()
          return "avx512_bf16" in flags or "amx_bf16" in flags
  except OSError:
    pass
  return False


def _dist_file(dist: str, suffix: str) -> str:
  """Path of the file of installed distribution ``dist`` ending in
  ``suffix``; :class:`Unavailable` if either is missing."""
  try:
    files = importlib.metadata.distribution(dist).files or ()
  except importlib.metadata.PackageNotFoundError:
    raise Unavailable(f"the {dist} wheel is not installed (requirements.txt "
                      "installs it on x86-64 Linux)") from None
  for f in files:
    if str(f).endswith(suffix):
      path = os.path.realpath(f.locate())
      if os.path.exists(path):
        return path
  raise Unavailable(f"the {dist} wheel has no {suffix}; reinstall it")


def _build_inputs() -> Tuple[str, str, str, str]:
  """(compiler, jaxlib FFI include dir, oneDNN include dir, path of
  ``libdnnl.so.3``)."""
  cxx = shutil.which(os.environ.get("CXX", "g++"))
  if cxx is None:
    raise Unavailable("no C++ compiler (g++ or $CXX) on the PATH")
  header = _dist_file(HEADERS_DIST, "oneapi/dnnl/dnnl.hpp")
  lib = _dist_file(RUNTIME_DIST, "/libdnnl.so.3")
  return (cxx, jax.ffi.include_dir(),
          os.path.dirname(os.path.dirname(os.path.dirname(header))), lib)


def _cache_root() -> str:
  return os.environ.get("MEDGEN_JAX_EXT_CACHE", os.path.join(
      os.path.expanduser("~"), ".cache", "medgen_jax", "ext"))


def build(cache_root: Optional[str] = None) -> Tuple[str, str]:
  """Compiles ``conv_ffi.cc`` unless an identical build is cached.

  Returns:
    ``(path of the shared library, source hash)``.

  Raises:
    Unavailable: a wheel, the compiler or the cache directory is missing,
      or the compilation failed (the message has the compiler's first
      error; the full log is kept beside the build).
  """
  import fcntl  # pylint: disable=import-outside-toplevel  (POSIX only)
  cxx, ffi_inc, dnnl_inc, dnnl_lib = _build_inputs()
  import jaxlib.version  # pylint: disable=import-outside-toplevel
  try:
    with open(SOURCE, "rb") as f:
      source = f.read()
  except OSError as e:
    raise Unavailable(f"cannot read the extension's source: {e}") from None
  compiler = subprocess.run([cxx, "--version"], capture_output=True,
                            text=True, check=False).stdout.split("\n")[0]
  h = hashlib.sha256(source)
  for part in (jaxlib.version.__version__,
               importlib.metadata.version(RUNTIME_DIST), compiler,
               " ".join(CXXFLAGS), dnnl_lib):
    h.update(b"\0" + part.encode())
  digest = h.hexdigest()[:16]
  out_dir = os.path.join(cache_root or _cache_root(), digest)
  lib = os.path.join(out_dir, "medgen_onednn_conv.so")
  if os.path.exists(lib):
    return lib, digest
  try:
    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, "build.lock"), "w")
  except OSError as e:
    raise Unavailable(f"cannot write the build directory {out_dir}: {e}; "
                      "set $MEDGEN_JAX_EXT_CACHE to a writable one") from None
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it
    if os.path.exists(lib):
      return lib, digest
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [cxx, *CXXFLAGS, SOURCE, "-I", ffi_inc, "-I", dnnl_inc, dnnl_lib,
           f"-Wl,-rpath,{os.path.dirname(dnnl_lib)}", "-o", tmp]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
      os.unlink(tmp)
      log = os.path.join(out_dir, "build.log")
      with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n" + r.stderr)
      lines = r.stderr.strip().splitlines()
      first = next((l for l in lines if "error" in l), lines[0] if lines
                   else f"exit status {r.returncode}")
      raise Unavailable(f"compiling {SOURCE} failed ({first}); see {log}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, lib)  # atomic: readers see no half-written library
  return lib, digest


def _load() -> Extension:
  if os.environ.get("MEDGEN_JAX_ONEDNN", "1") == "0":
    raise Unavailable("switched off by MEDGEN_JAX_ONEDNN=0")
  path, digest = build()
  try:
    lib = ctypes.CDLL(path)
  except OSError as e:
    raise Unavailable(f"cannot load {path}: {e}") from None
  # The hash in the name: programs in XLA's persistent cache that call an
  # older build's handler do not match this one.
  target = f"medgen_onednn_conv_{digest}"
  jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.MedgenOnednnConv),
                              platform="cpu")
  v = lib.MedgenOnednnVersion()
  return Extension(target=target, bf16=bool(lib.MedgenOnednnHasBf16Conv()),
                   version=f"{v // 10000}.{v // 100 % 100}.{v % 100}")


@functools.lru_cache(maxsize=None)
def _load_once() -> Union[Extension, str]:
  try:
    return _load()
  except Unavailable as e:
    return str(e)


def load() -> Extension:
  """Builds (or finds) the library, loads it and registers its FFI target,
  once per process; :class:`Unavailable` says why it cannot (also on later
  calls, without trying again)."""
  ext = _load_once()
  if isinstance(ext, str):
    raise Unavailable(ext)
  return ext


@functools.lru_cache(maxsize=None)
def _log_once(reason: str) -> None:
  logging.warning("oneDNN convolutions unavailable, using XLA's: %s", reason)


def unavailable_reason(dtype) -> Optional[str]:
  """Why a ``dtype`` convolution cannot run on oneDNN here, or None."""
  if jax.default_backend() != "cpu":
    return f"the default backend is {jax.default_backend()}, not cpu"
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.float32, jnp.bfloat16):
    return f"{dtype} convolutions (only float32 and bfloat16 are supported)"
  if dtype == jnp.bfloat16 and not cpu_has_bf16_units():
    return "this CPU has no AVX512-BF16 or AMX-BF16 units"
  try:
    ext = load()
  except Unavailable as e:
    return str(e)
  if dtype == jnp.bfloat16 and not ext.bf16:
    return f"oneDNN {ext.version} has no bfloat16 convolution on this CPU"
  return None


def usable(dtype) -> bool:
  """Whether :func:`conv` runs for ``dtype`` here; logs once why not."""
  reason = unavailable_reason(dtype)
  if reason is not None:
    _log_once(reason)
  return reason is None


def output_shape(x_shape: Sequence[int], kernel_shape: Sequence[int],
                 strides: int, padding: Padding) -> Tuple[int, ...]:
  """``[B, *S', Co]`` of a conv of ``x_shape`` with ``kernel_shape``."""
  n = len(kernel_shape) - 2
  spatial = tuple((s + lo + hi - k) // strides + 1 for s, k, (lo, hi) in zip(
      x_shape[1:-1], kernel_shape[:n], padding))
  return (x_shape[0], *spatial, kernel_shape[-1])


def _call(kind: int, a: jax.Array, b: jax.Array, out_shape, out_dtype,
          strides: int, padding: Padding) -> jax.Array:
  return jax.ffi.ffi_call(
      load().target, jax.ShapeDtypeStruct(tuple(out_shape), out_dtype),
      vmap_method="sequential")(
          a, b, kind=np.int64(kind), stride=np.int64(strides),
          pad_lo=np.array([lo for lo, _ in padding], np.int64),
          pad_hi=np.array([hi for _, hi in padding], np.int64))


# The forward conv and its two gradients are bilinear maps that are each
# other's transposes (all three are derivatives of the one trilinear form
# sum x * kernel * dy), so each one's VJP is the other two: gradients of
# gradients (R1 and gradient penalties of GAN critics) run on oneDNN too.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: jax.Array, kernel: jax.Array, strides: int,
         padding: Padding) -> jax.Array:
  """``[B, *S, Ci]`` * ``[*k, Ci, Co]`` -> ``[B, *S', Co]`` on oneDNN.

  As ``nn.conv.xla_conv`` (``padding``: ``(lo, hi)`` per spatial axis);
  ``x`` and ``kernel`` share a dtype (float32 or bfloat16), which the
  output and all gradients have too. Check :func:`usable` first.
  """
  return _call(FORWARD, x, kernel,
               output_shape(x.shape, kernel.shape, strides, padding),
               x.dtype, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def input_grad(g: jax.Array, kernel: jax.Array, x_shape: Tuple[int, ...],
               strides: int, padding: Padding) -> jax.Array:
  """``dL/dx`` ``[B, *S, Ci]`` of :func:`conv` for ``g = dL/dy``."""
  return _call(INPUT_GRAD, g, kernel, x_shape, g.dtype, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def kernel_grad(x: jax.Array, g: jax.Array, kernel_shape: Tuple[int, ...],
                strides: int, padding: Padding) -> jax.Array:
  """``dL/dkernel`` ``[*k, Ci, Co]`` of :func:`conv` for ``g = dL/dy``."""
  return _call(KERNEL_GRAD, x, g, kernel_shape, x.dtype, strides, padding)


def _conv_fwd(x, kernel, strides, padding):
  return conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, g):
  x, kernel = residuals
  g = g.astype(x.dtype)
  return (input_grad(g, kernel, x.shape, strides, padding),
          kernel_grad(x, g, kernel.shape, strides, padding))


def _input_grad_fwd(g, kernel, x_shape, strides, padding):
  return input_grad(g, kernel, x_shape, strides, padding), (g, kernel)


def _input_grad_bwd(x_shape, strides, padding, residuals, c):
  g, kernel = residuals
  c = c.astype(g.dtype)
  return (conv(c, kernel, strides, padding),
          kernel_grad(c, g, kernel.shape, strides, padding))


def _kernel_grad_fwd(x, g, kernel_shape, strides, padding):
  return kernel_grad(x, g, kernel_shape, strides, padding), (x, g)


def _kernel_grad_bwd(kernel_shape, strides, padding, residuals, c):
  x, g = residuals
  c = c.astype(x.dtype)
  return (input_grad(g, c, x.shape, strides, padding),
          conv(x, c, strides, padding))


conv.defvjp(_conv_fwd, _conv_bwd)
input_grad.defvjp(_input_grad_fwd, _input_grad_bwd)
kernel_grad.defvjp(_kernel_grad_fwd, _kernel_grad_bwd)
