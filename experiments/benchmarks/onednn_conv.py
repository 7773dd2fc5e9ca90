r"""One convolution's forward + input gradient + kernel gradient, XLA against
oneDNN (``conv_lowering="onednn"``), float32 and bfloat16, alternating.

  python experiments/benchmarks/onednn_conv.py [--side=32 --ci=64 --co=64
      --batch=32 --ksize=3 --stride=1 --rounds=5 --reps=10]

Implementations: ``xla-f32`` and ``xla-bf16`` (the ``explicit`` lowering
XLA:CPU runs by default), ``onednn-bf16`` and ``onednn-f32`` (where
:mod:`medgen_jax.nn.onednn` can run them here; the reason is printed
otherwise). Each round times every implementation (median of ``--reps``
calls, in a rotating order so a drift of the machine's load hits all
alike) and prints its time, GFLOP/s and its ratio to ``xla-f32`` in that
round; the last lines give the median ratios. On a machine with more cores
than you mean to use, pin it: ``taskset -c 0,1 python ...`` (XLA and
oneDNN's OpenMP both follow the affinity mask).
"""

import argparse
import statistics
import time

from medgen_jax import runtime

runtime.set_xla_cpu_flags()

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from medgen_jax.nn import conv as conv_lib  # pylint: disable=g-import-not-at-top
from medgen_jax.nn import onednn  # pylint: disable=g-import-not-at-top

IMPLS = (("xla-f32", "explicit", jnp.float32),
         ("xla-bf16", "explicit", jnp.bfloat16),
         ("onednn-bf16", "onednn", jnp.bfloat16),
         ("onednn-f32", "onednn", jnp.float32))


def make_step(lowering: str, strides: int, pad):
  """jit of ``(x, k, g) -> (y, dx, dk)``."""
  def step(x, k, g):
    y, vjp = jax.vjp(lambda x, k: conv_lib.conv(x, k, strides, pad, lowering),
                     x, k)
    return (y, *vjp(g))
  return jax.jit(step)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--side", type=int, default=32)
  p.add_argument("--ci", type=int, default=64)
  p.add_argument("--co", type=int, default=64)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--ksize", type=int, default=3)
  p.add_argument("--stride", type=int, default=1)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--reps", type=int, default=10)
  a = p.parse_args()
  pad = (((a.ksize - 1) // 2, a.ksize // 2),) * 2
  rng = np.random.default_rng(0)
  x32 = rng.normal(size=(a.batch, a.side, a.side, a.ci)).astype(np.float32)
  k32 = (rng.normal(size=(a.ksize, a.ksize, a.ci, a.co)) /
         np.sqrt(a.ksize ** 2 * a.ci)).astype(np.float32)
  out = onednn.output_shape(x32.shape, k32.shape, a.stride, pad)
  g32 = rng.normal(size=out).astype(np.float32)
  # Multiply-adds of the forward pass; each gradient needs as many.
  flops = 3 * 2 * np.prod(out[:-1]) * a.ksize ** 2 * a.ci * a.co
  runs = {}
  for name, lowering, dtype in IMPLS:
    if lowering == "onednn":
      reason = onednn.unavailable_reason(dtype)
      if reason is not None:
        print(f"{name}: skipped ({reason})")
        continue
    args = [jnp.asarray(v, dtype) for v in (x32, k32, g32)]
    fn = make_step(lowering, a.stride, pad)
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    print(f"{name}: compile + first call {time.perf_counter() - t:.2f} s")
    runs[name] = (fn, args)
  print(f"conv {a.ksize}x{a.ksize}/{a.stride}, {a.batch}x{a.side}x{a.side}, "
        f"{a.ci}->{a.co}: forward + input grad + kernel grad, "
        f"{flops / 1e9:.2f} GFLOP; {jax.local_devices()[0].device_kind}, "
        f"jax {jax.__version__}")
  names = list(runs)
  ratios = {n: [] for n in names}
  for r in range(a.rounds):
    times = {}
    for n in names[r % len(names):] + names[:r % len(names)]:
      fn, args = runs[n]
      for _ in range(2):
        jax.block_until_ready(fn(*args))
      ts = []
      for _ in range(a.reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
      times[n] = statistics.median(ts)
    base = times["xla-f32"]
    print(f"round {r}: " + " | ".join(
        f"{n} {times[n] * 1e3:.1f} ms {flops / times[n] / 1e9:.0f} GFLOP/s "
        f"x{base / times[n]:.2f}" for n in names), flush=True)
    for n in names:
      ratios[n].append(base / times[n])
  print("speed-up over xla-f32 per round (median):")
  for n in names:
    print(f"  {n:12} " + " ".join(f"{q:.2f}" for q in ratios[n]) +
          f"  ({statistics.median(ratios[n]):.2f})")


if __name__ == "__main__":
  main()
