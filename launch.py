r"""medgen_jax entry point.

  python launch.py          # the default augmentation study (configs/study.py)
  python launch.py --config=configs/ddpm.py:res=32,runlocal --workdir=/tmp/x
  python launch.py --config=configs/ddpm.py --config.train.num_steps=500 ...
  python launch.py --config=... --workdir=DIR --mode=sample

Modes:
  auto    the config's main job: study for configs/study.py, else train.
  study   run or resume the augmentation study; writes DIR/report.md.
  train   train the configured method; resumes from DIR/checkpoints.
  sample  draw config.sample.num samples from the latest checkpoint into
          DIR/samples/final_step_N.{npz,png}.
  eval    run every evaluator of config.evals (FID/KID, precision/recall,
          memorization, validation loss, ...) on the latest checkpoint;
          writes DIR/eval/<name>_step_N.json and metrics.jsonl lines.
  sampling_cost  in-domain FID/KID and wall time against the number of
          network evaluations, per sampler (diffusion and flow configs);
          writes DIR/eval/sampling_cost_step_N.{json,md}.
  inspect build the configured data set if needed, print its summary (counts
          per split and class, shapes, intensities, mask values) and write
          DIR/inspect/<dataset>_grid.png with the masks overlaid.
"""

import ast
import logging as std_logging
import os
import signal
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

DEFAULT_CONFIG = "configs/study.py"
_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Experiment config file (path[:args]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, metrics, samples). Default: "
    "workdirs/<config file name>.")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show the traceback of expected failures too (bad "
    "config, data, checkpoint, disk); bugs always show theirs.")
_MODE = flags.DEFINE_enum(
    "mode", "auto",
    ["auto", "train", "sample", "eval", "study", "inspect", "sampling_cost"],
    "What to do; auto: the config's main job (study for study configs, "
    "train otherwise).")


def _default_workdir(config_arg: str) -> str:
  name = os.path.splitext(os.path.basename(config_arg.split(":")[0]))[0]
  return os.path.join("workdirs", name)


def _raise_interrupt(signum, frame):
  del frame
  raise KeyboardInterrupt(f"received signal {signum}")


def _verbose(argv) -> bool:
  # Read before absl parses: a flag error must know whether to show a trace.
  return any(a in ("--verbose", "--verbose=true", "--verbose=True")
             for a in argv[1:])


def _config_problem(e: BaseException) -> str:
  """The last line of a config file's failure (absl wraps it in a flag
  error whose text embeds the whole traceback)."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[-1] if lines else type(e).__name__


def _parse_flags(argv):
  """absl's parser with one-line errors for the config flag: a config file
  that is missing, raises or gets an unknown ``:arg``, and a
  ``--config.<key>`` override of a key the config does not have
  (ml_collections raises AttributeError or KeyError, with a "did you mean"
  hint, from inside flag parsing)."""
  config_arg = DEFAULT_CONFIG
  for i, a in enumerate(argv[1:], start=1):
    if a.startswith("--config="):
      config_arg = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      config_arg = argv[i + 1]
  path = config_arg.split(":")[0]
  if not os.path.isfile(path):
    # ml_collections would defer this to the config's first use.
    sys.exit(f"error: config file {path} not found (--config=path[:args], "
             "e.g. configs/ddpm.py:res=32)")
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    if _verbose(argv):
      raise
    detail = str(e.args[0] if e.args else e)
    for _ in range(2):  # the hint arrives as the repr of a KeyError's repr.
      try:
        detail = str(ast.literal_eval(detail))
      except (ValueError, SyntaxError):
        break
    detail = " ".join(detail.split())
    given = [a for a in argv[1:] if a.startswith("--config.")]
    sys.exit(f"error: a --config override names no key of the config "
             f"({' '.join(given)}): {detail}")
  except flags.Error as e:
    if _verbose(argv):
      raise
    if "Error whilst parsing config file" in str(e):
      sys.exit(f"error: --config={config_arg}: {_config_problem(e)}; see the "
               f"args in {path}'s docstring")
    sys.exit(f"error: {' '.join(str(e).split())} (--helpshort lists the "
             "flags)")
  except Exception as e:  # pylint: disable=broad-except
    # The config file itself raised: name it and its error, not absl's.
    if _verbose(argv):
      raise
    sys.exit(f"error: config file {path} raised {type(e).__name__}: "
             f"{' '.join(str(e).split())} (--verbose shows the traceback)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imports after flag parsing: a bad flag fails fast, before JAX starts.
  import jax  # pylint: disable=import-outside-toplevel
  from medgen_jax import config_check, errors, runtime  # pylint: disable=import-outside-toplevel
  # Re-executes once with huge pages for malloc (see runtime.use_huge_pages).
  runtime.use_huge_pages()

  config = _CONFIG.value
  # Cluster schedulers pre-empt with SIGTERM: treat it like Ctrl-C. While
  # training, the trainer holds both back until the running step is done and
  # then checkpoints it (see medgen_jax/train/interrupts.py).
  signal.signal(signal.SIGTERM, _raise_interrupt)
  workdir = _WORKDIR.value or _default_workdir(flags.FLAGS["config"].config_filename)
  try:
    # Inside the boundary: a bad multi-process setting is one line too.
    runtime.setup(config)
    config_check.validate(config, num_devices=jax.device_count())
    from medgen_jax import commands  # pylint: disable=import-outside-toplevel
    commands.run(_MODE.value, config, workdir)
  except KeyboardInterrupt as e:
    # The trainer and the study save what they finished before this.
    sys.stderr.write(f"interrupted ({e or 'Ctrl-C'}); finished work is saved: "
                     "rerun the same command to resume\n")
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    # One boundary: an expected failure (config, data, checkpoint, disk,
    # non-finite loss) is a message naming the file and the way out; a bug
    # keeps its traceback.
    message = errors.user_message(e, where=workdir)
    if message is None or _VERBOSE.value:
      raise
    logging.error("%s", message)
    # A failed checkpoint read leaves orbax's other read tasks failing the
    # same way; at exit asyncio and the garbage collector would print each
    # one after the message, burying it.
    std_logging.getLogger("asyncio").disabled = True
    sys.unraisablehook = lambda unraisable: None
    sys.exit(f"error: {message}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
