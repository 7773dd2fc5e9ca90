r"""Step time, MFU and memory of the DDPM and 3D configs on any JAX device.

  experiments/benchmarks/accelerator.sh [--peak_tflops=989] [--memory_only]
      [--budgets_gib=16,40,80] [--only=ddpm128] [--out=accelerator.json]

For each case below, in float32 and bfloat16, one fresh process of
``python -m medgen_jax.bench`` gives compile time, train step time,
images/s, achieved TFLOP/s, MFU against the device's peak (looked up, or
``--peak_tflops``), peak device memory, XLA's memory analysis of the step
and sampler images/s. For the 3D cases the largest batch that fits is then
found by doubling and bisection: on a device by running until the step no
longer fits, with ``--memory_only`` (any machine, nothing runs) against
XLA's estimate of each budget in ``--budgets_gib``.

Prints one Markdown table per mode; ``--out`` also writes every
measurement as JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

# (name, config, extra bench flags); the 3D cases are the ones bisected.
CASES = (
    ("ddpm64", "configs/ddpm.py:res=64", ()),
    ("ddpm128", "configs/ddpm.py:res=128", ()),
    ("ddpm3d64", "configs/ddpm.py:res=64,dims=3", ()),
    # Gradient checkpointing of every ResBlock. XLA:CPU's memory analysis
    # does not show its saving (its scheduler keeps the recomputed
    # activations live), so it is measured on devices only.
    ("ddpm3d64_remat", "configs/ddpm.py:res=64,dims=3",
     ("--config.model.remat=True",)),
    # Stage 1 of the 3D latent diffusion model: the full-size network of
    # an LDM (its diffusion model runs on 16^3 latents). Without the
    # perceptual loss, whose classifier a run trains into its workdir first
    # (a benchmark has none).
    ("aekl3d64", "configs/autoencoder_kl.py:res=64,dims=3",
     ("--config.method.perceptual_weight=0.0",)),
)
BISECTED = ("ddpm3d64", "ddpm3d64_remat", "aekl3d64")
DEVICE_ONLY = ("ddpm3d64_remat",)
DTYPES = ("float32", "bfloat16")
OOM = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")


def bench(config: str, dtype: str, flags: List[str], batch: Optional[int],
          memory_only: bool, peak: float) -> Tuple[Optional[Dict], str]:
  """One bench process: ``(results, "")``, or ``(None, "oom"|error tail)``."""
  with tempfile.NamedTemporaryFile(suffix=".json") as f:
    cmd = [sys.executable, "-m", "medgen_jax.bench", f"--config={config}",
           f"--config.model.dtype={dtype}", f"--out={f.name}", "--steps=5",
           "--warmup=2", *flags]
    if batch:
      cmd.append(f"--config.data.batch_size={batch}")
    if memory_only:
      # As on an accelerator: the whole batch in one pass (a CPU run
      # would split it into microbatches by itself).
      cmd += ["--memory_only", "--config.train.microbatches=1"]
    if peak:
      cmd.append(f"--peak_tflops={peak}")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
      text = p.stdout + p.stderr
      if any(s in text for s in OOM):
        return None, "oom"
      return None, text.strip().splitlines()[-1][:300] if text else "failed"
    with open(f.name) as g:
      return json.load(g), ""


def fits(res: Optional[Dict], err: str, budget: Optional[float]) -> bool:
  if res is None:
    if err != "oom":
      raise RuntimeError(err)
    return False
  return budget is None or res["step_total_gib"] <= budget


def estimated_batches(config: str, dtype: str, flags,
                      budgets: List[float], peak: float,
                      probes: Tuple[int, int] = (1, 4)) -> List[Dict]:
  """The largest batch per budget from XLA's estimate, linear in the
  batch (activations grow with it; parameters and optimizer state do
  not) through two compiled probes: no device needed."""
  (b0, b1), totals = probes, []
  for b in probes:
    res, err = bench(config, dtype, flags, b, True, peak)
    if res is None:
      raise RuntimeError(err)
    totals.append(res["step_total_gib"])
  per_example = (totals[1] - totals[0]) / (b1 - b0)
  fixed = totals[0] - b0 * per_example
  return [{"budget_gib": budget, "fixed_gib": fixed,
           "per_example_gib": per_example,
           "largest_batch": max(int((budget - fixed) // per_example), 0)}
          for budget in budgets]


def largest_batch(config: str, dtype: str, flags, memory_only: bool,
                  budget: Optional[float], peak: float,
                  limit: int = 512) -> Tuple[int, Optional[Dict]]:
  """The largest batch whose step fits (on the device, or within
  ``budget`` GiB by XLA's estimate); doubling, then bisection."""
  def probe(b):
    return bench(config, dtype, flags, b, memory_only, peak)

  lo, best = 0, None
  hi = 1
  while hi <= limit:
    res, err = probe(hi)
    if not fits(res, err, budget):
      break
    lo, best, hi = hi, res, hi * 2
  hi = min(hi, limit + 1)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    res, err = probe(mid)
    if fits(res, err, budget):
      lo, best = mid, res
    else:
      hi = mid
  return lo, best


def fmt(v, spec: str = ".3g") -> str:
  if v is None:
    return "-"
  return format(v, spec) if isinstance(v, float) else str(v)


def table(rows: List[Dict], memory_only: bool) -> str:
  if memory_only:
    head = ["case", "dtype", "batch", "params M", "XLA args GiB",
            "XLA temp GiB", "XLA total GiB"]
    keys = ["case", "dtype", "batch_size", "params_M", "step_argument_gib",
            "step_temp_gib", "step_total_gib"]
  else:
    head = ["case", "dtype", "batch", "step s", "img/s", "TFLOP/s", "MFU",
            "compile s", "peak GiB", "XLA total GiB", "sampler img/s"]
    keys = ["case", "dtype", "batch_size", "step_s_median",
            "train_images_per_s", "achieved_tflops", "mfu", "compile_s",
            "device_peak_gib", "step_total_gib", "sample_images_per_s"]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
  for r in rows:
    lines.append("| " + " | ".join(fmt(r.get(k)) for k in keys) + " |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--peak_tflops", type=float, default=0.0)
  p.add_argument("--memory_only", action="store_true")
  p.add_argument("--budgets_gib", default="16,40,80")
  p.add_argument("--only", default="", help="comma-separated case names")
  p.add_argument("--dtypes", default=",".join(DTYPES))
  p.add_argument("--no_bisect", action="store_true")
  p.add_argument("--out", default="")
  a = p.parse_args()
  only = set(filter(None, a.only.split(",")))
  budgets = [float(b) for b in a.budgets_gib.split(",")]
  rows, largest = [], []
  for name, config, flags in CASES:
    if (only and name not in only) or (a.memory_only and
                                       name in DEVICE_ONLY):
      continue
    for dtype in a.dtypes.split(","):
      res, err = bench(config, dtype, list(flags), None, a.memory_only,
                       a.peak_tflops)
      row = {"case": name, "dtype": dtype, **(res or {"error": err})}
      rows.append(row)
      print(json.dumps(row), flush=True)
      if name not in BISECTED or a.no_bisect or res is None:
        continue
      if a.memory_only:
        for r in estimated_batches(config, dtype, list(flags), budgets,
                                   a.peak_tflops):
          largest.append({"case": name, "dtype": dtype, **r})
          print(json.dumps(largest[-1]), flush=True)
        continue
      batch, best = largest_batch(config, dtype, list(flags), False, None,
                                  a.peak_tflops)
      largest.append({"case": name, "dtype": dtype, "budget_gib": None,
                      "largest_batch": batch,
                      "total_gib": (best or {}).get("step_total_gib"),
                      "peak_gib": (best or {}).get("device_peak_gib")})
      print(json.dumps(largest[-1]), flush=True)
  print("\n" + table(rows, a.memory_only))
  if largest and a.memory_only:
    print("\n| case | dtype | GiB fixed | GiB per example | largest batch in "
          + " / ".join(f"{b:g}" for b in budgets) + " GiB |"
          "\n|---|---|---|---|---|")
    for key in dict.fromkeys((r["case"], r["dtype"]) for r in largest):
      rs = [r for r in largest if (r["case"], r["dtype"]) == key]
      print(f"| {key[0]} | {key[1]} | {rs[0]['fixed_gib']:.2f} | "
            f"{rs[0]['per_example_gib']:.3f} | "
            + " / ".join(str(r["largest_batch"]) for r in rs) + " |")
  elif largest:
    print("\n| case | dtype | largest batch | XLA total GiB | peak GiB |"
          "\n|---|---|---|---|---|")
    for r in largest:
      print(f"| {r['case']} | {r['dtype']} | {r['largest_batch']} | "
            f"{fmt(r['total_gib'])} | {fmt(r['peak_gib'])} |")
  if a.out:
    with open(a.out, "w") as f:
      json.dump({"rows": rows, "largest": largest}, f, indent=2)


if __name__ == "__main__":
  main()
