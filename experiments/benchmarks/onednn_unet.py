r"""The U-Net benchmark in float32 and bfloat16, XLA's convolutions against
oneDNN's (``conv_lowering=onednn``), alternating in fresh processes.

  python experiments/benchmarks/onednn_unet.py --rounds=3 --steps=6 \
      [--variants fp32 bf16-xla bf16-onednn]

Each round runs ``python -m medgen_jax.bench`` once per variant (configs/
ddpm.py with arch=ref6m: batch 32 of 1x32x32; five DDIM steps time a
sampling step of batch 64; cold compiles) in a rotating order, and prints
the train step, sampling step, compile time and peak RSS of each, and its
speed-up over the first variant in that round; the last lines give each
variant's medians and the median of its per-round speed-ups. A oneDNN
variant that cannot run here falls back to XLA (the bench log says why).
On a machine with more cores than you mean to use, pin it:
``taskset -c 0,1 python ...``.
"""

import argparse
import statistics

import compare

VARIANTS = {
    "fp32": [],
    "fp32-onednn": ["--config.model.conv_lowering=onednn"],
    "bf16-xla": ["--config.model.dtype=bfloat16"],
    "bf16-onednn": ["--config.model.dtype=bfloat16",
                    "--config.model.conv_lowering=onednn"],
}
KEYS = (("train", "step_s_median"), ("sample", "sample_s_per_denoise_step"),
        ("compile", "compile_s"), ("rss", "peak_rss_mb"))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--config", default="configs/ddpm.py:res=32,arch=ref6m")
  p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                 default=["fp32", "bf16-xla", "bf16-onednn"])
  p.add_argument("--jax_flags", nargs="*",
                 default=["--config.sample.steps=5", "--nocompile_cache"])
  a = p.parse_args()
  got = {v: {k: [] for k, _ in KEYS} for v in a.variants}
  base = a.variants[0]
  for r in range(a.rounds):
    order = a.variants[r % len(a.variants):] + a.variants[:r % len(a.variants)]
    res = {}
    for v in order:
      res[v] = compare.run_jax(a.config, a.steps, [*a.jax_flags,
                                                   *VARIANTS[v]])
      for k, field in KEYS:
        got[v][k].append(res[v][field])
    print(f"round {r}: " + " | ".join(
        f"{v} train {res[v]['step_s_median']:.3f} s "
        f"(x{res[base]['step_s_median'] / res[v]['step_s_median']:.2f}), "
        f"sample {res[v]['sample_s_per_denoise_step']:.3f} s "
        f"(x{res[base]['sample_s_per_denoise_step'] / res[v]['sample_s_per_denoise_step']:.2f})"
        for v in a.variants), flush=True)
  med = statistics.median
  print(f"\n{'':14}{'train (s)':>11}{'sample (s)':>12}{'compile (s)':>13}"
        f"{'peak RSS (MB)':>15}   speed-up over {base} per round")
  for v in a.variants:
    g = got[v]
    up = [b / x for b, x in zip(got[base]["train"], g["train"])]
    ups = [b / x for b, x in zip(got[base]["sample"], g["sample"])]
    print(f"{v:14}{med(g['train']):11.3f}{med(g['sample']):12.3f}"
          f"{med(g['compile']):13.2f}{med(g['rss']):15.0f}   train "
          + " ".join(f"{q:.2f}" for q in up) + f" ({med(up):.2f}), sample "
          + " ".join(f"{q:.2f}" for q in ups) + f" ({med(ups):.2f})")


if __name__ == "__main__":
  main()
