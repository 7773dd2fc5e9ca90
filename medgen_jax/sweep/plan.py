"""A config's sweep as runs: names, ``launch.py`` commands, validation, the
manifest, the SLURM array script, and running them here one by one.

Each run is the command ``python launch.py --config=<config> --workdir=W/<name>
--config.<key>=<value> ...``; its config is parsed from exactly those
arguments by ``ml_collections.config_flags``, as ``launch.py`` will parse
them, and validated by :mod:`medgen_jax.config_check` before any run starts.

Files in the sweep's workdir ``W``:
  sweep.json          the manifest: config, mode, fixed overrides, and per
                      run name its overrides, workdir and command
  sweep.slurm         the SLURM array script (``--emit=slurm``)
  <name>/             the run's workdir (what launch.py writes), plus
    sweep.log           its output (runs started here)
    sweep_run.json      its exit status (``returncode`` null while running
                        or after a hard kill)
"""

import contextlib
import dataclasses
import difflib
import errno
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import (Any, Callable, Dict, Iterator, List, Optional, Sequence,
                    Tuple)

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from medgen_jax import errors
from medgen_jax import jsonl
from medgen_jax.sweep import Overrides, Sweep, SweepError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "launch.py")
MANIFEST = "sweep.json"
SLURM = "sweep.slurm"
RUN_LOG = "sweep.log"
RUN_RECORD = "sweep_run.json"
INTERRUPTED = 130  # launch.py's exit status after Ctrl-C or SIGTERM


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep.

  Attributes:
    index: position in the sweep (the SLURM array task id).
    name: short name from the values that vary across the sweep.
    overrides: this run's keys and values (swept and fixed).
    workdir: ``<sweep workdir>/<name>``.
    args: ``launch.py``'s arguments.
    command: the shell command, run from the sweep's ``cwd``.
  """

  index: int
  name: str
  overrides: Overrides
  workdir: str
  args: Tuple[str, ...]
  command: str


@dataclasses.dataclass(frozen=True)
class Plan:
  """A sweep expanded into runs.

  Attributes:
    config: ``path[:args]`` of the config file.
    workdir: the sweep's workdir ``W``.
    mode: ``launch.py --mode`` of every run.
    base: overrides every run gets (``--config.<key>`` given to the sweep).
    runs: the runs, in sweep order.
    swept: keys whose value differs between runs (the name's keys).
    cwd: directory the commands run from (relative paths start there).
  """

  config: str
  workdir: str
  mode: str
  base: Overrides
  runs: Tuple[Run, ...]
  swept: Tuple[str, ...]
  cwd: str


def _launch_path(cwd: str) -> str:
  rel = os.path.relpath(LAUNCH, cwd)
  return LAUNCH if rel.startswith("..") else rel


# ------------------------------------------------------------- sweeps ----


def load_sweep(config: str) -> Sweep:
  """``get_sweep(arg)`` of the config file ``path[:arg]`` (``get_sweep()``
  without a colon, as ``get_config``)."""
  path, colon, arg = config.partition(":")
  if not os.path.isfile(path):
    raise SweepError(f"config file {path} not found (--config=path[:args])")
  name = "sweep_config_" + hashlib.sha1(path.encode()).hexdigest()[:8]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"{path} defines no get_sweep(arg): add one returning "
                     "a list of override dicts (see docs/sweeps.md)")
  try:
    sweep = module.get_sweep(arg) if colon else module.get_sweep()
  except SweepError as e:
    raise SweepError(f"{path}: get_sweep: {e}") from None
  except (ValueError, TypeError, KeyError) as e:
    raise SweepError(f"{path}: get_sweep({arg!r}) raised "
                     f"{type(e).__name__}: {e}") from None
  return sweep


def _check_sweep(sweep: Any) -> Sweep:
  if (not isinstance(sweep, (list, tuple)) or not sweep
      or not all(isinstance(r, dict) for r in sweep)):
    raise SweepError("a sweep is a non-empty list of override dicts "
                     f"(sweep.values / product / zip); got {sweep!r:.200}")
  seen = {}
  for i, run in enumerate(sweep):
    key = json.dumps(run, sort_keys=True, default=repr)
    if key in seen:
      raise SweepError(f"runs {seen[key]} and {i} of the sweep are the same "
                       f"({run}); drop one")
    seen[key] = i
  return list(sweep)


def varying_keys(sweep: Sweep) -> List[str]:
  """Keys whose value differs between runs (or that some runs lack), in
  order of first appearance."""
  keys = list(dict.fromkeys(k for run in sweep for k in run))
  missing = object()
  return [k for k in keys
          if len({repr(run.get(k, missing)) for run in sweep}) > 1]


def short_labels(keys: Sequence[str]) -> Dict[str, str]:
  """Each key's last components, as many as make it unique among ``keys``
  (``sample.guidance_scale`` -> ``guidance_scale``)."""
  out = {}
  for key in keys:
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
      label = ".".join(parts[-n:])
      if sum(k == label or k.endswith("." + label) for k in keys) == 1:
        break
    out[key] = label
  return out


def format_value(v: Any) -> str:
  """A value as it reads in names and tables (``3.0`` -> ``3``)."""
  if isinstance(v, (list, tuple)):
    return "+".join(format_value(x) for x in v)
  if isinstance(v, float):
    s = f"{v:g}"
    return s if float(s) == v else repr(v)
  return str(v)


_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,-]")


def run_names(sweep: Sweep) -> List[str]:
  """Directory names ``label=value,label=value`` of the varying keys,
  unique (an index is appended where two would be equal)."""
  keys = varying_keys(sweep)
  labels = short_labels(keys)
  names = []
  for run in sweep:
    name = ",".join(f"{labels[k]}={format_value(run[k])}" for k in keys
                    if k in run) or "run"
    name = _UNSAFE.sub("_", name)
    if len(name) > 100:  # file names stop at 255 bytes
      name = name[:90] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    names.append(name)
  for i, name in enumerate(names):
    if names.count(name) > 1:
      names[i] = f"{name}_{i}"
  return names


# ------------------------------------------------------------- configs ----


def flag_value(v: Any) -> str:
  """``v`` as ``--config.<key>=`` text that config_flags parses back to
  ``v`` (strings verbatim, tuples as Python literals)."""
  if v is None or isinstance(v, dict):
    raise SweepError(f"cannot pass {v!r} on the command line; sweep leaf "
                     "values (numbers, strings, booleans, tuples)")
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, (list, tuple)):
    return repr(tuple(v))
  return v if isinstance(v, str) else repr(v)


def override_flags(overrides: Overrides) -> List[str]:
  return [f"--config.{k}={flag_value(v)}" for k, v in overrides.items()]


def _problem(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[-1] if lines else type(e).__name__


def parse_config(config: str, overrides: Overrides
                 ) -> ml_collections.ConfigDict:
  """The config ``launch.py --config=<config> --config.<k>=<v>...`` gets:
  parsed by config_flags from those very arguments."""
  argv = ["launch.py", f"--config={config}", *override_flags(overrides)]
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, flag_values=fv,
                                           lock_config=True, sys_argv=argv)
  try:
    fv(argv)
    return holder.value
  except (AttributeError, KeyError) as e:
    raise SweepError(f"--config={config}: an override names no key of the "
                     f"config: {_problem(e)}") from None
  except flags.Error as e:
    raise SweepError(f"--config={config} {' '.join(argv[2:])}: "
                     f"{_problem(e)}") from None


def _leaf_keys(config: ml_collections.ConfigDict, prefix: str = ""
               ) -> List[str]:
  out = []
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out += _leaf_keys(v, f"{prefix}{k}.")
    else:
      out.append(prefix + k)
  return out


def _close_keys(key: str, leaves: Sequence[str]) -> List[str]:
  """Likely meant keys: a near name in the same section, the same name in
  another section, or else a near dotted key."""
  parent, _, name = key.rpartition(".")
  siblings = {k.rpartition(".")[2]: k for k in leaves
              if k.rpartition(".")[0] == parent}
  near = difflib.get_close_matches(name, list(siblings), n=2, cutoff=0.7)
  if near:
    return [siblings[n] for n in near]
  moved = [k for k in leaves if k.rpartition(".")[2] == name]
  return moved[:3] or difflib.get_close_matches(key, leaves, n=2, cutoff=0.8)


def check_keys(config: ml_collections.ConfigDict, keys: Sequence[str],
               where: str) -> None:
  """Raises :class:`SweepError` naming each key that is not a value of
  ``config`` (with the closest keys it has)."""
  leaves = _leaf_keys(config)
  problems = []
  for key in dict.fromkeys(keys):
    try:
      value = config_path.get_value(key, config)
    except (KeyError, AttributeError, IndexError, ValueError):
      close = _close_keys(key, leaves)
      hint = f"; did you mean {' or '.join(close)}?" if close else ""
      problems.append(f"{key!r} is not a key of {where}{hint}")
      continue
    if isinstance(value, ml_collections.ConfigDict):
      problems.append(f"{key!r} is a section of {where}; sweep its fields "
                      f"({', '.join(sorted(value.keys())[:5])}, ...)")
  if problems:
    raise SweepError("unknown sweep key(s): " + "; ".join(problems))


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  return a == b


def make_plan(config: str, workdir: str, mode: str = "auto",
              base: Optional[Overrides] = None,
              sweep: Optional[Sweep] = None, validate: bool = True) -> Plan:
  """Expands and checks a sweep before anything runs.

  Args:
    config: ``path[:args]`` of the config file.
    workdir: the sweep's workdir; run ``name`` goes to ``workdir/name``.
    mode: ``launch.py --mode`` of every run.
    base: overrides every run gets (the sweep's own ``--config.<key>``).
    sweep: the runs' overrides; default: the config's ``get_sweep(arg)``.
    validate: run :func:`medgen_jax.config_check.validate` on every run's
      config (with one device; each run checks its own device count again).

  Raises:
    SweepError: naming the unknown key, the value the command line does not
      carry, or the run whose config is invalid and why.
  """
  base = dict(base or {})
  sweep = _check_sweep(load_sweep(config) if sweep is None else sweep)
  both = sorted(set(base) & {k for run in sweep for k in run})
  if both:
    raise SweepError(f"{both} set both by the sweep and by --config.<key>; "
                     "drop the --config override or the sweep's key")
  base_config = parse_config(config, base)
  check_keys(base_config, [k for run in sweep for k in run], config)
  names = run_names(sweep)
  cwd = os.getcwd()
  launch = _launch_path(cwd)
  runs = []
  for i, (name, overrides) in enumerate(zip(names, sweep)):
    run_dir = os.path.join(workdir, name)
    args = [f"--config={config}", f"--workdir={run_dir}"]
    args += [f"--mode={mode}"] if mode != "auto" else []
    args += override_flags(base) + override_flags(overrides)
    runs.append(Run(i, name, dict(overrides), run_dir, tuple(args),
                    shlex.join(("python", launch, *args))))
    run_config = parse_config(config, {**base, **overrides})
    for k, v in overrides.items():
      got = config_path.get_value(k, run_config)
      if not _same(got, v):
        raise SweepError(f"run {name}: {k}={v!r} reads back as {got!r} from "
                         f"the command line; give a value of the type of "
                         f"the config's {k}")
    if validate:
      _validate(run_config, name)
  return Plan(config, workdir, mode, base, tuple(runs),
              tuple(varying_keys(sweep)), cwd)


def _validate(config: ml_collections.ConfigDict, name: str) -> None:
  from medgen_jax import config_check  # pylint: disable=import-outside-toplevel
  try:
    config_check.validate(config, num_devices=1)
  except config_check.ConfigError as e:
    raise SweepError(f"run {name}: {e}") from None


def run_config(plan: Plan, run: Run) -> ml_collections.ConfigDict:
  """The config ``run``'s command gives ``launch.py``."""
  return parse_config(plan.config, {**plan.base, **run.overrides})


# ------------------------------------------------------------ outputs ----


def _jsonable(v: Any) -> Any:
  return list(v) if isinstance(v, tuple) else v


def manifest(plan: Plan) -> Dict[str, Any]:
  return dict(
      config=plan.config, mode=plan.mode, cwd=plan.cwd,
      base_overrides={k: _jsonable(v) for k, v in plan.base.items()},
      swept=list(plan.swept),
      runs={r.name: dict(index=r.index, workdir=r.workdir,
                         overrides={k: _jsonable(v)
                                    for k, v in r.overrides.items()},
                         command=r.command)
            for r in plan.runs})


def write_manifest(plan: Plan) -> str:
  os.makedirs(plan.workdir, exist_ok=True)
  path = os.path.join(plan.workdir, MANIFEST)
  jsonl.write_json(path, manifest(plan))
  return path


def read_manifest(workdir: str) -> Dict[str, Any]:
  path = os.path.join(workdir, MANIFEST)
  if not os.path.exists(path):
    raise SweepError(f"{path} not found: {workdir} is not a sweep's workdir "
                     "(python -m medgen_jax.sweep --config=... "
                     f"--workdir={workdir} writes it)")
  try:
    with open(path) as f:
      out = json.load(f)
  except (OSError, ValueError) as e:
    raise SweepError(f"{path} is unreadable ({e}); run the sweep command "
                     "again to rewrite it") from None
  if not isinstance(out, dict) or not isinstance(out.get("runs"), dict):
    raise SweepError(f"{path} is not a sweep manifest; run the sweep "
                     "command again to rewrite it")
  return out


_SLURM_HEADER = """\
#!/bin/bash
# The sweep {workdir}: {n} run(s) of launch.py --config={config}, one SLURM
# array task each. Submit:  sbatch {script}
# Collect (any time):      python -m medgen_jax.sweep collect {workdir}
#
# Adapt the #SBATCH lines to your cluster: partition and account (commented
# out below), --time (a run cut by the limit resumes from its last checkpoint
# when resubmitted), CPUs, memory, GPUs (--gres or --gpus), and a "%k" after
# the array range (e.g. --array=0-{last}%4) to run at most k at once.
#SBATCH --job-name={job}
#SBATCH --array=0-{last}
#SBATCH --output={logs}/slurm-%A_%a.out
#SBATCH --time=04:00:00
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --gres=gpu:1
##SBATCH --partition=YOUR_PARTITION
##SBATCH --account=YOUR_ACCOUNT

set -u
cd {cwd}
# Activate the environment with medgen_jax here, e.g. source .venv/bin/activate

# run DIR COMMAND...: runs COMMAND and records its exit status in
# DIR/{record} for the collector.
run() {{
  local dir=$1; shift
  mkdir -p "$dir" && rm -f "$dir/{record}"
  "$@"
  local rc=$?
  printf '{{"returncode": %d, "slurm_job": "%s_%s"}}\\n' "$rc" \\
    "${{SLURM_ARRAY_JOB_ID:-}}" "${{SLURM_ARRAY_TASK_ID:-}}" > "$dir/{record}"
  return $rc
}}

case "${{SLURM_ARRAY_TASK_ID:?run with sbatch, or set SLURM_ARRAY_TASK_ID}}" in
"""


def slurm_script(plan: Plan) -> str:
  """A bash script for ``sbatch``: one array task per run, one ``case`` line
  per run with its command."""
  q = shlex.quote
  logs = os.path.abspath(plan.workdir)
  text = _SLURM_HEADER.format(
      workdir=plan.workdir, n=len(plan.runs), config=plan.config,
      script=os.path.join(plan.workdir, SLURM), last=len(plan.runs) - 1,
      job=_UNSAFE.sub("_", "sweep-" + os.path.basename(
          os.path.normpath(plan.workdir))),
      logs=logs, cwd=q(plan.cwd), record=RUN_RECORD)
  for r in plan.runs:
    text += f"  {r.index}) run {q(r.workdir)} {r.command} ;;\n"
  text += ("  *) echo \"no run $SLURM_ARRAY_TASK_ID in this sweep (0-"
           f"{len(plan.runs) - 1})\" >&2; exit 2 ;;\nesac\n")
  return text


def write_slurm(plan: Plan) -> str:
  os.makedirs(plan.workdir, exist_ok=True)
  path = os.path.join(plan.workdir, SLURM)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(slurm_script(plan))
  os.replace(tmp, path)
  return path


# ------------------------------------------------------- running here ----


def read_record(run_dir: str) -> Dict[str, Any]:
  """The run's ``sweep_run.json`` (``{}`` if none)."""
  return jsonl.read_json(os.path.join(run_dir, RUN_RECORD))


def last_error(log_path: str) -> str:
  """The last ``error: ...`` line of a run's log (launch.py's one-line
  failure), else its last line."""
  try:
    with open(log_path, "rb") as f:
      f.seek(max(0, os.path.getsize(log_path) - 20000))
      lines = f.read().decode("utf-8", "replace").splitlines()
  except OSError:
    return ""
  # Progress bars end their lines with carriage returns.
  lines = [l.split("\r")[-1].strip() for l in lines]
  lines = [l for l in lines if l]
  marked = [l for l in lines if l.startswith("error:")]
  return (marked or lines or [""])[-1][:500]


Launcher = Callable[[Plan, Run, str], int]


def launch_subprocess(plan: Plan, run: Run, log_path: str) -> int:
  """Runs ``run``'s command in a child process, output appended to
  ``log_path``; returns its exit status (negative: killed by a signal).

  Ctrl-C reaches the child too (same process group), which saves its work
  and exits; a SIGTERM sent to this process is passed on to it. Either way
  this waits for the child to finish.
  """
  argv = [sys.executable, LAUNCH, *run.args]
  with open(log_path, "ab") as log:
    log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {run.command}\n"
              .encode())
    log.flush()
    proc = subprocess.Popen(argv, cwd=plan.cwd, stdout=log,
                            stderr=subprocess.STDOUT)
    main = threading.current_thread() is threading.main_thread()
    previous = (signal.signal(signal.SIGTERM,
                              lambda s, f: proc.send_signal(signal.SIGTERM))
                if main else None)
    try:
      while True:
        try:
          return proc.wait()
        except KeyboardInterrupt:
          continue  # the child got it as well and is saving its work
    finally:
      if main and previous is not None:  # None: a handler set outside Python
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _runner_lock(workdir: str) -> Iterator[None]:
  """One local runner per sweep workdir. Not medgen_jax.workdir_lock: that
  asks JAX about the processes of a run, and this process must not start
  JAX (on a GPU it would hold memory the runs need)."""
  os.makedirs(workdir, exist_ok=True)
  fd = os.open(os.path.join(workdir, ".sweep.lock"), os.O_RDWR | os.O_CREAT,
               0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise errors.WorkdirBusyError(
          f"another process is running the sweep in {workdir}; wait for it "
          "or stop it (each run's work is saved)") from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise  # else a file system without locks: run unlocked
    yield
  finally:
    os.close(fd)


def run_all(plan: Plan, launch: Launcher = launch_subprocess,
            echo: Callable[[str], None] = print) -> Dict[str, Dict[str, Any]]:
  """Runs the plan's runs here, one after another.

  A run whose record says it finished with this same command is skipped; any
  other is (re)started, and ``launch.py`` resumes it from its checkpoints.
  A failed run is recorded and the next one starts; an interrupted one
  (Ctrl-C, SIGTERM) stops the sweep. Writes the manifest first.

  Args:
    plan: from :func:`make_plan`.
    launch: runs one run and returns its exit status (default: a child
      ``launch.py`` process).
    echo: where progress lines go.

  Returns:
    Each run's record (``returncode``, ``seconds``, ``error``).

  Raises:
    KeyboardInterrupt: after recording a run that was interrupted.
  """
  with _runner_lock(plan.workdir):
    write_manifest(plan)
    return {run.name: _run_one(plan, run, launch, echo) for run in plan.runs}


def _run_one(plan: Plan, run: Run, launch: Launcher,
             echo: Callable[[str], None]) -> Dict[str, Any]:
  """Runs (or skips) one run of :func:`run_all`; returns its record."""
  head = f"[{run.index + 1}/{len(plan.runs)}] {run.name}"
  record = read_record(run.workdir)
  if record.get("returncode") == 0 and record.get("command") == run.command:
    echo(f"{head}: finished before, skipped")
    return record
  os.makedirs(run.workdir, exist_ok=True)
  log_path = os.path.join(run.workdir, RUN_LOG)
  record_path = os.path.join(run.workdir, RUN_RECORD)
  started = time.strftime("%Y-%m-%dT%H:%M:%S")
  # Null until the run ends: a hard kill leaves it "incomplete", not done.
  jsonl.write_json(record_path, dict(command=run.command, returncode=None,
                                     started=started))
  echo(f"{head}: running (log: {log_path})")
  t0 = time.time()
  rc = launch(plan, run, log_path)
  record = dict(command=run.command, returncode=rc, started=started,
                seconds=round(time.time() - t0, 1))
  if rc != 0:
    record["error"] = last_error(log_path)
  jsonl.write_json(record_path, record)
  if rc == 0:
    echo(f"{head}: finished in {record['seconds']:.0f} s")
  elif rc == INTERRUPTED:
    echo(f"{head}: interrupted; its work is saved")
    raise KeyboardInterrupt(f"run {run.name} was interrupted")
  else:
    echo(f"{head}: FAILED ({describe_returncode(rc)}) after "
         f"{record['seconds']:.0f} s: {record['error']}")
  return record


def describe_returncode(rc: int) -> str:
  if rc < 0:
    try:
      return f"killed by {signal.Signals(-rc).name}"
    except ValueError:
      return f"killed by signal {-rc}"
  return f"exit {rc}"
