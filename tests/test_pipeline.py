"""Deterministic, resumable batching and per-contrast normalisation."""

import os
import threading

import ml_collections
import numpy as np
import pytest

from medgen_jax.data import pipeline


def _arrays(n=10):
  return {"image": np.arange(n, dtype=np.float32)[:, None, None, None] *
                   np.ones((1, 2, 2, 1), np.float32),
          "label": (np.arange(n) % 2).astype(np.int32)}


def test_each_epoch_is_a_permutation_and_epochs_differ():
  b = pipeline.Batcher(_arrays(10), batch_size=5, seed=3)
  e0 = np.concatenate([b.indices(0), b.indices(1)])
  e1 = np.concatenate([b.indices(2), b.indices(3)])
  assert sorted(e0) == list(range(10)) and sorted(e1) == list(range(10))
  assert not np.array_equal(e0, e1)


def test_batches_straddling_epochs_and_resume_are_pure_functions_of_step():
  b = pipeline.Batcher(_arrays(7), batch_size=4, seed=0)
  stream = np.concatenate([b.indices(s) for s in range(7)])  # 4 epochs
  for k in range(4):
    assert sorted(stream[7 * k:7 * (k + 1)]) == list(range(7))
  fresh = pipeline.Batcher(_arrays(7), batch_size=4, seed=0)
  np.testing.assert_array_equal(fresh.indices(5), b.indices(5))
  np.testing.assert_array_equal(fresh.batch(5)["image"][:, 0, 0, 0],
                                b.indices(5).astype(np.float32))


def test_process_slices_tile_the_global_batch():
  whole = pipeline.Batcher(_arrays(12), batch_size=8, seed=1)
  parts = [pipeline.Batcher(_arrays(12), 8, 1, process_index=i,
                            process_count=4).indices(3) for i in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), whole.indices(3))


def test_batch_size_must_split_over_processes():
  with pytest.raises(ValueError, match="not divisible by 3 processes"):
    pipeline.Batcher(_arrays(), batch_size=8, seed=0, process_count=3)


def _cfg(kind):
  return ml_collections.ConfigDict(dict(
      contrasts=("t1w", "t2w"), normalization=kind,
      clip_percentiles=(0.0, 100.0)))


def test_minmax_maps_training_range_to_unit_interval():
  rng = np.random.default_rng(0)
  raw = {"t1w": rng.uniform(2, 6, (4, 8, 8)).astype(np.float32),
         "t2w": rng.uniform(0, 100, (4, 8, 8)).astype(np.float32),
         "label": np.array([0, 1, 0, 1])}
  stats = pipeline.normalization_stats(raw, _cfg("minmax"))
  out = pipeline.to_model_arrays(raw, _cfg("minmax"), stats)
  assert out["image"].shape == (4, 8, 8, 2)
  np.testing.assert_allclose(out["image"].min(axis=(0, 1, 2)), [-1, -1],
                             atol=1e-5)
  np.testing.assert_allclose(out["image"].max(axis=(0, 1, 2)), [1, 1],
                             atol=1e-5)
  back = pipeline.denormalize(out["image"], ("t1w", "t2w"), stats)
  np.testing.assert_allclose(back[..., 1], raw["t2w"], rtol=1e-4)


def test_zscore_and_unknown_normalisation():
  raw = {"t1w": np.random.default_rng(1).normal(5, 2, (64, 8)),
         "t2w": np.ones((64, 8))}
  stats = pipeline.normalization_stats(raw, _cfg("zscore"))
  out = pipeline.to_model_arrays(raw, _cfg("zscore"), stats)["image"]
  assert abs(out[..., 0].mean()) < 1e-6 and abs(out[..., 0].std() - 1) < 1e-6
  with pytest.raises(ValueError, match="data.normalization must be one of"):
    pipeline.normalization_stats(raw, _cfg("robust"))


def test_labels_outside_num_classes_are_rejected():
  pipeline.check_labels(np.array([0, 1, 1]), 2, "x")
  with pytest.raises(ValueError, match=r"label value 3 outside \[0, data.num_classes=2\) in data set 'x' \(1 examples\)"):
    pipeline.check_labels(np.array([0, 3, 1]), 2, "x")


def test_one_process_at_a_time_builds_into_a_data_dir(tmp_path):
  """A second builder waits for the first (flock on separate opens: two
  threads conflict as two processes would)."""
  cfg = ml_collections.ConfigDict(dict(dataset="brain_phantom",
                                       data_dir=str(tmp_path)))
  events = []
  first_holds = threading.Event()

  def second():
    first_holds.wait()
    with pipeline.build_lock(cfg):
      events.append("second")

  t = threading.Thread(target=second)
  t.start()
  with pipeline.build_lock(cfg):
    first_holds.set()
    t.join(timeout=0.5)
    assert t.is_alive()   # blocked while the first holds the lock
    events.append("first")
  t.join(timeout=10)
  assert events == ["first", "second"]
  assert os.path.exists(tmp_path / ".brain_phantom.build.lock")
