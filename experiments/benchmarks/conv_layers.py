r"""Per-layer convolution timings, JAX (XLA:CPU) against PyTorch (oneDNN).

  python experiments/benchmarks/conv_layers.py [--microbatch=8] [--batch=32]

For each 3x3 convolution shape of the reference U-Net (``arch=ref6m``) it
times the forward pass, the input gradient and the kernel gradient: in JAX
the way the microbatched train step runs them (``conv_lowering=explicit``,
``batch / microbatch`` calls of ``microbatch`` images), in PyTorch as its
eager step does (one call on the whole batch, its default threads). Each framework
runs in its own fresh process, one after the other. Prints milliseconds per
batch and the JAX/PyTorch ratio (below 1: JAX is faster). Needs
``pip install torch==2.13.0``.

``--lowering=onednn`` times JAX's oneDNN convolutions instead
(``medgen_jax.nn.onednn``), ``--dtype=bfloat16`` both sides in bf16, and
``--baseline=explicit`` compares against JAX's default float32 lowering (no
PyTorch needed)::

  python experiments/benchmarks/conv_layers.py --lowering=onednn \
      --dtype=bfloat16 --baseline=explicit
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# (side, in channels, out channels) of the ref6m U-Net's 3x3 convolutions.
SHAPES = ((32, 64, 64), (32, 128, 64), (32, 192, 64), (32, 128, 128),
          (16, 64, 128), (16, 128, 128), (16, 192, 128), (16, 256, 128),
          (8, 128, 128), (8, 256, 128))
KINDS = ("forward", "input-grad", "kernel-grad")


def _median_ms(fn, repeats: int) -> float:
  for _ in range(3):  # compile, then let the thread pools spin up
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3


def time_jax(batch: int, microbatch: int, repeats: int,
             lowering: str = "explicit", dtype: str = "float32") -> dict:
  from medgen_jax import runtime  # pylint: disable=import-outside-toplevel
  runtime.set_xla_cpu_flags()
  import jax  # pylint: disable=import-outside-toplevel
  from medgen_jax.nn import conv  # pylint: disable=import-outside-toplevel
  from medgen_jax.nn import onednn  # pylint: disable=import-outside-toplevel
  if lowering == "onednn":
    reason = onednn.unavailable_reason(dtype)
    if reason is not None:
      raise SystemExit(f"oneDNN {dtype} convolutions unavailable: {reason}")
    lib = onednn
  else:
    lib = conv
  pad = ((1, 1), (1, 1))
  calls = batch // microbatch
  out = {}
  for side, ci, co in SHAPES:
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (microbatch, side, side, ci), dtype)
    w = jax.random.normal(k2, (3, 3, ci, co), dtype)
    g = jax.random.normal(k3, (microbatch, side, side, co), dtype)
    forward = onednn.conv if lowering == "onednn" else conv.xla_conv
    fns = {
        "forward": (jax.jit(lambda x, w: forward(x, w, 1, pad)), (x, w)),
        "input-grad": (jax.jit(lambda g, w, s=x.shape: lib.input_grad(
            g, w, s, 1, pad)), (g, w)),
        "kernel-grad": (jax.jit(lambda x, g, s=w.shape: lib.kernel_grad(
            x, g, s, 1, pad)), (x, g)),
    }
    for kind, (f, args) in fns.items():
      run = lambda f=f, args=args: [jax.block_until_ready(f(*args))
                                    for _ in range(calls)]
      out[f"{side} {ci} {co} {kind}"] = _median_ms(run, repeats)
  return out


def time_torch(batch: int, repeats: int, dtype: str = "float32") -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  out = {}
  dt = getattr(torch, dtype)
  with torch.no_grad():
    for side, ci, co in SHAPES:
      x = torch.randn(batch, ci, side, side, dtype=dt)
      w = torch.randn(co, ci, 3, 3, dtype=dt)
      g = torch.randn(batch, co, side, side, dtype=dt)
      bwd = lambda mask: torch.ops.aten.convolution_backward(
          g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)
      fns = {"forward": lambda: F.conv2d(x, w, padding=1),
             "input-grad": lambda: bwd([True, False, False]),
             "kernel-grad": lambda: bwd([False, True, False])}
      for kind, f in fns.items():
        out[f"{side} {ci} {co} {kind}"] = _median_ms(f, repeats)
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--microbatch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=15)
  p.add_argument("--only", choices=("jax", "torch", "baseline"), default="")
  p.add_argument("--lowering", choices=("explicit", "onednn"),
                 default="explicit", help="JAX's convolutions: XLA's "
                 "(explicit gradients) or oneDNN's (conv_lowering=onednn)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"),
                 default="float32", help="of both frameworks' tensors")
  p.add_argument("--baseline", choices=("torch", "explicit"),
                 default="torch", help="compare against PyTorch, or against "
                 "JAX's default lowering (explicit, float32)")
  a = p.parse_args()
  if a.only == "jax":
    print(json.dumps(time_jax(a.batch, a.microbatch, a.repeats, a.lowering,
                              a.dtype)))
    return
  if a.only == "baseline":
    print(json.dumps(time_jax(a.batch, a.microbatch, a.repeats)))
    return
  if a.only == "torch":
    print(json.dumps(time_torch(a.batch, a.repeats, a.dtype)))
    return
  res = {}
  other = "torch" if a.baseline == "torch" else "baseline"
  for name in ("jax", other):
    # As a module from the repository root, so the JAX process imports
    # medgen_jax from this checkout whether or not it is installed.
    cmd = [sys.executable, "-m", "experiments.benchmarks.conv_layers",
           f"--only={name}", f"--batch={a.batch}",
           f"--microbatch={a.microbatch}", f"--repeats={a.repeats}",
           f"--lowering={a.lowering}", f"--dtype={a.dtype}"]
    done = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True,
                          text=True)
    res[name] = json.loads(done.stdout.strip().splitlines()[-1])
  res["torch"] = res[other]
  against = ("PyTorch" if a.baseline == "torch" else
             "JAX explicit float32 (same calls)")
  print(f"ms per batch of {a.batch} (JAX: {a.batch // a.microbatch} calls of "
        f"{a.microbatch}; {a.lowering}, {a.dtype}); ratio = JAX / {against}")
  print(f"{'layer':<16}" + "".join(f"{k:>26}" for k in KINDS))
  totals = {k: [0.0, 0.0] for k in KINDS}
  for side, ci, co in SHAPES:
    cells = []
    for kind in KINDS:
      j, t = (res[n][f"{side} {ci} {co} {kind}"] for n in ("jax", "torch"))
      totals[kind][0] += j
      totals[kind][1] += t
      cells.append(f"{j:7.1f} /{t:7.1f} ({j / t:4.2f})")
    print(f"{side}x{side} {ci}->{co}".ljust(16) +
          "".join(f"{c:>26}" for c in cells))
  print("sum".ljust(16) + "".join(
      f"{j:7.1f} /{t:7.1f} ({j / t:4.2f})".rjust(26)
      for j, t in totals.values()))


if __name__ == "__main__":
  main()
