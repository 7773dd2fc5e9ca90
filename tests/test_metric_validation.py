"""The generator metrics on known degradations of a toy image set."""

import dataclasses

import ml_collections
import numpy as np
import pytest

from medgen_jax.eval import metric_validation as mv


@dataclasses.dataclass(frozen=True)
class PoolFeatures:
  """A fixed feature space for the toy: 4x4 average pools of the pixels
  (the study's encoder is a trained network; the metrics only need
  ``features``)."""

  card = {"description": "4x4 pooled pixels"}

  def features(self, images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, np.float64)
    n, h, w, c = x.shape
    return x.reshape(n, h // 4, 4, w // 4, 4, c).mean((2, 4)).reshape(n, -1)


def _toy(n: int, seed: int):
  """Two classes of 16x16 images: a disc of random brightness, and the
  same with a bright blob (the lesion) and its mask."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:16, :16]
  images, masks, labels = [], [], []
  for i in range(n):
    label = int(i % 3 == 0)
    disc = ((yy - 8) ** 2 + (xx - 8) ** 2 < 36 + rng.integers(-8, 8))
    img = np.where(disc, rng.uniform(-0.2, 0.4), -1.0)
    mask = np.zeros((16, 16), np.float32)
    if label:
      cy, cx = rng.integers(5, 11, size=2)
      mask[cy - 1:cy + 2, cx - 1:cx + 2] = 1
      img = np.where(mask > 0, 0.9, img)
    images.append(img + 0.03 * rng.standard_normal((16, 16)))
    masks.append(mask)
    labels.append(label)
  return {"image": np.clip(np.stack(images)[..., None], -1, 1).astype(
      np.float32), "lesion_mask": np.stack(masks),
          "label": np.asarray(labels, np.int32)}


CFG = ml_collections.ConfigDict(dict(
    kid_subsets=10, kid_subset_size=16, pr_k=3, diversity_pairs=16,
    memorization_quantile=0.01))


@pytest.fixture(scope="module")
def validation():
  train, reference, heldout = _toy(96, 0), _toy(48, 1), _toy(48, 2)
  return mv.validate(PoolFeatures(), train, reference, heldout, CFG)


def test_metrics_move_the_right_way_on_a_toy(validation):
  assert set(validation) == set(mv.DEGRADATIONS)
  # A shift of the intensities moves every realism metric at every step.
  assert all(validation["intensity_shift"]["monotone"].values())
  for name in ("blur", "noise"):
    m = validation[name]["metrics"]
    assert m["fid"][-1] > 3 * m["fid"][0] and m["kid"][-1] > 0.03
    assert m["precision"][-1] < 0.5 and validation[name]["monotone"]["kid"]
  assert validation["dropped_modes"]["monotone"]["fid"]
  collapse = validation["collapse"]["metrics"]["mode_collapse"]
  assert collapse[-1] > collapse[0] + 0.3
  memorized = validation["training_copies"]["metrics"]["memorized_fraction"]
  assert memorized[-1] > 0.9 and memorized[-1] > memorized[0] + 0.5
  assert validation["training_copies"]["monotone"]["memorized_fraction"]
  listed = mv.failures(validation)
  assert all(f"{m} under {n}" in listed for n, r in validation.items()
             for m, ok in r["monotone"].items() if not ok)


def test_degradations_and_the_checks():
  images, train = _toy(30, 3), _toy(12, 4)
  rng = np.random.default_rng(0)
  assert mv.degrade("blur", 0.0, images, train, rng) is images
  dropped = mv.degrade("dropped_modes", 1.0, images, train, rng)
  assert len(dropped["image"]) == 20 and not dropped["label"].any()
  copies = mv.degrade("training_copies", 1.0, images, train, rng)
  train_rows = {r.tobytes() for r in train["image"]}
  assert all(r.tobytes() in train_rows for r in copies["image"])
  collapsed = mv.degrade("collapse", 1.0, images, train, rng)
  assert len({r.tobytes() for r in collapsed["image"]}) == 2  # one per class
  with pytest.raises(ValueError, match="unknown degradation"):
    mv.degrade("jpeg", 1.0, images, train, rng)
  # The reference is cut to the held-out set's class shares.
  matched = mv.matched(images, {"label": np.array([0, 0, 0, 1])}, rng)
  assert np.mean(matched["label"]) == pytest.approx(0.25, abs=0.02)
  # Monotone within the chance variation, and a real move overall.
  assert mv.monotone([1.0, 2.0, 1.95, 3.0], 1, tolerance=0.1)
  assert not mv.monotone([1.0, 2.0, 1.5, 3.0], 1, tolerance=0.1)
  assert not mv.monotone([1.0, 1.05, 1.05, 1.05], 1, tolerance=0.1)
  assert mv.monotone([0.9, 0.5, 0.2, 0.1], -1)
