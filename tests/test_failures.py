"""Every expected failure ends in a short message and loses nothing.

The error boundary (``medgen_jax.errors`` + ``launch.py``), the workdir lock,
damaged derived data rebuilt, a full disk and a read-only workdir; the
study's damaged caches are in ``test_study.py``, two writers and a killed
run's lock in ``test_engine.py``.
"""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import pytest

from configs import study as study_config
from medgen_jax import commands
from medgen_jax import errors
from medgen_jax import jsonl
from medgen_jax import workdir_lock
from medgen_jax.config_check import ConfigError
from medgen_jax.data import builder_lib
from medgen_jax.data import pipeline
from medgen_jax.train import checkpoint
from medgen_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, env=None, timeout=300):
  return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        env=env)


def _last_line(r) -> str:
  return r.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------ messages --


def test_user_errors_keep_their_message_and_bugs_get_none():
  e = trainer.NonFiniteLossError("non-finite training metrics at step 7")
  assert errors.user_message(e) == "non-finite training metrics at step 7"
  # Wrapped by a library (raise ... from): the cause is found.
  try:
    try:
      raise ConfigError("invalid config:\n  - data.res=3")
    except ConfigError as inner:
      raise RuntimeError("wrapper") from inner
  except RuntimeError as outer:
    assert errors.user_message(outer) == "invalid config:\n  - data.res=3"
  assert errors.user_message(KeyError("params")) is None
  assert errors.user_message(ValueError("shapes differ")) is None


def test_os_errors_name_the_path_and_the_way_out():
  full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/w/metrics.jsonl")
  assert errors.user_message(full) == (
      "no space left on /w/metrics.jsonl; free space there or choose "
      "another --workdir; the files written before are intact")
  # TensorStore keeps only the text; the orbax temp dir is named as the
  # checkpoint it was.
  ts = ValueError('RESOURCE_EXHAUSTED: Failed writing: "/w/checkpoints/'
                  '10.orbax-checkpoint-tmp/state/d/ab": No space left on '
                  'device [os_error_code=\'28\']')
  assert errors.user_message(ts, where="/w").startswith(
      "no space left on /w/checkpoints/10 (a checkpoint being written);")
  bare = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  assert errors.user_message(bare, where="/w").startswith(
      "no space left on /w;")
  ro = OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/run")
  assert errors.user_message(ro) == (
      "/mnt/ro/run is on a read-only file system; choose a writable "
      "--workdir")


# --------------------------------------------------------------- lock --


def test_workdir_lock_refuses_a_second_writer_and_is_released(tmp_path):
  with workdir_lock.hold(str(tmp_path), "--mode=train"):
    with pytest.raises(errors.WorkdirBusyError) as e:
      with workdir_lock.hold(str(tmp_path), "--mode=sample"):
        pass
    msg = str(e.value)
    assert f"{tmp_path} is in use by pid {os.getpid()} on " in msg
    assert "(--mode=train, started " in msg
    assert "choose another --workdir" in msg
  # Released and emptied: the next holder takes it without a warning.
  assert (tmp_path / workdir_lock.LOCK_NAME).read_text() == ""
  with workdir_lock.hold(str(tmp_path), "--mode=eval"):
    pass
  # A process that is not the primary of a multi-host run takes no lock.
  with workdir_lock.hold(str(tmp_path), "--mode=train"):
    with workdir_lock.hold(str(tmp_path), "--mode=train", primary=False):
      pass


def test_a_second_writer_stops_at_once_naming_the_first(tiny_config,
                                                        tmp_path):
  env = dict(os.environ, MEDGEN_DATA_DIR=tiny_config.data.data_dir)
  with workdir_lock.hold(str(tmp_path), "--mode=train"):
    r = _launch("--config=configs/ddpm.py:res=16,runlocal",
                "--config.data.num_subjects=5", f"--workdir={tmp_path}",
                env=env)
  assert r.returncode == 1
  last = _last_line(r)
  assert last.startswith(f"error: {tmp_path} is in use by pid {os.getpid()} "
                         "on "), r.stderr[-2000:]
  assert "(--mode=train, started " in last and "Traceback" not in r.stderr
  assert not (tmp_path / "checkpoints").exists()
  assert not (tmp_path / "metrics.jsonl").exists()


def test_workdir_lock_takes_over_from_a_killed_holder(tmp_path, caplog):
  # What SIGKILL leaves: the holder's record, no flock (the kernel dropped
  # it with the process).
  (tmp_path / workdir_lock.LOCK_NAME).write_text(json.dumps(
      {"pid": 999999, "host": "node7", "command": "--mode=train",
       "started": "2026-01-01T00:00:00"}))
  with caplog.at_level(logging.WARNING):
    with workdir_lock.hold(str(tmp_path), "--mode=train"):
      rec = json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())
      assert rec["pid"] == os.getpid() and rec["command"] == "--mode=train"
  assert ("the previous holder, pid 999999 on node7 (--mode=train, started "
          "2026-01-01T00:00:00), ended without releasing it") in caplog.text


# ------------------------------------------------------ damaged caches --


def test_jsonl_skips_garbled_bytes(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_bytes(b'{"step": 1}\n\xff\xfe\x00garbage\n[1, 2]\n{"step": 2}\n')
  assert [r["step"] for r in jsonl.read(str(path))] == [1, 2]


def test_damaged_built_data_set_is_rebuilt(tiny_config, tmp_path, caplog):
  d = tiny_config.data.copy_and_resolve_references()
  built = pipeline.prepare(d)
  version_dir = os.fspath(built.data_dir)
  rel = os.path.relpath(version_dir, d.data_dir)
  d.data_dir = str(tmp_path)
  shutil.copytree(version_dir, tmp_path / rel)
  want = pipeline.read_split(d, "train")
  shard = next(p for p in (tmp_path / rel).iterdir()
               if "train.array_record" in p.name)
  shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
  assert "split 'train'" in builder_lib.damage(
      pipeline.builder_module(d.dataset).prepare(d))
  with caplog.at_level(logging.WARNING):
    got = pipeline.read_split(d, "train")
  assert "the built data set is damaged (split 'train'" in caplog.text
  assert "rebuilding it from its sources" in caplog.text
  assert (got["image"] == want["image"]).all() if "image" in got else (
      all((got[k] == want[k]).all() for k in want))
  assert builder_lib.damage(pipeline.prepare(d)) is None
  assert not [p for p in os.listdir(tmp_path / os.path.dirname(rel))
              if ".damaged" in p]


# ------------------------------------------------- through launch.py --


@pytest.mark.parametrize("config,message", [
    ("configs/nope.py", "error: config file configs/nope.py not found"),
    ("configs/ddpm.py:runlocal,bogus=3",
     "error: --config=configs/ddpm.py:runlocal,bogus=3: ValueError: unknown "
     "config arg 'bogus'"),
    ("configs/study.py:fractions=0.5+",
     "error: --config=configs/study.py:fractions=0.5+: ValueError: "
     "fractions='0.5+': give one or more entries joined by '+'"),
    ("configs/study.py:fractions=0+1", "fractions: 0 must be in (0, 1]"),
    ("configs/study.py:generators=", "generators='': give one or more"),
])
def test_config_file_errors_are_one_line(config, message, tmp_path):
  r = _launch(f"--config={config}", f"--workdir={tmp_path}")
  assert r.returncode == 1
  assert _last_line(r).startswith(message) or message in _last_line(r), (
      r.stderr[-2000:])
  assert "Traceback" not in r.stderr
  assert os.listdir(tmp_path) == []


def test_no_config_flag_means_the_study(tmp_path):
  # What `python launch.py` parses: the default config file, loaded.
  r = _launch(f"--workdir={tmp_path}", "--mode=train")
  assert r.returncode == 1
  assert _last_line(r) == (
      "error: --mode=train needs a method config (e.g. configs/ddpm.py); a "
      "study config runs with --mode=study"), r.stderr[-2000:]


def test_a_multi_process_study_is_refused_before_it_writes(tmp_path,
                                                           monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(errors.UserError, match=r"--mode=study runs as one "
                     r"process; this is one of 2\. Start it without"):
    commands.run("auto", study_config.get_config("runlocal"), str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_a_raising_config_file_is_named(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config():\n  raise RuntimeError('no GPU here')\n")
  r = _launch(f"--config={bad}", f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 1
  assert _last_line(r) == (f"error: config file {bad} raised RuntimeError: "
                           "no GPU here (--verbose shows the traceback)")
  r = _launch(f"--config={bad}", f"--workdir={tmp_path / 'w'}", "--verbose")
  assert r.returncode != 0 and "Traceback" in r.stderr


def test_sample_without_checkpoint_is_one_error(tiny_config, tmp_path):
  env = dict(os.environ, MEDGEN_DATA_DIR=tiny_config.data.data_dir)
  r = _launch("--config=configs/ddpm.py:res=16,runlocal",
              "--config.data.num_subjects=5", "--mode=sample",
              f"--workdir={tmp_path}", env=env)
  assert r.returncode == 1
  assert _last_line(r) == (f"error: no checkpoint in {tmp_path}/checkpoints;"
                           " train first with --mode=train"), r.stderr[-2000:]
  # No second report from a background thread after the real one.
  assert "cannot schedule new futures" not in r.stderr
  assert "Traceback" not in r.stderr
  r = _launch("--config=configs/study.py:runlocal", "--mode=train",
              f"--workdir={tmp_path}", env=env)
  assert _last_line(r).startswith("error: --mode=train needs a method config")


def _mount_tmpfs(path, size: str, read_only: bool = False) -> bool:
  if os.geteuid() != 0 or shutil.which("mount") is None:
    return False
  os.makedirs(path, exist_ok=True)
  opts = f"size={size}" + (",ro" if read_only else "")
  return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs",
                         str(path)], capture_output=True).returncode == 0


def _umount(path):
  subprocess.run(["umount", str(path)], capture_output=True)


def test_read_only_workdir(tiny_config, tmp_path):
  ro = tmp_path / "ro"
  mounted = _mount_tmpfs(ro, "1m", read_only=True)
  if not mounted:
    if os.geteuid() == 0:
      pytest.skip("root without mount: permissions cannot make a "
                  "read-only directory")
    ro.mkdir()
    ro.chmod(0o500)
  try:
    env = dict(os.environ, MEDGEN_DATA_DIR=tiny_config.data.data_dir)
    r = _launch("--config=configs/ddpm.py:res=16,runlocal",
                "--config.data.num_subjects=5", f"--workdir={ro}/run",
                env=env)
    assert r.returncode == 1
    last = _last_line(r)
    assert last in (f"error: {ro}/run is on a read-only file system; choose "
                    "a writable --workdir",
                    f"error: permission denied: {ro}/run; choose a --workdir "
                    "you can write to, or fix the permissions"), (
                        r.stderr[-2000:])
    assert "Traceback" not in r.stderr
  finally:
    if mounted:
      _umount(ro)


def test_full_disk_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
  disk = tmp_path / "disk"
  if not _mount_tmpfs(disk, "8m"):
    pytest.skip("needs root to mount a small tmpfs")
  try:
    env = dict(os.environ, MEDGEN_DATA_DIR=tiny_config.data.data_dir)
    run = disk / "run"
    r = _launch("--config=configs/ddpm.py:res=16,runlocal",
                "--config.data.num_subjects=5", "--config.train.num_steps=400",
                "--config.train.ckpt_every=2", "--config.train.keep_ckpts=1000",
                "--config.train.sample_every=0", "--config.train.log_every=1",
                f"--workdir={run}", env=env)
    assert r.returncode == 1
    last = _last_line(r)
    assert last.startswith(f"error: no space left on {run}"), r.stderr[-3000:]
    assert last.endswith("free space there or choose another --workdir; the "
                         "files written before are intact")
    assert "Traceback" not in r.stderr
    # The checkpoints finished before the disk filled restore; the metrics
    # file holds each step once.
    mngr = checkpoint.manager(str(run), async_save=False)
    steps = mngr.all_steps()
    assert steps, "the disk filled before the first checkpoint"
    mngr.close()
    c = tiny_config.copy_and_resolve_references()
    c.train.keep_ckpts = 1000
    exp, step, _, _ = trainer.load_for_sampling(c, str(run))
    assert step == max(steps) and exp is not None
    rows = [x["step"] for x in jsonl.read(str(run / "metrics.jsonl"))]
    assert rows == sorted(set(rows))
  finally:
    _umount(disk)
