"""Sweeps: the override helpers, validation, emitted commands and SLURM
script, the local runner's records, the collector, and one real sweep."""

import csv
import json
import os
import shlex
import subprocess
import sys

import pytest

from medgen_jax import sweep
from medgen_jax.sweep import collect as collect_lib
from medgen_jax.sweep import plan as plan_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/ddpm.py:res=16,runlocal"
GUIDANCE = "configs/ddpm.py:res=16,runlocal,cond=label"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
  # Config paths and launch.py commands are relative to the repository.
  monkeypatch.chdir(ROOT)


def test_product_zip_and_fixed_shapes_and_names():
  grid = sweep.product([
      sweep.values("sample.guidance_scale", [0, 1.5, 3]),
      sweep.values("seed", [0, 1]),
      sweep.fixed("train.num_steps", 7),
  ])
  assert len(grid) == 6
  # The last sweep varies fastest, as nested loops.
  assert [(r["sample.guidance_scale"], r["seed"]) for r in grid] == [
      (0, 0), (0, 1), (1.5, 0), (1.5, 1), (3, 0), (3, 1)]
  assert all(r["train.num_steps"] == 7 for r in grid)
  # Names hold what varies (not the fixed key), values as they read.
  assert plan_lib.run_names(grid) == [
      "guidance_scale=0,seed=0", "guidance_scale=0,seed=1",
      "guidance_scale=1.5,seed=0", "guidance_scale=1.5,seed=1",
      "guidance_scale=3,seed=0", "guidance_scale=3,seed=1"]
  zipped = sweep.zip([sweep.values("optim.lr", [1e-3, 2e-4]),
                      sweep.values("optim.warmup_steps", [10, 50])])
  assert zipped == [{"optim.lr": 1e-3, "optim.warmup_steps": 10},
                    {"optim.lr": 2e-4, "optim.warmup_steps": 50}]
  assert plan_lib.run_names(zipped) == ["lr=0.001,warmup_steps=10",
                                        "lr=0.0002,warmup_steps=50"]
  # Equal last components get the parent's name; tuples join with "+".
  both = sweep.zip([sweep.values("optim.lr", [1.0, 2.0]),
                    sweep.values("encoder.optim.lr", [3.0, 4.0]),
                    sweep.values("study.fractions", [[0.1, 1.0], [0.5]])])
  assert both[0]["study.fractions"] == (0.1, 1.0)  # lists become tuples
  assert plan_lib.run_names(both)[0] == (
      "optim.lr=1,encoder.optim.lr=3,fractions=0.1+1")


def test_helpers_refuse_bad_input_with_clear_errors():
  with pytest.raises(sweep.SweepError,
                     match=r"equal length: \['optim.lr'\] has 3, "
                     r"\['seed'\] has 2"):
    sweep.zip([sweep.values("optim.lr", [1, 2, 3]),
               sweep.values("seed", [0, 1])])
  with pytest.raises(sweep.SweepError, match=r"\['seed'\] set by more"):
    sweep.product([sweep.values("seed", [0]), sweep.values("seed", [1])])
  with pytest.raises(sweep.SweepError, match="got no values"):
    sweep.values("seed", [])
  with pytest.raises(sweep.SweepError, match="list of values"):
    sweep.values("seed", "01")
  with pytest.raises(sweep.SweepError, match="dotted config key"):
    sweep.values("optim..lr", [1])


def test_unknown_key_or_bad_value_fails_before_any_run(tmp_path):
  w = str(tmp_path / "w")
  with pytest.raises(sweep.SweepError,
                     match=r"'optim.lrr' is not a key of .*did you mean "
                     r"optim.lr\?"):
    plan_lib.make_plan(TINY, w, sweep=sweep.values("optim.lrr", [1e-3]))
  with pytest.raises(sweep.SweepError, match="'optim' is a section"):
    plan_lib.make_plan(TINY, w, sweep=sweep.values("optim", [1]))
  with pytest.raises(sweep.SweepError, match="optim.lr"):
    plan_lib.make_plan(TINY, w, sweep=sweep.values("optim.lr", ["fast"]))
  # A value config_check refuses names the run and the key.
  with pytest.raises(sweep.SweepError,
                     match=r"(?s)run name=sgdd: invalid config:.*optim.name"):
    plan_lib.make_plan(TINY, w,
                       sweep=sweep.values("optim.name", ["adam", "sgdd"]))
  with pytest.raises(sweep.SweepError, match=r"\['seed'\] set both"):
    plan_lib.make_plan(TINY, w, base={"seed": 3},
                       sweep=sweep.values("seed", [0, 1]))
  with pytest.raises(sweep.SweepError, match="needs the label-conditional"):
    plan_lib.make_plan(TINY, w)  # ddpm's own sweep without cond=label
  assert not os.path.exists(w)


def test_config_sweeps_expand_and_validate(tmp_path):
  ddpm = plan_lib.make_plan(GUIDANCE, str(tmp_path / "g"))
  assert ddpm.swept == ("sample.guidance_scale", "seed")
  assert len(ddpm.runs) == 6
  # The generative evaluator runs at the last of the runlocal 20 steps.
  config = plan_lib.run_config(ddpm, ddpm.runs[5])
  assert (config.sample.guidance_scale, config.seed,
          config.evals.generative.every_steps) == (3.0, 1, 20)
  study = plan_lib.make_plan("configs/study.py:runlocal", str(tmp_path / "s"))
  assert study.swept == ("study.synthetic_ratio", "seed")
  assert [r.name for r in study.runs][:2] == [
      "synthetic_ratio=0.25,seed=0", "synthetic_ratio=0.25,seed=1"]


def _plan(tmp_path, **kw):
  return plan_lib.make_plan(
      GUIDANCE, str(tmp_path / "w"), mode="train",
      base={"train.num_steps": 3, "data.data_dir": str(tmp_path / "data dir"),
            "data.contrasts": ("t2w",)}, **kw)


def test_commands_and_manifest_carry_every_override(tmp_path):
  plan = _plan(tmp_path)
  run = plan.runs[4]
  assert run.name == "guidance_scale=3,seed=0"
  words = shlex.split(run.command)
  assert words[:3] == ["python", "launch.py", f"--config={GUIDANCE}"]
  for arg in (f"--workdir={plan.workdir}/guidance_scale=3,seed=0",
              "--mode=train", "--config.train.num_steps=3",
              "--config.sample.guidance_scale=3.0", "--config.seed=0",
              f"--config.data.data_dir={tmp_path / 'data dir'}",
              "--config.data.contrasts=('t2w',)"):
    assert arg in words
  # The command parses back, through the same flags, to the run's config.
  config = plan_lib.parse_config(plan.config, dict(
      (a[len("--config."):].split("=", 1) for a in run.args
       if a.startswith("--config."))))
  assert (config.sample.guidance_scale, config.train.num_steps,
          config.data.data_dir) == (3.0, 3, str(tmp_path / "data dir"))
  manifest = json.loads(open(plan_lib.write_manifest(plan)).read())
  assert manifest["runs"][run.name]["overrides"] == {
      "sample.guidance_scale": 3.0, "seed": 0,
      "evals.generative.every_steps": 20}
  assert manifest["runs"][run.name]["command"] == run.command
  assert manifest["swept"] == ["sample.guidance_scale", "seed"]


def test_slurm_script_has_one_array_task_per_run(tmp_path):
  plan = _plan(tmp_path)
  path = plan_lib.write_slurm(plan)
  text = open(path).read()
  assert path == os.path.join(plan.workdir, "sweep.slurm")
  assert "#SBATCH --array=0-5\n" in text
  cases = [l.strip() for l in text.splitlines()
           if l.strip()[:2] in {f"{i})" for i in range(6)}]
  assert len(cases) == 6
  for i, (line, run) in enumerate(zip(cases, plan.runs)):
    assert line.startswith(f"{i}) run ") and line.endswith(
        run.command + " ;;")
  subprocess.run(["bash", "-n", path], check=True)  # valid bash
  # A task runs its command and records its exit status for the collector.
  shim = tmp_path / "bin"
  shim.mkdir()
  (shim / "python").write_text(
      "#!/bin/sh\necho \"$@\" > \"$SHIM_ARGS\"\nexit 3\n")
  (shim / "python").chmod(0o755)
  env = dict(os.environ, PATH=f"{shim}:{os.environ['PATH']}",
             SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_JOB_ID="77",
             SHIM_ARGS=str(tmp_path / "args.txt"))
  r = subprocess.run(["bash", path], env=env, cwd=tmp_path,
                     capture_output=True)
  assert r.returncode == 3
  # The task ran launch.py with its own run's arguments.
  args = (tmp_path / "args.txt").read_text()
  assert args.startswith("launch.py ") and plan.runs[1].workdir in args
  assert json.loads(open(os.path.join(plan.runs[1].workdir,
                                      "sweep_run.json")).read()) == {
      "returncode": 3, "slurm_job": "77_1"}
  assert collect_lib.run_status(plan.runs[1].workdir) == (
      "failed (exit 3)", "see slurm-77_1.out")


def test_cli_emits_one_command_per_run(tmp_path):
  r = subprocess.run(
      [sys.executable, "-m", "medgen_jax.sweep", f"--config={GUIDANCE}",
       f"--workdir={tmp_path}/w", "--config.train.num_steps=3",
       "--emit=commands"], cwd=ROOT, capture_output=True, text=True,
      timeout=120)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert len(lines) == 6
  assert all(l.startswith("python launch.py ") and
             "--config.train.num_steps=3" in l for l in lines)
  assert os.path.exists(tmp_path / "w" / "sweep.json")
  r = subprocess.run(
      [sys.executable, "-m", "medgen_jax.sweep", f"--config={GUIDANCE}",
       f"--workdir={tmp_path}/v", "--config.optim.lrr=1", "--dry_run"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and "lrr" in r.stderr
  assert r.stderr.strip().startswith("error:")


def test_failed_run_is_recorded_others_continue_and_rerun_skips(
    tmp_path, monkeypatch):
  # A stand-in for launch.py: no JAX, it fails for seed 1.
  fake = tmp_path / "fake_launch.py"
  fake.write_text(
      "import sys\n"
      "if '--config.seed=1' in sys.argv:\n"
      "  print('training...')\n"
      "  sys.exit('error: the loss became NaN at step 2')\n")
  monkeypatch.setattr(plan_lib, "LAUNCH", str(fake))
  plan = plan_lib.make_plan(
      GUIDANCE, str(tmp_path / "w"), validate=False,
      sweep=sweep.product([sweep.values("optim.lr", [1e-3, 2e-3]),
                           sweep.values("seed", [0, 1])]))
  plan_lib.write_manifest(plan)
  lines = []
  records = plan_lib.run_all(plan, echo=lines.append)
  assert [r["returncode"] for r in records.values()] == [0, 1, 0, 1]
  assert "FAILED (exit 1)" in lines[3] and "NaN at step 2" in lines[3]
  rows, swept = collect_lib.read_rows(plan.workdir)
  assert swept == ["optim.lr", "seed"]
  assert [(r.name, r.status) for r in rows] == [
      ("lr=0.001,seed=0", "done"), ("lr=0.001,seed=1", "failed (exit 1)"),
      ("lr=0.002,seed=0", "done"), ("lr=0.002,seed=1", "failed (exit 1)")]
  assert rows[1].note == "error: the loss became NaN at step 2"
  # A rerun starts only the runs that did not finish.
  launched = []
  plan_lib.run_all(plan, echo=lines.append,
                   launch=lambda p, r, log: launched.append(r.name) or 0)
  assert launched == ["lr=0.001,seed=1", "lr=0.002,seed=1"]
  # Records of other commands (here other fixed overrides) are outdated.
  plan_lib.write_manifest(plan_lib.make_plan(
      GUIDANCE, plan.workdir, validate=False, base={"train.num_steps": 5},
      sweep=sweep.product([sweep.values("optim.lr", [1e-3, 2e-3]),
                           sweep.values("seed", [0, 1, 2])])))
  assert [r.status for r in collect_lib.read_rows(plan.workdir)[0]] == [
      "outdated", "outdated", "pending", "outdated", "outdated", "pending"]
  # An interrupted run stops the sweep; it and the rest stay unfinished.
  plan = plan_lib.make_plan(GUIDANCE, str(tmp_path / "i"), validate=False,
                            sweep=sweep.values("seed", [0, 1, 2]))
  plan_lib.write_manifest(plan)
  with pytest.raises(KeyboardInterrupt):
    plan_lib.run_all(plan, echo=lines.append,
                     launch=lambda p, r, log: 0 if r.index == 0 else 130)
  assert [r.status for r in collect_lib.read_rows(plan.workdir)[0]] == [
      "done", "interrupted", "pending"]


def _row(name, overrides, loss, status="done"):
  return collect_lib.Row(name, overrides, status,
                         metrics={"train/loss": loss})


def test_plot_series_average_seeds_and_skip_unfinished_runs(tmp_path):
  swept = ["optim.lr", "seed", "model.ch"]
  rows = [_row("a", {"optim.lr": 0.2, "seed": 0, "model.ch": 8}, 1.0),
          _row("b", {"optim.lr": 0.2, "seed": 1, "model.ch": 8}, 3.0),
          _row("c", {"optim.lr": 0.1, "seed": 0, "model.ch": 8}, 5.0),
          _row("d", {"optim.lr": 0.1, "seed": 1, "model.ch": 8}, 99.0,
               "failed (exit 1)"),
          _row("e", {"optim.lr": 0.1, "seed": 0, "model.ch": 16}, 7.0)]
  lines, values, numeric = collect_lib.plot_series(rows, swept, "train/loss",
                                                   "optim.lr")
  assert numeric and values == [0.1, 0.2]  # sorted on the axis
  assert [s.label for s in lines] == ["train/loss (ch=8)",
                                      "train/loss (ch=16)"]
  assert lines[0].x == (0.1, 0.2) and lines[0].mean == (5.0, 2.0)
  assert lines[0].sd[0] == 0.0 and lines[0].sd[1] == pytest.approx(2 ** 0.5)
  assert lines[0].n == (1, 2) and lines[1].x == (0.1,)
  path = str(tmp_path / "p.png")
  assert collect_lib.plot_metric(rows, swept, "train/loss", "optim.lr", path)
  assert os.path.getsize(path) > 0
  assert not collect_lib.plot_metric(rows, swept, "eval/*/fid", "optim.lr",
                                     str(tmp_path / "q.png"))
  assert not os.path.exists(tmp_path / "q.png")


def _last_train_loss(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    lines = [json.loads(l) for l in f if l.strip()]
  return [l for l in lines if l["split"] == "train"][-1]


def test_end_to_end_sweep_runs_and_collects(data_dir, tmp_path):
  """Two real runs of the tiniest DDPM, then the collector."""
  from medgen_jax import commands  # pylint: disable=import-outside-toplevel

  def in_process(plan, run, log_path):
    # In this process, not a child launch.py: the runs share one JAX start-up
    # and compiled programs (a child would pay both every run).
    del log_path
    commands.run(plan.mode, plan_lib.run_config(plan, run), run.workdir)
    return 0

  plan = plan_lib.make_plan(
      TINY, str(tmp_path / "w"),
      base={"data.data_dir": data_dir, "data.num_subjects": 5,
            "train.sample_every": 0, "train.log_every": 1,
            "train.ckpt_every": 2},
      # The step count does not change the compiled step: one compilation.
      sweep=sweep.values("train.num_steps", [2, 3]))
  plan_lib.write_manifest(plan)
  records = plan_lib.run_all(plan, launch=in_process, echo=lambda s: None)
  assert [r["returncode"] for r in records.values()] == [0, 0]
  out = collect_lib.collect(plan.workdir)
  with open(out.csv) as f:
    table = list(csv.DictReader(f))
  assert [r["run"] for r in table] == ["num_steps=2", "num_steps=3"]
  for row, run in zip(table, plan.runs):
    last = _last_train_loss(run.workdir)
    assert row["status"] == "done"
    assert row["train.num_steps"] == str(last["step"])
    assert row["step"] == str(last["step"])
    assert float(row["train/loss"]) == pytest.approx(last["loss"], rel=1e-4)
  md = open(out.md).read()
  assert md.count("| num_steps=") == 2 and "train/loss" in md
  assert out.plots == [os.path.join(plan.workdir,
                                    "sweep_train_loss_vs_num_steps.png")]
  assert os.path.getsize(out.plots[0]) > 0
