"""The memorization audit flags copies of training images, not fresh samples."""

import json

import numpy as np
import pytest

from medgen_jax.eval import memorization as mem


@pytest.fixture(scope="module")
def sets():
  """Training, held-out and fresh samples of one distribution, as 4x8x1
  "images" (32 pixels)."""
  rng = np.random.default_rng(0)
  draw = lambda n: rng.normal(size=(n, 4, 8, 1)).astype(np.float32)
  return dict(train=draw(300), heldout=draw(200), fresh=draw(96), rng=rng)


def test_flags_exact_and_near_copies(sets):
  train = sets["train"]
  near = train[7] + sets["rng"].normal(0, 1e-3, train[7].shape)
  synthetic = np.concatenate([train[5:6], near[None].astype(np.float32),
                              sets["fresh"]])
  audit = mem.memorization_audit(synthetic, train, sets["heldout"],
                                 quantile=0.01)
  assert audit.space == "pixels"
  assert audit.flags[:2].all()
  np.testing.assert_array_equal(audit.nearest_train[:2], [5, 7])
  assert audit.distances[0] == 0.0 and audit.ratio[0] == 0.0
  assert 0 < audit.distances[1] < 0.01 and audit.ratio[1] < 0.01
  assert audit.threshold == pytest.approx(
      np.quantile(audit.heldout_distances, 0.01))
  assert audit.flagged_fraction == pytest.approx(audit.flags.mean())
  pairs = audit.closest_pairs(2)
  assert [(p["synthetic"], p["train"]) for p in pairs] == [(0, 5), (1, 7)]
  assert pairs[0]["distance"] == 0.0 and pairs[0]["flagged"]
  summary = audit.summary()
  json.dumps(summary)  # JSON-ready
  assert summary["flagged"] == int(audit.flags.sum()) >= 2
  assert summary["min_distance"] == 0.0


def test_fresh_samples_are_not_flagged(sets):
  audit = mem.memorization_audit(sets["fresh"], sets["train"],
                                 sets["heldout"], quantile=0.01)
  # Chance flags happen at about the quantile's rate; none of a 96-sample
  # draw here, and no evidence of copying.
  assert audit.flagged_fraction <= 0.03
  assert audit.p_value > 0.05
  assert np.median(audit.ratio) > 0.5
  # The same test in a feature space ([N, D] input).
  flat = lambda x: x.reshape(len(x), -1)
  feats = mem.memorization_audit(flat(sets["fresh"]), flat(sets["train"]),
                                 flat(sets["heldout"]), quantile=0.01)
  assert feats.space == "features"
  np.testing.assert_allclose(feats.distances, audit.distances, rtol=1e-6)


def test_many_copies_give_a_small_p_value(sets):
  train = sets["train"]
  synthetic = np.concatenate([train[:10], sets["fresh"][:40]])
  audit = mem.memorization_audit(synthetic, train, sets["heldout"],
                                 quantile=0.01)
  assert audit.flags[:10].all()
  assert audit.flagged_fraction >= 0.2
  assert audit.p_value < 1e-6


def test_bad_input_is_named(sets):
  with pytest.raises(ValueError, match="synthetic: samples have shape"):
    mem.memorization_audit(sets["fresh"][:, :2], sets["train"],
                           sets["heldout"])
  with pytest.raises(ValueError, match="quantile must be in"):
    mem.memorization_audit(sets["fresh"], sets["train"], sets["heldout"],
                           quantile=1.5)
