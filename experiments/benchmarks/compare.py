r"""Alternating JAX vs PyTorch benchmark of the same DDPM U-Net on this CPU.

  python experiments/benchmarks/compare.py --rounds=3 --steps=6 [--profile]

Each round runs ``python -m medgen_jax.bench`` (configs/ddpm.py with
arch=ref6m: ch 64, (1,2,2), 2 res blocks, GroupNorm 32, batch 32, 1x32x32)
and ``torch_unet.py`` with the same architecture, each in a fresh process and
in alternating order (JAX first in even rounds), so slow drifts of a noisy
machine hit both alike. Prints the median train-step and sampling-step times
of each framework, their JAX/PyTorch ratios (below 1 means JAX is faster),
and the ratios within each round with their median, which a drift between
rounds does not move. Needs ``pip install torch==2.13.0``.

``--precision=bf16`` compares mixed precision instead: JAX with
``model.dtype=bfloat16`` and its convolutions on oneDNN
(``conv_lowering=onednn``, XLA's where oneDNN has no bf16 convolutions on
this CPU) against PyTorch under bf16 autocast (``torch_autocast.py``); both
keep float32 parameters, optimizer state and loss.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def run_jax(config: str, steps: int, extra) -> dict:
  with tempfile.NamedTemporaryFile(suffix=".json") as f:
    cmd = [sys.executable, "-m", "medgen_jax.bench", f"--config={config}",
           f"--steps={steps}", f"--out={f.name}", *extra]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    with open(f.name) as g:
      return json.load(g)


# JAX flags and PyTorch script per --precision.
PRECISIONS = {
    "fp32": ([], "torch_unet.py"),
    "bf16": (["--config.model.dtype=bfloat16",
              "--config.model.conv_lowering=onednn"], "torch_autocast.py"),
}


def run_torch(steps: int, extra, script: str = "torch_unet.py") -> dict:
  cmd = [sys.executable, os.path.join(HERE, script),
         f"--steps={steps}", *extra]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--config", default="configs/ddpm.py:res=32,arch=ref6m")
  # Five DDIM steps suffice to time one denoising step; a cold compile is
  # what a new run or a changed config pays.
  p.add_argument("--jax_flags", nargs="*",
                 default=["--config.sample.steps=5", "--nocompile_cache"],
                 help="extra flags for medgen_jax.bench, e.g. "
                      "--config.model.conv_lowering=xla")
  p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                 help="bf16: JAX bfloat16 on oneDNN convolutions against "
                      "PyTorch's bf16 autocast")
  p.add_argument("--profile", action="store_true",
                 help="also print both frameworks' per-op breakdown of a "
                      "train step")
  p.add_argument("--torch_flags", nargs="*",
                 default=["--ch=64", "--num_res_blocks=2", "--num_groups=32",
                          "--res=32", "--batch=32", "--sample_batch=64"])
  a = p.parse_args()
  jax_precision, torch_script = PRECISIONS[a.precision]
  a.jax_flags = [*a.jax_flags, *jax_precision]
  if a.profile:
    a.jax_flags = [*a.jax_flags, "--profile=1"]
    a.torch_flags = [*a.torch_flags, "--profile=2"]
  jax_train, jax_sample, torch_train, torch_sample = [], [], [], []
  jax_rss, torch_rss, compile_s = [], [], []
  for r in range(a.rounds):
    if r % 2 == 0:
      j = run_jax(a.config, a.steps, a.jax_flags)
      t = run_torch(a.steps, a.torch_flags, torch_script)
    else:
      t = run_torch(a.steps, a.torch_flags, torch_script)
      j = run_jax(a.config, a.steps, a.jax_flags)
    jax_train.append(j["step_s_median"])
    jax_sample.append(j["sample_s_per_denoise_step"])
    jax_rss.append(j["peak_rss_mb"])
    compile_s.append(j["compile_s"])
    torch_train.append(t["train_step_s"])
    torch_sample.append(t["sample_step_s"])
    torch_rss.append(t["peak_rss_mb"])
    print(f"round {r}: jax train {j['step_s_median']:.3f} s, sample step "
          f"{j['sample_s_per_denoise_step']:.3f} s | torch train "
          f"{t['train_step_s']:.3f} s, sample step {t['sample_step_s']:.3f} s",
          flush=True)
  med = statistics.median
  rows = [
      ("train step (s)", med(jax_train), med(torch_train)),
      ("sampling step, batch 64 (s)", med(jax_sample), med(torch_sample)),
      ("peak RSS (MB)", med(jax_rss), med(torch_rss)),
  ]
  print(f"\n{a.precision}: JAX {' '.join(jax_precision) or 'float32'} | "
        f"PyTorch {torch_script} {' '.join(a.torch_flags)}")
  print(f"{'':32}{'JAX':>10}{'PyTorch':>10}{'JAX/PT':>9}")
  for name, jv, tv in rows:
    print(f"{name:32}{jv:10.3f}{tv:10.3f}{jv / tv:9.2f}")
  print(f"{'JAX compile (s)':32}{med(compile_s):10.2f}")
  for name, js, ts in (("train", jax_train, torch_train),
                       ("sampling", jax_sample, torch_sample)):
    ratios = [x / y for x, y in zip(js, ts)]
    print(f"{name} JAX/PT per round: " +
          " ".join(f"{q:.2f}" for q in ratios) + f" (median {med(ratios):.2f})")
  if "profile_table" in j:
    print("\nJAX training step by op category (last round):\n" +
          j["profile_table"])
  if "profile_ms" in t:
    print("\nPyTorch training step by op category (last round, self CPU "
          "time under torch.profiler, ms):")
    for name, ms in t["profile_ms"].items():
      print(f"  {name:<26}{ms:10.1f}")


if __name__ == "__main__":
  main()
