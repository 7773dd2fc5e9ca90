"""Memory-bounded nearest-neighbour queries between feature sets.

The k-NN metrics (precision/recall, density/coverage, the memorization audit)
need distances between every query and every reference vector. With 50k x 2048
Inception features the full ``[N, M]`` matrix would need 10 GB, so the work is
split into ``[block, block]`` tiles: a jitted function takes one block of
queries and scans over all reference blocks, keeping a running top-k (or a
running count), so peak memory is ``O(block**2 + M * D)`` whatever ``N`` is.
Query rows are split over all local devices.

Distances are Euclidean. Squared distances use ``|q|^2 + |r|^2 - 2 q.r`` with
matmuls at ``Precision.HIGHEST`` (GPUs and TPUs otherwise use reduced-precision
matmuls for float32, which would perturb every neighbour radius), after both
sets are centred on the reference mean: distances do not change, and the
cancellation error of the expansion shrinks with the norms. The k neighbours
found are then re-measured from differences, so reported distances (and the
k-NN radii) are exact to float32 rounding: an exact copy is at distance 0.
"""

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BLOCK = 2048
_HIGHEST = jax.lax.Precision.HIGHEST


def check_features(x, name: str, min_rows: int = 1) -> np.ndarray:
  """Returns ``x`` as a float array ``[N, D]`` or raises a clear error."""
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name}: expected features [N, D], got shape {x.shape}")
  if x.shape[0] < min_rows:
    raise ValueError(f"{name}: needs at least {min_rows} rows, got "
                     f"{x.shape[0]}")
  if not np.issubdtype(x.dtype, np.number) or np.issubdtype(
      x.dtype, np.complexfloating):
    raise ValueError(f"{name}: expected real numbers, got dtype {x.dtype}")
  if not np.isfinite(x).all():
    bad = int(np.argwhere(~np.isfinite(x))[0][0])
    raise ValueError(f"{name}: row {bad} contains NaN or Inf")
  return x


def check_same_dim(a: np.ndarray, b: np.ndarray, name_a: str,
                   name_b: str) -> None:
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"{name_a} has {a.shape[1]} dimensions but {name_b} has "
                     f"{b.shape[1]}")


def _sq_dists(q: jax.Array, r: jax.Array) -> jax.Array:
  """``[bq, D] x [br, D] -> [bq, br]`` squared Euclidean distances."""
  qq = jnp.sum(q * q, axis=-1)[:, None]
  rr = jnp.sum(r * r, axis=-1)[None, :]
  qr = jnp.matmul(q, r.T, precision=_HIGHEST)
  return jnp.maximum(qq + rr - 2.0 * qr, 0.0)


@functools.partial(jax.jit, static_argnames=("k", "exclude_self", "refine"))
def _knn_block(q: jax.Array, q_start: jax.Array, ref: jax.Array,
               ref_valid: jax.Array, k: int, exclude_self: bool,
               refine: bool) -> Tuple[jax.Array, jax.Array]:
  """k smallest squared distances of one query block to all references.

  Args:
    q: ``[bq, D]`` queries; row ``i`` is global query ``q_start + i``.
    q_start: scalar int, global index of the first query of the block.
    ref: ``[nb, br, D]`` reference blocks (zero-padded).
    ref_valid: ``[nb, br]`` False on padding rows.
    k: neighbours to keep.
    exclude_self: queries and references are the same set; a query is never
      its own neighbour (exact, by index, so duplicates still count).
    refine: re-measure the k winners from differences (see the module
      docstring); without it the distances come from the same expansion as
      :func:`_count_block`.

  Returns:
    ``([bq, k] squared distances ascending, [bq, k] reference indices)``.
  """
  bq = q.shape[0]
  br = ref.shape[1]
  q_idx = q_start + jnp.arange(bq)

  def step(carry, xs):
    best_d, best_i = carry
    block, valid, j = xs
    d = _sq_dists(q, block)
    r_idx = j * br + jnp.arange(br)
    mask = valid[None, :]
    if exclude_self:
      mask = mask & (q_idx[:, None] != r_idx[None, :])
    d = jnp.where(mask, d, jnp.inf)
    all_d = jnp.concatenate([best_d, d], axis=1)
    all_i = jnp.concatenate(
        [best_i, jnp.broadcast_to(r_idx[None, :], d.shape)], axis=1)
    neg, pos = jax.lax.top_k(-all_d, k)
    return (-neg, jnp.take_along_axis(all_i, pos, axis=1)), None

  init = (jnp.full((bq, k), jnp.inf, q.dtype),
          jnp.full((bq, k), -1, jnp.int32))
  nb = ref.shape[0]
  (best_d, best_i), _ = jax.lax.scan(
      step, init, (ref, ref_valid, jnp.arange(nb, dtype=jnp.int32)))
  if not refine:
    return best_d, best_i
  # The expansion |q|^2 + |r|^2 - 2 q.r loses digits for near neighbours
  # (an exact copy gets ~1e-3 instead of 0); recompute the k winners from
  # differences and re-sort.
  diff = q[:, None, :] - ref.reshape(-1, ref.shape[-1])[best_i]
  exact = jnp.sum(diff * diff, axis=-1)
  order = jnp.argsort(exact, axis=1)
  return (jnp.take_along_axis(exact, order, axis=1),
          jnp.take_along_axis(best_i, order, axis=1))


@jax.jit
def _count_block(q: jax.Array, ref: jax.Array,
                 ref_radius2: jax.Array) -> jax.Array:
  """How many reference balls contain each query.

  Args:
    q: ``[bq, D]`` queries.
    ref: ``[nb, br, D]`` reference blocks (zero-padded).
    ref_radius2: ``[nb, br]`` squared ball radii; -1 on padding rows.

  Returns:
    ``[bq]`` int32 counts of ``|q - r_j|^2 < radius2_j``.
  """

  def step(counts, xs):
    block, radius2 = xs
    inside = _sq_dists(q, block) < radius2[None, :]
    return counts + jnp.sum(inside, axis=1, dtype=jnp.int32), None

  counts, _ = jax.lax.scan(step, jnp.zeros(q.shape[0], jnp.int32),
                           (ref, ref_radius2))
  return counts


def _blocks(x: np.ndarray, block: int, fill: float = 0.0) -> np.ndarray:
  """``[N, ...] -> [ceil(N / block), block, ...]``, padded with ``fill``."""
  pad = -x.shape[0] % block
  widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
  x = np.pad(x, widths, constant_values=fill)
  return x.reshape(-1, block, *x.shape[1:])


def _tile(n: int, block_size: int) -> int:
  """Tile rows for a set of ``n``: a power of two (at least 64) up to
  ``block_size``, so sets of similar sizes reuse one compiled program."""
  return min(block_size, max(64, 1 << max(n - 1, 0).bit_length()))


def _query_block(block: int) -> Tuple[int, jax.sharding.Sharding]:
  """Query block size (a multiple of the device count) and its sharding."""
  devices = jax.local_devices()
  n = len(devices)
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  spec = jax.sharding.PartitionSpec("data")
  return -(-block // n) * n, jax.sharding.NamedSharding(mesh, spec)


def _centred(query: np.ndarray, reference: np.ndarray):
  mean = reference.mean(axis=0, dtype=np.float64)
  return ((query - mean).astype(np.float32),
          (reference - mean).astype(np.float32))


def knn_sq(query, reference, k: int, exclude_self: bool = False,
           block_size: int = DEFAULT_BLOCK,
           refine: bool = True) -> Tuple[np.ndarray, np.ndarray]:
  """The ``k`` nearest references of every query, in memory-bounded blocks.

  Args:
    query: ``[N, D]``.
    reference: ``[M, D]``.
    k: neighbours per query; ``k <= M`` (``k <= M - 1`` with
      ``exclude_self``).
    exclude_self: ``query`` is ``reference``; skip each row's own index.
    block_size: rows per tile; peak memory is about ``block_size**2`` floats
      plus the reference set.
    refine: exact distances for the neighbours found (default); ``False``
      keeps the expansion's values, the arithmetic of
      :func:`count_in_balls`, so that a ball's own k-th neighbour is
      decided consistently (it lies on the boundary, outside an open ball).

  Returns:
    ``(sq_dists [N, k] float32 ascending, indices [N, k] int32)``.
  """
  query = check_features(query, "query")
  reference = check_features(reference, "reference")
  check_same_dim(query, reference, "query", "reference")
  if exclude_self and query.shape[0] != reference.shape[0]:
    raise ValueError("exclude_self needs query and reference to be the same "
                     f"set, got {query.shape[0]} and {reference.shape[0]} rows")
  available = reference.shape[0] - int(exclude_self)
  if not 1 <= k <= available:
    raise ValueError(f"k={k} nearest neighbours requested but only "
                     f"{available} reference rows are available")
  q, r = _centred(query, reference)
  bq, sharding = _query_block(_tile(q.shape[0], block_size))
  br = _tile(r.shape[0], block_size)
  ref = jnp.asarray(_blocks(r, br))
  valid = jnp.asarray(_blocks(np.ones(r.shape[0], bool), br, fill=False))
  d_out, i_out = [], []
  for start, qb in zip(range(0, q.shape[0], bq), _blocks(q, bq)):
    d, i = _knn_block(jax.device_put(qb, sharding), jnp.int32(start), ref,
                      valid, k, exclude_self, refine)
    d_out.append(np.asarray(d))
    i_out.append(np.asarray(i))
  n = q.shape[0]
  return np.concatenate(d_out)[:n], np.concatenate(i_out)[:n]


def knn(query, reference, k: int, exclude_self: bool = False,
        block_size: int = DEFAULT_BLOCK) -> Tuple[np.ndarray, np.ndarray]:
  """Like :func:`knn_sq` but returns Euclidean distances ``[N, k]``."""
  d2, idx = knn_sq(query, reference, k, exclude_self, block_size)
  return np.sqrt(d2), idx


def kth_neighbour_sq_radius(x, k: int,
                            block_size: int = DEFAULT_BLOCK) -> np.ndarray:
  """Squared distance of every row of ``x`` ``[N, D]`` to its k-th nearest
  other row (the k-NN ball radius of Kynkaenniemi et al. 2019); ``[N]``.

  Computed with the arithmetic of :func:`count_in_balls`, so that membership
  tests of the ball's own neighbours are decided consistently.
  """
  d2, _ = knn_sq(x, x, k, exclude_self=True, block_size=block_size,
                 refine=False)
  return d2[:, -1]


def count_in_balls(query, centres, sq_radii,
                   block_size: int = DEFAULT_BLOCK) -> np.ndarray:
  """For each query ``[N, D]``, how many open balls (``centres`` ``[M, D]``
  with squared radii ``[M]``) contain it, ``|q - c|^2 < r^2``; ``[N]`` int.

  Open balls, as in the reference implementation of Naeem et al. (2020):
  with fake == real, each real ball holds its centre and k - 1 neighbours,
  so density is exactly 1 (a closed ball would give (k + 1) / k).
  """
  query = check_features(query, "query")
  centres = check_features(centres, "centres")
  check_same_dim(query, centres, "query", "centres")
  sq_radii = np.asarray(sq_radii, np.float32)
  if sq_radii.shape != (centres.shape[0],):
    raise ValueError(f"sq_radii: expected shape ({centres.shape[0]},), got "
                     f"{sq_radii.shape}")
  q, c = _centred(query, centres)
  bq, sharding = _query_block(_tile(q.shape[0], block_size))
  br = _tile(c.shape[0], block_size)
  ref = jnp.asarray(_blocks(c, br))
  radius2 = jnp.asarray(_blocks(sq_radii, br, fill=-1.0))
  out = [np.asarray(_count_block(jax.device_put(qb, sharding), ref, radius2))
         for qb in _blocks(q, bq)]
  return np.concatenate(out)[:q.shape[0]]
