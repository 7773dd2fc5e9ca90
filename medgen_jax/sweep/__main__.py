r"""Run, emit or collect the sweep a config file defines (``get_sweep(arg)``).

  python -m medgen_jax.sweep --config=configs/ddpm.py:cond=label --workdir=W
  python -m medgen_jax.sweep --config=... --workdir=W --dry_run
  python -m medgen_jax.sweep --config=... --workdir=W --emit=commands
  python -m medgen_jax.sweep --config=... --workdir=W --emit=slurm
  python -m medgen_jax.sweep collect W [--metric=eval/*/fid] [--param=seed]

The flags of ``launch.py`` apply: ``--config=path[:args]``, fixed overrides
``--config.<key>=<value>`` given to every run, ``--mode`` of every run and
``--verbose``. Each run goes to ``W/<run name>``; ``W/sweep.json`` lists
them. Every run's config is validated before the first one starts.

  --emit=run       run them here one after another (default): a failed run
                   is recorded and the next starts; rerunning skips finished
                   runs and resumes the others from their checkpoints.
  --emit=commands  print one launch.py command per run.
  --emit=slurm     write W/sweep.slurm, a SLURM array job of the runs.
  --dry_run        print the runs and their commands; write nothing.
  collect W        W/sweep_table.{csv,md} and W/sweep_<metric>_vs_<param>.png.
"""

import importlib.util
import os
import signal
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from medgen_jax import errors
from medgen_jax.sweep import plan as plan_lib


def _launch_module():
  """``launch.py``, whose flags (--config, --workdir, --mode, --verbose)
  and flag parser this command shares."""
  if "launch" in sys.modules:
    return sys.modules["launch"]
  if not os.path.isfile(plan_lib.LAUNCH):
    sys.exit(f"error: {plan_lib.LAUNCH} not found: run the sweep from a "
             "checkout of the repository")
  spec = importlib.util.spec_from_file_location("launch", plan_lib.LAUNCH)
  module = importlib.util.module_from_spec(spec)
  sys.modules["launch"] = module
  spec.loader.exec_module(module)
  return module


launch = _launch_module()
FLAGS = flags.FLAGS
_EMIT = flags.DEFINE_enum(
    "emit", "run", ["run", "commands", "slurm"],
    "run: run the runs here one after another; commands: print one "
    "launch.py command per run; slurm: write W/sweep.slurm (an array job).")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Validate and print the runs and their commands; "
    "write nothing.")
_METRIC = flags.DEFINE_multi_string(
    "metric", [], "collect: a metric column (glob) to plot, e.g. "
    "eval/generative/fid or 'segmentation/*/f0.1/dice'; repeatable. Default: "
    "FID/KID, each study task's primary metric, or the training loss.")
_PARAM = flags.DEFINE_multi_string(
    "param", [], "collect: the swept key on the x axis (full or short "
    "name); repeatable. Default: every swept key but seeds.")


def _parse_flags(argv):
  if argv[1:2] == ["collect"]:
    try:
      return FLAGS(argv)  # no config needed
    except flags.Error as e:
      sys.exit(f"error: {' '.join(str(e).split())} (--helpshort lists the "
               "flags)")
  return launch._parse_flags(argv)  # pylint: disable=protected-access


def _raise_interrupt(signum, frame):
  del frame
  raise KeyboardInterrupt(f"received signal {signum}")


def _collect(workdir: str) -> None:
  from medgen_jax.sweep import collect as collect_lib  # pylint: disable=import-outside-toplevel
  out = collect_lib.collect(workdir, _METRIC.value, _PARAM.value)
  with open(out.md) as f:
    print(f.read(), end="")
  counts = {}
  for r in out.rows:
    counts[r.status] = counts.get(r.status, 0) + 1
  print(f"{len(out.rows)} runs: " + ", ".join(
      f"{n} {s}" for s, n in counts.items()))
  print(f"Table: {out.md}, {out.csv}")
  for p in out.plots:
    print(f"Plot: {p}")


def _sweep() -> int:
  workdir = launch._WORKDIR.value  # pylint: disable=protected-access
  if not workdir:
    sys.exit("error: --workdir=W is required (each run goes to W/<run name>)")
  config = FLAGS["config"].config_filename
  base = dict(config_flags.get_override_values(FLAGS["config"]))
  plan = plan_lib.make_plan(config, workdir, launch._MODE.value, base)  # pylint: disable=protected-access
  collect = f"python -m medgen_jax.sweep collect {workdir}"
  if _DRY_RUN.value:
    for r in plan.runs:
      print(f"[{r.index}] {r.name}\n    {r.command}")
    print(f"{len(plan.runs)} runs, all valid (--dry_run: nothing written)")
    return 0
  if _EMIT.value == "run":
    records = plan_lib.run_all(plan)
    failed = [n for n, r in records.items() if r.get("returncode") != 0]
    print(f"{len(records) - len(failed)} of {len(records)} runs finished"
          + (f"; failed: {', '.join(failed)} (logs: "
             f"{os.path.join(workdir, '<run>', plan_lib.RUN_LOG)})"
             if failed else "") + f". Then: {collect}")
    return 1 if failed else 0
  manifest = plan_lib.write_manifest(plan)
  if _EMIT.value == "commands":
    print("\n".join(r.command for r in plan.runs))
    sys.stderr.write(f"{len(plan.runs)} commands (run from {plan.cwd}); "
                     f"manifest {manifest}; then: {collect}\n")
    return 0
  path = plan_lib.write_slurm(plan)
  print(f"Wrote {path} ({len(plan.runs)} array tasks) and {manifest}.\n"
        f"Adapt its #SBATCH lines, then: sbatch {path}\nThen: {collect}")
  return 0


def main(argv):
  args = argv[1:]
  if args[:1] == ["collect"] and len(args) != 2:
    sys.exit("error: usage: python -m medgen_jax.sweep collect W "
             "[--metric=GLOB] [--param=KEY]")
  if args and args[0] != "collect":
    sys.exit(f"error: unexpected arguments {args} (collect W, or flags only)")
  signal.signal(signal.SIGTERM, _raise_interrupt)
  try:
    if args:
      _collect(args[1])
      return
    sys.exit(_sweep())
  except KeyboardInterrupt as e:
    sys.stderr.write(f"interrupted ({e or 'Ctrl-C'}); finished runs and the "
                     "interrupted run's work are saved: rerun the same "
                     "command to go on\n")
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    message = errors.user_message(e)
    if message is None or launch._VERBOSE.value:  # pylint: disable=protected-access
      raise
    sys.exit(f"error: {message}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
