"""Gradient clipping and the optimizer built from a config."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from medgen_jax.train import optim


def _tree(scale):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return {"conv": {"kernel": scale * jax.random.normal(k1, (3, 3, 4, 8)),
                   "bias": scale * jax.random.normal(k2, (8,))},
          "dense": scale * jax.random.normal(k3, (5, 3)).astype(jnp.bfloat16)}


def test_global_norm_sums_in_float32():
  tree = _tree(3.0)
  exact = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                      for x in jax.tree.leaves(tree)))
  np.testing.assert_allclose(optim.global_norm(tree), exact, rtol=1e-6)
  assert optim.global_norm(tree).dtype == jnp.float32
  assert float(optim.global_norm({})) == 0.0
  f32 = jax.tree.map(lambda x: x.astype(jnp.float32), tree)
  np.testing.assert_allclose(optim.global_norm(f32), optax.tree.norm(f32),
                             rtol=1e-6)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0])
def test_clip_by_global_norm_matches_optax(scale):
  grads = jax.tree.map(lambda x: x.astype(jnp.float32), _tree(scale))
  ours, _ = optim.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  ref, _ = optax.clip_by_global_norm(1.0).update(
      grads, optax.clip_by_global_norm(1.0).init(grads))
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  if float(optax.tree.norm(grads)) > 1.0:
    np.testing.assert_allclose(optim.global_norm(ours), 1.0, rtol=1e-5)
  else:                                 # untouched, bit for bit
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(grads)):
      np.testing.assert_array_equal(a, b)
  # Leaves keep their dtype.
  mixed, _ = optim.clip_by_global_norm(1.0).update(_tree(scale),
                                                   optax.EmptyState())
  assert mixed["dense"].dtype == jnp.bfloat16


def test_zero_and_nan_gradients():
  zeros = jax.tree.map(jnp.zeros_like, _tree(1.0))
  out, _ = optim.clip_by_global_norm(1.0).update(zeros, optax.EmptyState())
  assert all(not np.any(np.asarray(x, np.float32)) for x in jax.tree.leaves(out))
  bad = {"w": jnp.array([1.0, jnp.nan])}
  out, _ = optim.clip_by_global_norm(1.0).update(bad, optax.EmptyState())
  assert np.isnan(np.asarray(out["w"])).all()   # a NaN step stays visible


def test_adamw_with_clipping_matches_optax_chain():
  cfg = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-2, schedule="constant", warmup_steps=0,
      weight_decay=1e-4, b1=0.9, b2=0.99, grad_clip=0.5))
  ours = optim.make_optimizer(cfg, num_steps=10)
  ref = optax.chain(optax.clip_by_global_norm(0.5),
                    optax.adamw(1e-2, b1=0.9, b2=0.99, weight_decay=1e-4))
  params = jax.tree.map(lambda x: x.astype(jnp.float32), _tree(1.0))
  s1, s2 = ours.init(params), ref.init(params)
  p1 = p2 = params
  for i in range(3):
    g = jax.tree.map(lambda x: x.astype(jnp.float32), _tree(2.0 + i))
    u1, s1 = ours.update(g, s1, p1)
    u2, s2 = ref.update(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
