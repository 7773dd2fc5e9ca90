r"""Benchmark a config's training step, sampler and input pipeline.

  python -m medgen_jax.bench --config=configs/ddpm.py:res=32 [--steps=20]
      [--config.model.dtype=bfloat16] [--peak_tflops=989] [--out=bench.json]
      [--profile]

Prints compile time, XLA's memory analysis of the compiled step (with
``--memory_only``, nothing else: what a device would need, computed on any
machine), train steps/s and images/s after warm-up (median over
timed steps), sampler seconds per batch and images/s (and seconds per
denoising step where the config has ``sample.steps``), input-pipeline
batches/s, peak host RSS and device memory, XLA's estimated FLOPs per step, achieved FLOP/s
and, when the device's peak is known (or given), MFU = achieved / peak. ``--profile`` also traces
training steps and prints where their time goes, per op category (forward,
input-gradient and kernel-gradient convolutions, GroupNorm, attention,
optimizer update, copies, ...; see :mod:`medgen_jax.profiling`).
"""

import json
import resource
import statistics
import time
from typing import Any, Dict

from absl import app
from absl import flags
from ml_collections import config_flags

from medgen_jax import profiling
from medgen_jax.profiling import PEAK_TFLOPS, peak_tflops  # pylint: disable=unused-import

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/ddpm.py", "Experiment config (path[:args]).",
    lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed training steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compile.")
_SAMPLE_REPEATS = flags.DEFINE_integer("sample_repeats", 1,
                                       "Timed sampler calls (0 skips).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0,
                           "Device peak TFLOP/s for MFU (0: look up).")
_OUT = flags.DEFINE_string("out", "", "Also write the results as JSON here.")
_PROFILE = flags.DEFINE_integer(
    "profile", 0, "Traced training steps for a per-op breakdown (0: none).")
_CACHE = flags.DEFINE_bool(
    "compile_cache", True, "Use the persistent XLA compilation cache; "
    "--nocompile_cache times a cold compile.")
_TOP_OPS = flags.DEFINE_integer("top_ops", 12,
                                "Slowest HLO ops listed with --profile.")
_MEMORY_ONLY = flags.DEFINE_bool(
    "memory_only", False, "Compile the training step and print XLA's "
    "memory analysis of it, without running anything (what a device would "
    "need, from any machine).")

def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory_analysis(compiled) -> Dict[str, float]:
  """XLA's buffer sizes of a compiled program, GiB: arguments, outputs,
  temporaries, donated (aliased) bytes and the total a device must hold
  (arguments + outputs + temporaries - aliased)."""
  ma = compiled.memory_analysis()
  if ma is None:  # backends without the analysis
    return {}
  gib = 2.0 ** 30
  out = {"argument_gib": ma.argument_size_in_bytes / gib,
         "output_gib": ma.output_size_in_bytes / gib,
         "temp_gib": ma.temp_size_in_bytes / gib,
         "alias_gib": ma.alias_size_in_bytes / gib}
  out["total_gib"] = (out["argument_gib"] + out["output_gib"] +
                      out["temp_gib"] - out["alias_gib"])
  return out


def device_peak_gib() -> Any:
  """The first local device's peak memory in use, GiB (``None`` where the
  backend keeps no statistics, e.g. CPU)."""
  import jax  # pylint: disable=import-outside-toplevel
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2.0 ** 30


def _timed(fn, repeats: int):
  times = []
  out = None
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
  return out, times


def run(config) -> Dict[str, Any]:
  """Runs the benchmark; returns the measurements as a flat dict."""
  import jax  # pylint: disable=import-outside-toplevel
  from medgen_jax import config_check, runtime  # pylint: disable=import-outside-toplevel
  from medgen_jax.train import sharding, trainer  # pylint: disable=import-outside-toplevel

  runtime.setup(config)
  if not _CACHE.value:
    jax.config.update("jax_enable_compilation_cache", False)
  config_check.validate(config, num_devices=jax.device_count())
  exp = trainer.build_experiment(config)
  state = trainer.init_state(exp)
  batch = trainer.example_batch(exp.data, exp.mesh)
  rng = jax.random.key(0)
  res: Dict[str, Any] = {
      "device": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(),
      "dtype": config.model.dtype,
      "batch_size": config.data.batch_size,
      "image_shape": list(exp.data.image_shape),
      "params_M": sum(x.size for x in jax.tree.leaves(state.params)) / 1e6,
  }

  if _MEMORY_ONLY.value:
    # The one-program step an accelerator runs (a CPU splits it in two),
    # with the old state donated as the trainer does.
    t = time.perf_counter()
    program = jax.jit(exp.method.train_step, donate_argnums=(0,)).lower(
        state, batch, rng).compile()
    res["compile_s"] = time.perf_counter() - t
    res.update({f"step_{k}": v for k, v in memory_analysis(program).items()})
    return res
  t = time.perf_counter()
  compiled = trainer.jit_train_step(exp).compile(state, batch, rng)
  res["compile_s"] = time.perf_counter() - t
  if len(compiled.programs) == 1:
    res.update({f"step_{k}": v
                for k, v in memory_analysis(compiled.programs[0]).items()})
  runtime.release_free_memory()  # as the trainer does after compiling
  res["flops_per_step"] = profiling.step_flops(exp.method, state, batch,
                                                rng)

  def step():
    nonlocal state
    state, m = compiled(state, batch, rng)
    jax.block_until_ready(m)

  _timed(step, _WARMUP.value)
  _, times = _timed(step, _STEPS.value)
  res["step_s_median"] = statistics.median(times)
  res["step_s_min"] = min(times)
  res["steps_per_s"] = 1.0 / res["step_s_median"]
  res["train_images_per_s"] = config.data.batch_size * res["steps_per_s"]
  res["achieved_tflops"] = res["flops_per_step"] * res["steps_per_s"] / 1e12
  peak = _PEAK.value or peak_tflops(res["device"], config.model.dtype)
  res["peak_tflops"] = peak
  res["mfu"] = res["achieved_tflops"] / (peak * jax.device_count()) if peak else None
  if _PROFILE.value:
    rows, secs, ops = profiling.profile(step, compiled.as_text(),
                                        _PROFILE.value)
    res["profile_ms"] = {r.category: r.seconds * 1e3 for r in rows}
    res["profile_table"] = profiling.format_table(rows, res["step_s_median"])
    res["profile_top_ops"] = [
        f"{name} ({cat}) {s * 1e3:.1f} ms"
        for name, cat, s in profiling.top_ops(secs, ops, _TOP_OPS.value)]

  # Input pipeline: host gather + transfer of a global batch, no model.
  bs = sharding.batch_sharding(exp.mesh)
  _, ptimes = _timed(lambda: jax.block_until_ready(
      sharding.global_batch(exp.data.batcher.batch(7), bs)), 20)
  res["input_batches_per_s"] = 1.0 / statistics.median(ptimes)

  if _SAMPLE_REPEATS.value:
    n = config.sample.batch_size
    sample_fn = jax.jit(exp.method.sample, static_argnums=2)
    t = time.perf_counter()
    sample_compiled = sample_fn.lower(state, rng, n).compile()
    res["sample_compile_s"] = time.perf_counter() - t
    runtime.release_free_memory()
    _, stimes = _timed(lambda: jax.block_until_ready(
        sample_compiled(state, rng)), _SAMPLE_REPEATS.value)
    res["sample_batch"] = n
    res["sample_s"] = statistics.median(stimes)
    res["sample_images_per_s"] = n / res["sample_s"]
    # Iterative (diffusion) samplers: the network evaluations per sample.
    steps = config.sample.get("steps")
    if steps:
      res["sample_steps"] = steps
      res["sample_s_per_denoise_step"] = res["sample_s"] / steps
  res["peak_rss_mb"] = peak_rss_mb()
  res["device_peak_gib"] = device_peak_gib()
  return res


def format_results(res: Dict[str, Any]) -> str:
  rows = []
  for k, v in res.items():
    if k.startswith("profile"):
      continue
    if isinstance(v, float):
      v = f"{v:.4g}"
    rows.append(f"  {k:<28} {v}")
  return "\n".join(rows)


def main(argv):
  del argv
  from medgen_jax import runtime  # pylint: disable=import-outside-toplevel
  runtime.use_huge_pages()
  res = run(_CONFIG.value)
  print("benchmark:\n" + format_results(res), flush=True)
  if "profile_table" in res:
    print("training step by op category (ms per step):\n" +
          res["profile_table"], flush=True)
    print("slowest ops:\n  " + "\n  ".join(res["profile_top_ops"]),
          flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(res, f, indent=2)


if __name__ == "__main__":
  app.run(main)
