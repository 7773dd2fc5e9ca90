"""Two JAX processes on this machine train like one (docs/multihost.md).

The runs go through the documented launchers: an interrupted run through
``experiments/cluster/local_two_process.sh``, its resumption through
``experiments/cluster/slurm_train.sh`` under a stand-in ``srun``. Each
process runs ``launch.py`` behind a small recorder that logs the examples the
process feeds and every workdir file it writes.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from medgen_jax import commands, jsonl, runtime, workdir_lock
from medgen_jax.data import pipeline
from medgen_jax.eval import encoder as encoder_lib
from medgen_jax.train import checkpoint, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "experiments", "cluster")
# The interrupted run stops after step STOPPED; the resumed one ends at FINAL.
STOPPED, FINAL = 3, 6
# Parameter tolerance. The two-process step sums the batch's gradients in two
# halves and all-reduces them, so float32 rounding differs from the
# one-process sum: ~1e-7 after these steps. The steps after the interrupt
# move every parameter tensor by > 10 * ATOL (asserted below), so a skipped,
# repeated or differently fed step would be far over this bound.
ATOL = 1e-5


def _pythonpath() -> str:
  """The repository first on the children's path (they run scripts from a
  temporary folder)."""
  return os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))

# Runs launch.py in this process, recording what the process feeds (the
# batcher's example indices per step) and which workdir files it writes. With
# $MH_SIGNAL_AT set, process 1 alone sends itself SIGTERM during that step.
RECORDER = r'''
import json, os, runpy, signal, sys
import jax
import numpy as np
from medgen_jax import jsonl, viz
from medgen_jax.data import pipeline
from medgen_jax.train import trainer

out = os.path.join(os.environ["MH_RECORD"],
                   "process_%s.jsonl" % os.environ["JAX_PROCESS_ID"])

def log(**record):
  with open(out, "a") as f:
    f.write(json.dumps(record) + "\n")

def before(owner, name, note):
  real = getattr(owner, name)
  def wrapped(*args, **kwargs):
    note(*args, **kwargs)
    return real(*args, **kwargs)
  setattr(owner, name, wrapped)

log(kind="start", pid=os.getpid())
before(pipeline.Batcher, "batch", lambda self, step: log(
    kind="batch", step=int(step), process=jax.process_index(),
    of=self.process_index, count=self.process_count,
    indices=self.indices(step).tolist()))
for owner, name, arg in ((jsonl, "write_json", 0), (jsonl, "rewrite", 0),
                         (viz, "save_png", 1), (trainer, "_append_jsonl", 0),
                         (np, "savez_compressed", 0)):
  before(owner, name, lambda *a, _n=name, _i=arg, **k: log(
      kind="write", fn=_n, process=jax.process_index(), path=str(a[_i])))

signal_at = int(os.environ.get("MH_SIGNAL_AT", "0"))
real_call = trainer.TrainStep.__call__
calls = [0]
def call(self, *args):
  result = real_call(self, *args)
  calls[0] += 1
  if calls[0] == signal_at and jax.process_index() == 1:
    os.kill(os.getpid(), signal.SIGTERM)
  return result
trainer.TrainStep.__call__ = call

sys.argv = ["launch.py"] + sys.argv[1:]
runpy.run_path(os.path.join(os.getcwd(), "launch.py"), run_name="__main__")
'''

# Stand-ins for SLURM's tools: srun starts $SLURM_NTASKS tasks here.
FAKE_SRUN = r'''#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" > "$MH_LOGS/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
'''
FAKE_SCONTROL = r'''#!/usr/bin/env bash
echo "$3" | tr , '\n'
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _jsonl(path):
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def _flags(num_steps, sample_every, workdir):
  return ["--config=configs/ddpm.py:res=16,runlocal",
          "--config.data.num_subjects=5",
          f"--config.train.num_steps={num_steps}",
          "--config.train.ckpt_every=100", "--config.train.log_every=1",
          f"--config.train.sample_every={sample_every}",
          f"--workdir={workdir}"]


def _logs(log_dir):
  return {i: (log_dir / f"process_{i}.log").read_text() for i in (0, 1)}


def _reference_config(tiny_config):
  c = tiny_config.copy_and_resolve_references()
  c.train.update(num_steps=FINAL, log_every=1, ckpt_every=STOPPED,
                 sample_every=0)
  return c


def _params(exp, workdir, steps):
  """``{step: parameter leaves}`` of the checkpoints ``steps`` in
  ``workdir``."""
  mngr = checkpoint.manager(str(workdir), async_save=False)
  with contextlib.closing(mngr):
    return {s: jax.tree.leaves(jax.device_get(
        trainer.restore_state(exp, mngr, s)[1].params)) for s in steps}


@pytest.fixture(scope="module")
def runs(tiny_config, tmp_path_factory):
  """A one-process reference run to FINAL; two processes interrupted after
  STOPPED (local launcher) and resumed to FINAL (SLURM script)."""
  tmp = tmp_path_factory.mktemp("multihost")
  ref, two, rec = tmp / "ref", tmp / "two", tmp / "record"
  rec.mkdir()
  (tmp / "recorder.py").write_text(RECORDER)
  bin_dir = tmp / "bin"
  bin_dir.mkdir()
  for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  config = _reference_config(tiny_config)
  pipeline.prepare(config.data)  # built before two processes read it
  env = dict(os.environ, PYTHONPATH=_pythonpath(),
             MEDGEN_DATA_DIR=config.data.data_dir, MEDGEN_JAX_HUGE_PAGES="0",
             MH_RECORD=str(rec), PYTHON=sys.executable)

  # Interrupted: the processes run while this one trains the reference. A
  # signal during step s stops the processes after step s + 1.
  stop_logs = tmp / "logs_stop"
  stop = subprocess.Popen(
      [os.path.join(CLUSTER, "local_two_process.sh"), str(tmp / "recorder.py"),
       *_flags(FINAL, 0, two)], cwd=ROOT,
      env=dict(env, LOG_DIR=str(stop_logs), MH_SIGNAL_AT=str(STOPPED - 1)),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    trainer.train(config, str(ref))
    stop_out = stop.communicate(timeout=300)[0].decode()
  finally:
    if stop.poll() is None:  # the launcher passes it on to both processes
      stop.terminate()
      stop.wait(60)
  stop_steps = checkpoint.steps_on_disk(str(two))
  stop_metrics = jsonl.read(str(two / "metrics.jsonl"))

  resume_logs = tmp / "logs_resume"
  resume_logs.mkdir()
  resume = subprocess.run(
      [os.path.join(CLUSTER, "slurm_train.sh"), str(tmp / "recorder.py"),
       *_flags(FINAL, FINAL, two)], cwd=ROOT,
      env=dict(env, PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
               MH_LOGS=str(resume_logs), SLURM_JOB_ID="4242", SLURM_NTASKS="2",
               SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=ROOT,
               JAX_COORDINATOR_PORT=str(_free_port())),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
  return dict(config=config, ref=ref, two=two, record=rec,
              stop_rc=stop.returncode, stop_out=stop_out,
              stop_logs=_logs(stop_logs), stop_steps=stop_steps,
              stop_metrics=stop_metrics, resume_rc=resume.returncode,
              resume_out=resume.stdout.decode(),
              resume_logs=_logs(resume_logs))


def test_a_signal_to_one_process_stops_both_after_the_same_step(runs):
  logs = runs["stop_logs"]
  assert runs["stop_rc"] == 130, (runs["stop_out"], logs[0][-3000:],
                                  logs[1][-3000:])
  # Process 1 received SIGTERM during step STOPPED - 1; process 0 none.
  assert "Received signal 15" in logs[1] and "Received signal" not in logs[0]
  for i in (0, 1):
    assert f"Interrupted at step {STOPPED}; saving" in logs[i], logs[i][-3000:]
  # Saved by the interrupt (ckpt_every=100), once, from both processes' shards.
  assert runs["stop_steps"] == [STOPPED]
  assert [r["step"] for r in runs["stop_metrics"]] == list(
      range(1, STOPPED + 1))


def test_resumed_run_continues_from_the_checkpoint(runs):
  logs = runs["resume_logs"]
  assert runs["resume_rc"] == 0, (runs["resume_out"], logs[0][-3000:],
                                  logs[1][-3000:])
  for i in (0, 1):
    assert f"Resumed from checkpoint step {STOPPED}" in logs[i]
  assert "Training finished" in logs[0] and "final step" in logs[0]


def test_two_processes_train_like_one(runs):
  """Parameters after the interrupt and after resuming equal those of the
  one-process run with the same global batches."""
  config, ref, two = runs["config"], runs["ref"], runs["two"]
  assert runs["resume_rc"] == 0, runs["resume_logs"][0][-3000:]
  exp = trainer.build_experiment(config)
  want = _params(exp, ref, (STOPPED, FINAL))
  got = _params(exp, two, (STOPPED, FINAL))
  for step in (STOPPED, FINAL):
    assert len(got[step]) == len(want[step])
    for w, g in zip(want[step], got[step]):
      np.testing.assert_allclose(g, w, rtol=0, atol=ATOL)
  # Not vacuous: the resumed steps moved every tensor by far more than ATOL
  # (in the first steps the zero-initialised output layer keeps most still).
  moved = [np.abs(a - b).max() for a, b in zip(want[FINAL], want[STOPPED])]
  assert min(moved) > 10 * ATOL, moved
  rows = _jsonl(two / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, FINAL + 1))  # each once
  ref_rows = _jsonl(ref / "metrics.jsonl")
  np.testing.assert_allclose([r["loss"] for r in rows],
                             [r["loss"] for r in ref_rows], rtol=1e-5)


def test_each_process_feeds_its_own_half_of_every_global_batch(runs):
  whole = pipeline.make_train_data(runs["config"].data).batcher
  fed = {0: {}, 1: {}}
  for i in (0, 1):
    for r in _jsonl(runs["record"] / f"process_{i}.jsonl"):
      if r["kind"] == "batch":
        assert (r["process"], r["of"], r["count"]) == (i, i, 2)
        fed[i].setdefault(r["step"], r["indices"])
        assert fed[i][r["step"]] == r["indices"]  # the same on a rerun
  # Batch `s` feeds train step s + 1; both runs together cover all steps.
  assert set(range(FINAL)) <= set(fed[0]) & set(fed[1])
  for step in range(FINAL):
    first, second = fed[0][step], fed[1][step]
    assert len(first) == len(second) == whole.batch_size // 2
    assert not set(first) & set(second)
    assert first + second == whole.indices(step).tolist()


def test_only_process_0_writes_the_workdir_files(runs):
  two = runs["two"]
  records = {i: _jsonl(runs["record"] / f"process_{i}.jsonl") for i in (0, 1)}
  assert not [r for r in records[1] if r["kind"] == "write"]
  written = {os.path.relpath(r["path"], two) for r in records[0]
             if r["kind"] == "write"}
  assert {"config.json", "data_stats.json", "metrics.jsonl",
          os.path.join("samples", f"step_{FINAL}.png")} <= written
  assert os.path.exists(two / "samples" / f"step_{FINAL}.png")
  # One TensorBoard events file per run, each by a process 0 (the file name
  # ends in the writer's pid).
  pids = {r["pid"] for r in records[0] if r["kind"] == "start"}
  events = [f for f in os.listdir(two) if f.startswith("events.out")]
  assert len(events) == 2 and {int(f.split(".")[-3]) for f in events} <= pids
  # The workdir lock (held by process 0) is released: its record emptied.
  assert (two / workdir_lock.LOCK_NAME).read_text() == ""


@pytest.fixture(scope="module")
def other_modes(runs, tmp_path_factory):
  """``--mode=sample`` and ``--mode=eval`` as two processes on the resumed
  run's final checkpoint."""
  tmp = tmp_path_factory.mktemp("multihost_modes")
  env = dict(os.environ, PYTHONPATH=_pythonpath(),
             MEDGEN_DATA_DIR=runs["config"].data.data_dir,
             MEDGEN_JAX_HUGE_PAGES="0", PYTHON=sys.executable)
  out = {}
  for mode, extra in (("sample", ["--config.sample.num=8"]), ("eval", [])):
    record, logs = tmp / f"record_{mode}", tmp / f"logs_{mode}"
    record.mkdir()
    (tmp / "recorder.py").write_text(RECORDER)
    r = subprocess.run(
        [os.path.join(CLUSTER, "local_two_process.sh"),
         str(tmp / "recorder.py"), *_flags(FINAL, 0, runs["two"]),
         f"--mode={mode}", *extra], cwd=ROOT,
        env=dict(env, LOG_DIR=str(logs), MH_RECORD=str(record)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    out[mode] = dict(rc=r.returncode, out=r.stdout.decode(),
                     logs=_logs(logs), records={
                         i: _jsonl(record / f"process_{i}.jsonl")
                         for i in (0, 1)})
  return out


def test_sample_and_eval_modes_run_as_two_processes(runs, other_modes):
  two = runs["two"]
  for mode, r in other_modes.items():
    assert r["rc"] == 0, (mode, r["out"], r["logs"][0][-3000:],
                          r["logs"][1][-3000:])
    assert not [w for w in r["records"][1] if w["kind"] == "write"], mode
  written = {os.path.relpath(w["path"], two)
             for w in other_modes["sample"]["records"][0]
             if w["kind"] == "write"}
  base = os.path.join("samples", f"final_step_{FINAL}")
  assert {base + ".tmp.npz", base + ".png"} <= written
  assert f"Wrote 8 samples from step {FINAL}" in other_modes["sample"][
      "logs"][0]
  assert "Wrote" not in other_modes["sample"]["logs"][1]
  # The samples are those of the same checkpoint drawn by one process.
  config = runs["config"].copy_and_resolve_references()
  config.sample.num = 8
  with np.load(two / (base + ".npz")) as f:
    got = f["image"]
  want = commands.sample(config, str(two))["image"]
  np.testing.assert_allclose(got, want, atol=1e-4)
  # The evaluators' records, and the feature extractor saved once by both.
  with open(two / "eval" / f"generative_step_{FINAL}.json") as f:
    assert np.isfinite(json.load(f)["metrics"]["fid"])
  assert (two / "encoder" / encoder_lib.CARD).exists()
  assert "Evaluation finished" in other_modes["eval"]["logs"][0]
  assert "Evaluation finished" not in other_modes["eval"]["logs"][1]


# Two processes start JAX from $JAX_* (runtime.setup), try the workdir's
# lock, report, then wait for a signal.
LOCK_PROBE = r'''
import os, signal, sys, time
import ml_collections
from medgen_jax import errors, runtime, workdir_lock
runtime.setup(ml_collections.ConfigDict({"train": {}}))
import jax
try:
  with workdir_lock.hold(sys.argv[1], "probe",
                         primary=jax.process_index() == 0):
    print("locked", flush=True)
except errors.WorkdirBusyError as e:
  print("busy:", e, flush=True)
def stop(signum, frame):
  print("signal", signum, flush=True)
  os._exit(10 + jax.process_index())
signal.signal(signal.SIGTERM, stop)
print("ready", jax.process_index(), jax.process_count(), flush=True)
time.sleep(120)
'''


def test_launcher_forwards_signals_and_a_busy_workdir_stops_all(tmp_path):
  probe, logs = tmp_path / "probe.py", tmp_path / "logs"
  workdir = tmp_path / "w"
  probe.write_text(LOCK_PROBE)
  env = dict(os.environ, PYTHONPATH=_pythonpath(), LOG_DIR=str(logs),
             PYTHON=sys.executable)
  with workdir_lock.hold(str(workdir), "pytest"):  # a run already on it
    proc = subprocess.Popen(
        [os.path.join(CLUSTER, "local_two_process.sh"), str(probe),
         str(workdir)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
      if all((logs / f"process_{i}.log").exists() and "ready" in
             (logs / f"process_{i}.log").read_text() for i in (0, 1)):
        break
      time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
  out = {i: (logs / f"process_{i}.log").read_text() for i in (0, 1)}
  assert proc.returncode in (10, 11), out
  for i in (0, 1):
    assert f"ready {i} 2" in out[i] and "signal 15" in out[i], out[i]
    assert "locked" not in out[i]
  assert f"busy: {workdir} is in use by pid {os.getpid()}" in out[0]
  assert "busy: " in out[1] and "process 0 could not take" in out[1]


def test_distributed_settings_come_from_the_config_then_the_environment():
  t = ml_collections.ConfigDict(dict(distributed=False, coordinator_address="",
                                     num_processes=0, process_id=-1))
  assert runtime.distributed_args(t, {}) is None  # one process
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "2"}
  # More than one process asked for: distributed without the switch.
  assert runtime.distributed_args(t, env) == dict(
      coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2)
  t.update(coordinator_address="h:9", num_processes=2, process_id=1)
  assert runtime.distributed_args(t, env) == dict(
      coordinator_address="h:9", num_processes=2, process_id=1)
  # The switch alone: JAX detects the rest from the cluster (SLURM, TPU).
  t.update(distributed=True, coordinator_address="", num_processes=0,
           process_id=-1)
  assert runtime.distributed_args(t, {}) == dict(
      coordinator_address=None, num_processes=None, process_id=None)


@pytest.mark.parametrize("env, match", [
    ({"JAX_NUM_PROCESSES": "two"}, r"JAX_NUM_PROCESSES='two' is not an int"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     r"process id 2 .* not in \[0, 2\)"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "10.0.0.1"},
     r"'10.0.0.1' needs a port"),
])
def test_bad_distributed_settings_name_the_problem(env, match):
  with pytest.raises(runtime.DistributedSetupError, match=match):
    runtime.distributed_args(ml_collections.ConfigDict(), env)
