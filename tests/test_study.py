"""The augmentation study end to end, in miniature, plus its pieces."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from configs import study as study_config
from medgen_jax import commands
from medgen_jax import config_check
from medgen_jax import report
from medgen_jax.data import pipeline
from medgen_jax.downstream import fit as fit_lib
from medgen_jax.downstream import study as study_lib
from medgen_jax.downstream import synthetic as synthetic_lib
from medgen_jax.eval import tasks as tasks_lib


def test_arm_specs_expand_synthetic_arms_per_generator():
  arms = study_lib.arm_specs(study_lib.ARM_KINDS, ["ddpm", "vae"])
  names = [a.name for a in arms]
  assert names == ["real", "real+classical", "real+ddpm", "real+vae",
                   "real+classical+ddpm", "real+classical+vae", "ddpm only",
                   "vae only"]
  by_name = {a.name: a for a in arms}
  assert by_name["real+classical+vae"].classical
  assert by_name["real+classical+vae"].synthetic_fraction(0.3) == 0.3
  assert by_name["ddpm only"].synthetic_fraction(0.3) == 1.0
  assert by_name["real+classical"].synthetic_fraction(0.3) == 0.0
  with pytest.raises(ValueError, match="study.arms entry 'gan'"):
    study_lib.arm_specs(["gan"], ["ddpm"])


def test_subject_subsets_are_nested_and_whole_subjects():
  ids = np.repeat(np.arange(20), 4)
  small = pipeline.subject_subset(ids, 0.1, seed=3)
  large = pipeline.subject_subset(ids, 0.5, seed=3)
  assert len(np.unique(ids[small])) == 2
  assert len(np.unique(ids[large])) == 10
  assert set(small) <= set(large)
  for s in np.unique(ids[large]):  # every slice of a chosen subject.
    assert np.sum(ids[large] == s) == 4
  other = pipeline.subject_subset(ids, 0.5, seed=4)
  assert set(other) != set(large)
  with pytest.raises(ValueError, match="subject fraction"):
    pipeline.subject_subset(ids, 0.0, seed=0)


def test_summarize_t_interval():
  s = study_lib.summarize([1.0, 2.0, 3.0])
  # mean 2, sd 1, t(0.975, 2) = 4.3027 -> half width 4.3027 / sqrt(3).
  assert s["mean"] == pytest.approx(2.0)
  assert s["ci_high"] - s["mean"] == pytest.approx(4.302653 / np.sqrt(3),
                                                   rel=1e-5)
  one = study_lib.summarize([0.5])
  assert one["mean"] == 0.5 and np.isnan(one["ci_low"])
  assert study_lib.summarize([np.nan])["n"] == 0


def test_intervals_stay_inside_the_metric_range():
  auc = [0.99, 0.80, 1.0]
  plain = study_lib.summarize(auc)
  assert plain["ci_high"] > 1.0  # what a t-interval on the raw scale gives
  s = study_lib.summarize(auc, tasks_lib.metric_range("auc"))
  assert s["mean"] == pytest.approx(np.mean(auc))
  assert 0.0 < s["ci_low"] < 0.8 and 0.99 < s["ci_high"] < 1.0
  assert s["ci_low"] <= s["mean"] <= s["ci_high"]
  hd = study_lib.summarize([0.5, 4.0, 9.0], tasks_lib.metric_range("hd95"))
  assert 0.0 < hd["ci_low"] < 0.5 and hd["ci_high"] > 9.0
  # Logit intervals of values near the middle are close to the t-interval.
  mid = study_lib.summarize([0.49, 0.5, 0.51], (0.0, 1.0))
  raw = study_lib.summarize([0.49, 0.5, 0.51])
  assert mid["ci_low"] == pytest.approx(raw["ci_low"], abs=2e-3)
  # Paired differences of a [0, 1] metric stay in [-1, 1], with a p-value.
  d = study_lib.summarize_paired([0.3, 0.25, 0.9], (0.0, 1.0))
  assert -1.0 < d["ci_low"] < 0.3 and 0.9 < d["ci_high"] < 1.0
  assert d["p"] == pytest.approx(
      scipy_stats.ttest_1samp([0.3, 0.25, 0.9], 0.0).pvalue)
  assert study_lib.summarize_paired([0.0, 0.0], (0.0, 1.0))["p"] == 1.0


def test_draw_batch_mixes_real_and_synthetic_rows():
  real = {"image": jnp.zeros((10, 4, 4, 1)), "label": jnp.zeros((10,),
                                                                jnp.int32)}
  syn = {"image": jnp.ones((6, 4, 4, 1)), "label": jnp.ones((6,), jnp.int32)}
  pools = fit_lib.Pools(real=real, real_index=jnp.arange(10)[None],
                        real_count=jnp.asarray([3]), synthetic=syn,
                        synthetic_count=jnp.asarray(6))
  for frac, want in ((0.0, 0), (0.25, 4), (1.0, 16)):
    b = fit_lib.draw_batch(jax.random.key(0), pools, pools.real_index[0],
                           pools.real_count[0],
                           fit_lib.make_arm(frac, False), 16)
    assert int(b["label"].sum()) == want
    assert bool(jnp.all(b["image"][:want] == 1.0))
  # Only the first real_count rows of the subset are drawn.
  idx = jnp.asarray([7, 2, 9, 0, 0, 0, 0, 0, 0, 0])
  real = {"image": jnp.arange(10.0).reshape(10, 1, 1, 1),
          "label": jnp.zeros((10,), jnp.int32)}
  pools = pools.replace(real=real)
  b = fit_lib.draw_batch(jax.random.key(1), pools, idx, jnp.asarray(3),
                         fit_lib.make_arm(0.0, False), 64)
  assert set(np.asarray(b["image"]).ravel().tolist()) == {7.0, 2.0, 9.0}


def test_segmentation_loss_prefers_the_right_mask():
  target = jnp.zeros((2, 8, 8), jnp.int32).at[:, 2:5, 2:5].set(1)
  good = jnp.stack([-5.0 * (target == 1) + 5.0 * (target == 0),
                    5.0 * (target == 1) - 5.0 * (target == 0)], -1)
  bad = -good
  assert float(tasks_lib.segmentation_loss(good, target, 2)) < 0.1
  assert float(tasks_lib.segmentation_loss(bad, target, 2)) > 1.0


def test_segmentation_scores_known_overlap():
  target = np.zeros((3, 16, 16), np.int32)
  target[0, 4:8, 4:8] = 1
  target[1, 2:6, 2:6] = 1
  pred = np.zeros_like(target)
  pred[0, 4:8, 4:8] = 1           # perfect
  pred[1, 2:6, 5:9] = 1           # shifted by 3 columns: Dice 1/4
  scores = tasks_lib.segmentation_scores(pred, target, 2)
  assert scores["dice"] == pytest.approx(2 * (16 + 4) / (32 + 32))
  assert scores["dice_per_image"] == pytest.approx((1.0 + 0.25) / 2)
  assert scores["hd95_missed"] == 0.0
  pred[1] = 0                     # missed lesion: Dice 0, HD95 counted missed
  scores = tasks_lib.segmentation_scores(pred, target, 2)
  assert scores["dice_per_image"] == pytest.approx(0.5)
  assert scores["hd95"] == pytest.approx(0.0)
  assert scores["hd95_missed"] == 1.0


def test_study_config_errors_are_listed(tmp_path):
  c = study_config.get_config("runlocal")
  c.study.fractions = (0.0, 0.5)
  c.study.arms = ("real", "gan")
  c.study.tasks.classification.inputs = ("dwi",)
  c.study.tasks.segmentation.steps = 5
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(c)
  msg = str(e.value)
  for part in ("study.fractions entry 0.0", "'gan'", "contrast 'dwi'",
               "steps=5 must be a multiple"):
    assert part in msg


@pytest.fixture(scope="module")
def mini_study(data_dir, tmp_path_factory):
  c = study_config.get_config("runlocal,fractions=0.5+1,"
                              "tasks=classification+segmentation+translation,"
                              "translators=pix2pix")
  c.data.data_dir = data_dir
  workdir = str(tmp_path_factory.mktemp("study"))
  config_check.validate(c)
  out = commands.run("auto", c, workdir)
  return c, workdir, out


def test_mini_study_every_arm_has_numbers(mini_study):
  c, workdir, out = mini_study
  with open(os.path.join(workdir, "results.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  assert list(c.generators) == ["acgan", "cvae", "ddpm"]  # every family
  arms = [a.name for a in study_lib.arm_specs(c.study.arms, c.generators)]
  cells = {(r["task"], r["fraction"], r["arm"]) for r in rows}
  assert cells == {(t, f, a) for t in ("classification", "segmentation",
                                       "translation")
                   for f in (0.5, 1.0) for a in arms} | {
                       ("translation", f, "pix2pix (translator)")
                       for f in (0.5, 1.0)}
  by_cell = {(r["task"], r["fraction"], r["arm"]): r for r in rows}
  for r in rows:
    n = len(r["seed_scores"])
    assert n == c.study.num_seeds + r.get("extra_seeds", 0)
    if r.get("extra_seeds") and r["arm"] != "pix2pix (translator)":
      # Extra seeds near a decision go to the baselines too.
      base = by_cell[(r["task"], r["fraction"], "real")]
      assert len(base["seed_scores"]) == n, r
    vals = [s[r["primary"]] for s in r["seed_scores"]]
    assert all(np.isfinite(vals)), r
    if "translator" not in r["arm"]:
      # Model selection on the validation split, per seed.
      steps = c.study.tasks[r["task"]].steps
      assert len(r["selected"]) == len(r["seed_scores"])
      for sel in r["selected"]:
        assert sel["score"] == max(sel["curve"]) and 0 < sel["step"] <= steps
  results = out["results"]
  for r in results:
    if r["arm"] != "real":
      assert np.isfinite(r["delta_vs_real"]["mean"]), r
  for r in rows:
    if r["task"] == "translation":
      for s in r["seed_scores"]:
        assert 0.0 <= s["seg_dice"] <= 1.0
        assert 0.0 <= s["seg_dice_real"] <= 1.0
  # Subject subsets: half of the training subjects at 0.5.
  half = [r for r in rows if r["fraction"] == 0.5 and r["arm"] == "real"][0]
  full = [r for r in rows if r["fraction"] == 1.0 and r["arm"] == "real"][0]
  assert all(h < f for h, f in zip(half["real_subjects"],
                                   full["real_subjects"]))


def test_mini_study_report_structure(mini_study):
  c, workdir, out = mini_study
  md = open(os.path.join(workdir, "report.md")).read()
  for heading in ("# Generative augmentation study", "## Verdict",
                  "## Downstream results", "### classification: auc",
                  "### segmentation: dice", "### translation: ssim",
                  "## Real vs synthetic images", "## Generators",
                  "## Run time", "## Config",
                  "### Do the metrics see known degradations?"):
    assert heading in md, heading
  assert "keeps its parameters with the best score on the 'val'" in md
  assert "## Families side by side" in md
  for name, family in (("ddpm", "diffusion"), ("acgan", "GAN"),
                       ("cvae", "VAE")):
    assert f"| {name} ({family}) |" in md
    for task, metric in (("classification", "auc"), ("segmentation", "dice")):
      assert f"- **{name}** ({family}), {task} ({metric}): " in md
  chosen = json.load(open(os.path.join(workdir, "classical_strength.json")))
  assert set(chosen) == set(c.study.tasks)
  for task, ch in chosen.items():
    assert ch["strengths"] == [0.5, 1.0] and len(ch["scores"]) == 2
    sign = 1 if tasks_lib.higher_is_better(ch["metric"]) else -1
    assert ch["chosen"] == ch["strengths"][int(np.argmax(
        [sign * v for v in ch["scores"]]))]
  assert "Classical augmentation strength, chosen on the validation" in md
  assert "Check of the classical baseline (classification, 1 of" in md
  for r in out["results"]:
    assert ("delta_vs_classical" in r) == bool(r.get("generator"))
  for name in ("blur", "dropped_modes", "training_copies"):
    assert f"| {name} | 0 |" in md
  html = open(os.path.join(workdir, "report.html")).read()
  assert html.startswith("<!DOCTYPE html>") and "<table>" in html
  for img in ("figures/classification_auc.png", "figures/segmentation_dice.png",
              "figures/translation_ssim.png", "figures/real_vs_ddpm.png"):
    assert img in md and os.path.getsize(os.path.join(workdir, img)) > 1000
  gm = json.load(open(os.path.join(workdir, "generator_metrics.json")))
  assert gm["encoder"]["settings"]["arch"] == "ResNet"
  for name in ("ddpm", "real (reference)"):
    for k in ("fid", "kid", "precision", "recall", "density", "coverage",
              "ms_ssim"):
      assert k in gm["metrics"][name]
  assert 0.0 <= gm["metrics"]["ddpm"]["memorized_fraction"] <= 1.0
  table = report.summary_table(out["results"])
  assert "real+classical+ddpm" in table and "translation" in table


def test_mini_study_synthetic_export_is_a_tfds_dataset(mini_study):
  c, workdir, _ = mini_study
  directory = os.path.join(workdir, "synthetic", "ddpm")
  prov = json.load(open(os.path.join(directory, "provenance.json")))
  assert prov["checkpoint_step"] == c.generators.ddpm.train.num_steps
  assert prov["contrasts"] == list(c.data.contrasts)
  assert prov["class_counts"] == [c.study.synthetic_per_class] * 2
  d = c.data.copy_and_resolve_references()
  d.dataset = "synthetic"
  d.path = directory
  split = pipeline.read_split(d, "train")
  assert split["flair"].shape == (2 * c.study.synthetic_per_class, 16, 16)
  assert set(np.unique(split["lesion_mask"])) <= {0, 1}
  assert np.all(split["subject_id"] == -1)


def test_mini_study_resumes_without_recomputing(mini_study):
  c, workdir, _ = mini_study
  path = os.path.join(workdir, "results.jsonl")
  before = open(path).read()
  out = commands.run("study", c, workdir)
  assert open(path).read() == before
  assert out["timings"]["downstream"] < 30.0


def test_mini_study_rebuilds_damaged_caches(mini_study, caplog):
  c, workdir, _ = mini_study
  path = os.path.join(workdir, "results.jsonl")
  before = open(path).read()
  samples = os.path.join(workdir, "synthetic", "ddpm", "samples.npz")
  with open(samples, "rb") as f:
    data = f.read()
  with open(samples, "wb") as f:  # cut short, as by a full disk
    f.write(data[:len(data) // 3])
  card = os.path.join(workdir, "encoder", "encoder.json")
  with open(card, "wb") as f:
    f.write(b"\xff\xfe\x00 not json")
  with caplog.at_level(logging.WARNING):
    commands.run("study", c, workdir)
  assert "damaged synthetic set" in caplog.text
  assert "BadZipFile" in caplog.text
  assert "damaged feature-extractor cache" in caplog.text
  with np.load(samples) as z:
    assert len(z["label"]) == 2 * c.study.synthetic_per_class
  # Sampled again from the same checkpoint and seed: the same set, so every
  # scored cell (a primary result) is kept as it was.
  assert open(path).read() == before


def test_garbled_provenance_is_a_cache_miss_with_a_warning(tmp_path, caplog):
  arrays = {"image": np.zeros((2, 4, 4, 1), np.float32),
            "label": np.array([0, 1])}
  directory = str(tmp_path / "set")
  synthetic_lib.export(directory, arrays, dict(contrasts=["t2w"],
                                               num_classes=2, mask_keys=[]))
  want = {"contrasts": ["t2w"]}
  assert study_lib._cached_export(directory, want) is not None  # pylint: disable=protected-access
  with open(os.path.join(directory, "provenance.json"), "wb") as f:
    f.write(b'{"contrasts": \xc3\x28')
  with caplog.at_level(logging.WARNING):
    assert study_lib._cached_export(directory, want) is None  # pylint: disable=protected-access
  assert "provenance.json: unreadable (UnicodeDecodeError" in caplog.text


def test_mini_study_reruns_a_cell_scored_with_other_settings(mini_study):
  c, workdir, _ = mini_study
  path = os.path.join(workdir, "results.jsonl")
  lines = open(path).read().splitlines()
  rows = [json.loads(l) for l in lines]
  i = next(k for k, r in enumerate(rows)
           if r["task"] == "classification" and r["arm"] == "real+ddpm")
  tampered = dict(rows[i], inputs="from-other-settings",
                  seed_scores=[{"auc": -1.0}])
  with open(path, "w") as f:
    f.writelines(l + "\n" for l in lines[:i] + [
        json.dumps(tampered, sort_keys=True)] + lines[i + 1:])
  commands.run("study", c, workdir)
  after = open(path).read().splitlines()
  # Every other line kept verbatim; the stale one scored again, the same.
  assert sorted(set(after) - set(lines)) == [after[-1]]
  assert set(lines) - set(after) == {lines[i]}
  fresh = json.loads(after[-1])
  assert fresh["inputs"] == rows[i]["inputs"]
  assert (fresh["task"], fresh["fraction"], fresh["arm"]) == (
      rows[i]["task"], rows[i]["fraction"], rows[i]["arm"])
  for got, want in zip(fresh["seed_scores"], rows[i]["seed_scores"]):
    assert got["auc"] == pytest.approx(want["auc"], abs=1e-6)


def _record(task, fraction, arm, scores, generator=None):
  return dict(task=task, fraction=fraction, arm=arm, generator=generator,
              primary="auc", seed_scores=[{"auc": v} for v in scores],
              real_examples=[1] * len(scores), real_subjects=[1] * len(scores),
              selected=[{}] * len(scores))


class _FakeDownstream:
  """Scores every new seed of an arm with its arm's constant (no training),
  counting the calls."""

  def __init__(self, level):
    self.level, self.calls = level, []

  def fit_cell(self, task, fraction, arm, seeds):
    seeds = list(seeds)
    self.calls.append((task, fraction, arm.name, seeds))
    n = len(seeds)
    return dict(gen=arm.generator, primary="auc",
                seed_scores=[{"auc": self.level[arm.name] + 0.01 * s}
                             for s in seeds],
                real_examples=[1] * n, real_subjects=[1] * n,
                selected=[{}] * n, final_loss=0.0)


def test_seeds_are_added_where_a_decision_is_close(tmp_path):
  arms = study_lib.arm_specs(("real", "real+classical", "real+synthetic"),
                             ["ddpm", "acgan"])
  # At 0.1 the DDPM's gain is noisy (p ~ 0.1): close, while the GAN's
  # loss is clear (p < 0.01); at 1 the gain is clear and at 0.5 there is
  # none at all (p ~ 0.6): those are left alone.
  results = [
      _record("cls", 0.1, "real", [0.60, 0.70, 0.65]),
      _record("cls", 0.1, "real+classical", [0.61, 0.69, 0.66]),
      _record("cls", 0.1, "real+ddpm", [0.75, 0.72, 0.90], "ddpm"),
      _record("cls", 0.1, "real+acgan", [0.50, 0.60, 0.55], "acgan"),
      _record("cls", 0.5, "real", [0.70, 0.75, 0.72]),
      _record("cls", 0.5, "real+classical", [0.70, 0.75, 0.72]),
      _record("cls", 0.5, "real+ddpm", [0.71, 0.73, 0.74], "ddpm"),
      _record("cls", 1.0, "real", [0.70, 0.71, 0.72]),
      _record("cls", 1.0, "real+classical", [0.70, 0.71, 0.72]),
      _record("cls", 1.0, "real+ddpm", [0.80, 0.812, 0.819], "ddpm")]
  assert study_lib.near_decision(results, (0.01, 0.2)) == [
      ("cls", 0.1, ("real", "real+classical", "real+ddpm"))]
  c = study_config.get_config("runlocal")
  c.study.update(num_seeds=3, extra_seeds=2)
  ds = _FakeDownstream({"real": 0.6, "real+classical": 0.6,
                        "real+ddpm": 0.8, "real+acgan": 0.5})
  study_lib.add_seeds_near_decisions(c, str(tmp_path), ds, results, arms)
  # The close comparison's arms, the same two new seeds; nothing else.
  extended = ("real", "real+classical", "real+ddpm")
  assert sorted(ds.calls) == [("cls", 0.1, a, [3, 4]) for a in extended]
  for r in results:
    n = 5 if (r["fraction"], r["arm"]) in {(0.1, a) for a in extended} else 3
    assert len(r["seed_scores"]) == len(r["selected"]) == n
    assert r.get("extra_seeds", 0) == (2 if n == 5 else 0)
  close = [r for r in results if r["arm"] == "real+ddpm"][0]
  assert close["metrics"]["auc"]["mean"] == pytest.approx(
      np.mean([0.75, 0.72, 0.90, 0.83, 0.84]))
  # The GAN arm keeps 3 seeds and is still paired seed by seed.
  paired = [dict(r) for r in results]
  study_lib.paired_deltas(paired)
  gan = [r for r in paired if r["arm"] == "real+acgan"][0]
  assert gan["delta_vs_real"]["n"] == 3
  assert gan["delta_vs_real"]["mean"] == pytest.approx(-0.1)
  with open(tmp_path / "results.jsonl") as f:
    assert len([json.loads(l) for l in f]) == 3   # the updated cells
  note = report._extra_seeds_note(c.study, results)
  assert "cls at 0.1: real, real+classical, real+ddpm" in note
  # Done once: a second pass adds nothing.
  ds.calls.clear()
  study_lib.add_seeds_near_decisions(c, str(tmp_path), ds, results, arms)
  assert ds.calls == []


def test_family_verdicts_in_plain_words():
  c = study_config.get_config("runlocal,tasks=classification")
  base = [0.60, 0.70, 0.65, 0.62]
  results = [
      _record("classification", f, "real", base) for f in (0.1, 1.0)] + [
      _record("classification", f, "real+classical",
              [v + 0.01 * (-1) ** i for i, v in enumerate(base)])
      for f in (0.1, 1.0)] + [
      _record("classification", 0.1, "real+ddpm",
              [v + d for v, d in zip(base, (0.20, 0.22, 0.19, 0.21))], "ddpm"),
      _record("classification", 1.0, "real+ddpm",
              [v + d for v, d in zip(base, (0.05, -0.04, 0.02, -0.03))],
              "ddpm"),
      _record("classification", 0.1, "real+acgan",
              [v + d for v, d in zip(base, (0.03, -0.02, 0.01, -0.01))],
              "acgan"),
      _record("classification", 1.0, "real+acgan",
              [v - d for v, d in zip(base, (0.10, 0.12, 0.11, 0.09))],
              "acgan")]
  study_lib.paired_deltas(results)
  verdicts = report.family_verdicts(c, results)
  by_name = {v.split("**")[1]: v for v in verdicts}
  assert set(by_name) == {"ddpm", "acgan"}   # cvae has no arm here
  ddpm, gan = by_name["ddpm"], by_name["acgan"]
  assert ddpm.startswith("**ddpm** (diffusion), classification (auc): helps")
  assert "at 0.1 of the real data better than real-only (0.205" in ddpm
  assert "and better than real+classical" in ddpm
  assert "at 1 of the real data no difference to real-only or" in ddpm
  assert gan.startswith("**acgan** (GAN), classification (auc): hurts")
  assert "at 1 of the real data worse than real-only (-0.105" in gan


def test_cell_inputs_change_with_what_a_cell_depends_on():
  c = study_config.get_config("runlocal")
  base = study_lib.cell_inputs(c, "classification", "abc")
  assert study_lib.cell_inputs(c, "classification", "abc") == base
  assert study_lib.cell_inputs(c, "classification", "abd") != base
  other = c.copy_and_resolve_references()
  other.study.tasks.classification.steps += 1
  assert study_lib.cell_inputs(other, "classification", "abc") != base
  other = c.copy_and_resolve_references()
  other.augment.flip_prob += 0.1
  assert study_lib.cell_inputs(other, "classification", "abc") != base
  # Adding fractions or arms does not invalidate finished cells.
  other = c.copy_and_resolve_references()
  other.study.fractions = other.study.fractions + (0.25,)
  assert study_lib.cell_inputs(other, "classification", "abc") == base


def test_mini_study_benchmarks_translators_like_the_regression_arms(
    mini_study):
  c, workdir, out = mini_study
  rows = {(r["fraction"], r["arm"]): r for r in out["results"]
          if r["task"] == "translation"}
  for f in (0.5, 1.0):
    t, real = rows[(f, "pix2pix (translator)")], rows[(f, "real")]
    assert t["arm_kind"] == "translator" and t["method"] == "pix2pix"
    assert len(t["seed_scores"]) == c.study.num_seeds
    # Scored like the U-Net arms: same metrics, paired delta to real-only.
    assert set(t["seed_scores"][0]) == set(real["seed_scores"][0])
    assert np.isfinite(t["delta_vs_real"]["mean"])
  # Each seed's translator saw exactly that seed's real subjects.
  cfg = study_lib.translator_config(c, "pix2pix", "translation", 0.5, 1)
  assert (cfg.data.subject_fraction, cfg.data.subject_seed) == (0.5, 1)
  assert tuple(cfg.translation.source) == tuple(
      c.study.tasks.translation.inputs)
  assert os.path.isdir(os.path.join(workdir, "translators",
                                    "translation_pix2pix_f0.5_s1",
                                    "checkpoints"))


def test_a_latent_generator_and_its_stage_1_train_on_the_study_data():
  c = study_config.get_config("runlocal,generators=ddpm+ldm")
  c.data.contrasts = ("t1w", "flair")
  config_check.validate(c)  # stage 1 used to keep its own contrasts
  gen = study_lib.generator_config(c, "ldm", 0.5)
  assert gen.data.cond == "label"
  assert gen.stage1.train.sample_every == 0  # the study draws its own grids
  for section in (gen, gen.stage1):
    assert tuple(section.data.contrasts) == ("t1w", "flair")
    assert section.data.subject_fraction == 0.5
    assert section.data.num_subjects == c.data.num_subjects
  train = {"image": np.zeros((4, 8, 8, 2)), "label": np.array([0, 1, 0, 1]),
           "mask": np.zeros((4, 8, 8, 1))}
  resolved, _ = study_lib.resolve_for_data(c, train)
  gen = study_lib.generator_config(resolved, "ldm", None)
  assert tuple(gen.data.mask_channels) == ("mask",)
  assert tuple(gen.stage1.data.mask_channels) == ("mask",)
  assert "subject_fraction" not in gen.stage1.data or (
      gen.stage1.data.subject_fraction == 1.0)
