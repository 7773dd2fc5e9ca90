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
  inspect build the configured data set if needed, print its summary (counts
          per split and class, shapes, intensities, mask values) and write
          DIR/inspect/<dataset>_grid.png with the masks overlaid.
"""

import ast
import os
import signal
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/study.py", "Experiment config file (path[:args]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, metrics, samples). Default: "
    "workdirs/<config file name>.")
_MODE = flags.DEFINE_enum(
    "mode", "auto", ["auto", "train", "sample", "eval", "study", "inspect"],
    "What to do; auto: the config's main job (study for study configs, "
    "train otherwise).")


def _default_workdir(config_arg: str) -> str:
  name = os.path.splitext(os.path.basename(config_arg.split(":")[0]))[0]
  return os.path.join("workdirs", name)


def _raise_interrupt(signum, frame):
  del frame
  raise KeyboardInterrupt(f"received signal {signum}")


def _parse_flags(argv):
  """absl's parser, plus a one-line error for a ``--config.<key>`` override of
  a key the config does not have (ml_collections raises AttributeError or
  KeyError, with a "did you mean" hint, from inside flag parsing)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imports after flag parsing: a bad flag fails fast, before JAX starts.
  import jax  # pylint: disable=import-outside-toplevel
  from medgen_jax import config_check, runtime  # pylint: disable=import-outside-toplevel
  # Re-executes once with huge pages for malloc (see runtime.use_huge_pages).
  runtime.use_huge_pages()

  config = _CONFIG.value
  # Cluster schedulers pre-empt with SIGTERM: treat it like Ctrl-C. While
  # training, the trainer holds both back until the running step is done and
  # then checkpoints it (see medgen_jax/train/interrupts.py).
  signal.signal(signal.SIGTERM, _raise_interrupt)
  runtime.setup(config)
  try:
    config_check.validate(config, num_devices=jax.device_count())
  except config_check.ConfigError as e:
    logging.error("%s", e)
    sys.exit(f"error: {e}")
  workdir = _WORKDIR.value or _default_workdir(flags.FLAGS["config"].config_filename)
  from medgen_jax import commands  # pylint: disable=import-outside-toplevel
  from medgen_jax.methods import base as methods  # pylint: disable=import-outside-toplevel
  from medgen_jax.train import checkpoint, frozen  # pylint: disable=import-outside-toplevel
  try:
    commands.run(_MODE.value, config, workdir)
  except (checkpoint.CheckpointRestoreError, frozen.FrozenInputError,
          methods.CapabilityError) as e:
    # The message names the checkpoint, frozen input or capability, the
    # cause and the way out; a traceback would only bury it.
    logging.error("%s", e)
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
