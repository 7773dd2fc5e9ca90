"""The one path from a trained method to arrays of examples.

The trainer's sample grids, ``--mode=sample``, the evaluators and the
study's synthetic sets all draw through :func:`draw` (new examples) or
:func:`reconstruct` (autoencoders), so they share one batching scheme, one
key-folding rule, one label policy and one way of splitting mask channels:

- batches have a fixed shape (the last one is padded and cut), so the
  method's program compiles once; batch ``i`` uses ``fold_in(rng, i)``;
- labels: a class-conditional method gets the labels it is asked for
  (:func:`labels_for`: ``balanced`` or the ``heldout`` class mix), and the
  output's ``label`` is exactly those; an unconditional method's output has
  no ``label`` (callers that need one derive it from the mask, see
  ``downstream.synthetic``);
- a generator trained with ``data.mask_channels`` emits the masks as its
  last image channels: the output has ``image`` (the contrasts only) and one
  ``uint8`` array per mask key.
"""

import functools
from typing import Any, Callable, Dict, Mapping, Optional

import jax
import ml_collections
import numpy as np

from medgen_jax import runtime
from medgen_jax.data import pipeline
from medgen_jax.methods import base as methods

Arrays = Dict[str, np.ndarray]
PyTree = Any

LABEL_POLICIES = ("balanced", "heldout")


@functools.lru_cache(maxsize=16)
def jitted(method, capability: str) -> Callable:
  """``jax.jit(method.<capability>)``, one per method object and
  capability, shared by every caller (``num`` of ``sample`` is static)."""
  fn = methods.require(method, capability, "sampling")
  if capability == "sample":
    return jax.jit(fn, static_argnums=2)
  return jax.jit(fn)


def labels_for(policy: str, num: int, num_classes: int,
               heldout_labels: Optional[np.ndarray] = None) -> np.ndarray:
  """Class labels ``[num]`` for a conditional generator, sorted by class.

  ``balanced``: equal counts (the first classes get the remainder);
  ``heldout``: the class frequencies of ``heldout_labels`` (largest
  remainder rounding), so FID compares like with like when real classes are
  imbalanced.
  """
  if policy == "balanced":
    p = np.full(num_classes, 1.0 / num_classes)
  elif policy == "heldout":
    counts = np.bincount(np.asarray(heldout_labels), minlength=num_classes)
    p = counts / counts.sum()
  else:
    raise ValueError(f"labels={policy!r} must be one of {LABEL_POLICIES}")
  exact = p * num
  counts = np.floor(exact).astype(np.int64)
  order = np.argsort(-(exact - counts), kind="stable")
  counts[order[:num - counts.sum()]] += 1
  return np.repeat(np.arange(num_classes, dtype=np.int32), counts)


def conditional(data_config: ml_collections.ConfigDict) -> bool:
  """Whether a generator of this ``data`` section is class-conditional."""
  return data_config.get("cond", "") == "label"


def split_outputs(image: np.ndarray, data_config: ml_collections.ConfigDict
                  ) -> Arrays:
  """``image [N, *S, C + M]`` -> ``image [N, *S, C]`` (contrasts, float32)
  and one ``uint8 [N, *S]`` array per key of ``data.mask_channels``."""
  contrasts, masks = pipeline.split_mask_channels(
      image, len(data_config.contrasts))
  out = {"image": contrasts.astype(np.float32)}
  for j, k in enumerate(data_config.get("mask_channels", ())):
    out[k] = masks[..., j]
  return out


def _batches(num: int, batch_size: int, desc: Optional[str]):
  n = -(-num // batch_size)
  it = range(n)
  return runtime.progress(it, n, desc=desc, leave=False) if desc else it


def _slice(arrays: Mapping[str, np.ndarray], i: int, batch_size: int
           ) -> Dict[str, np.ndarray]:
  """Batch ``i`` of ``arrays``, padded to ``batch_size`` by repetition."""
  out = {}
  for k, v in arrays.items():
    part = np.asarray(v[i * batch_size:(i + 1) * batch_size])
    reps = -(-batch_size // len(part))
    out[k] = np.concatenate([part] * reps)[:batch_size]
  return out


def draw(method, state: PyTree, data_config: ml_collections.ConfigDict,
         num: int, rng: jax.Array, batch_size: int,
         cond: Optional[Mapping[str, np.ndarray]] = None,
         desc: Optional[str] = None) -> Arrays:
  """``num`` new examples from ``method.sample``.

  Args:
    method: a method with the ``sample`` capability.
    state: its state (the method samples with its EMA parameters).
    data_config: the generator's ``data`` section (contrasts, mask keys).
    num: examples to draw.
    rng: key; batch ``i`` uses ``fold_in(rng, i)``.
    batch_size: examples per call.
    cond: the conditioning spec (``methods.base``): arrays with ``num``
      rows (``label``, ``mask``, ``source``), or ``None``.
    desc: progress-bar label (``None``: no bar).

  Returns:
    ``image [num, *S, C]`` in [-1, 1], the masks of ``data.mask_channels``
    as ``uint8 [num, *S]``, and ``label [num]`` when ``cond`` has labels.
  """
  fn = jitted(method, "sample")
  cond = {k: np.asarray(v) for k, v in (cond or {}).items()}
  for k, v in cond.items():
    if len(v) != num:
      raise ValueError(f"cond[{k!r}] has {len(v)} rows for {num} samples")
  chunks = []
  for i in _batches(num, batch_size, desc):
    c = _slice(cond, i, batch_size) if cond else None
    out = fn(state, jax.random.fold_in(rng, i), batch_size, c)
    chunks.append(np.asarray(jax.device_get(out["image"])))
  out = split_outputs(np.concatenate(chunks)[:num], data_config)
  if "label" in cond:
    out["label"] = cond["label"].astype(np.int32)
  return out


def needs(method, key: str) -> bool:
  """Whether ``method.sample`` needs ``cond[key]`` (its ``sample_cond``),
  e.g. a mask-to-image generator needs ``mask``."""
  return key in getattr(method, "sample_cond", ())


def masks_for(images: np.ndarray, data_config: ml_collections.ConfigDict,
              num: int, seed: int = 0) -> np.ndarray:
  """``num`` real masks ``[num, *S, M]`` for a mask-conditioned generator:
  the mask channels of model inputs ``images [N, *S, C + M]``, in a fixed
  shuffled order (repeated when ``num > N``)."""
  masks = np.asarray(images)[..., len(data_config.contrasts):]
  if not masks.shape[-1]:
    raise ValueError("a mask-conditioned generator needs data.mask_channels")
  order = np.random.default_rng(seed).permutation(len(masks))
  return masks[order[np.arange(num) % len(masks)]]


def draw_for_classes(method, state: PyTree,
                     data_config: ml_collections.ConfigDict, num: int,
                     rng: jax.Array, batch_size: int, policy: str = "balanced",
                     heldout_labels: Optional[np.ndarray] = None,
                     desc: Optional[str] = None,
                     mask_source: Optional[np.ndarray] = None) -> Arrays:
  """:func:`draw` with the conditioning policy: a class-conditional
  generator (``data.cond == "label"``) draws :func:`labels_for` ``(policy,
  num)``, an unconditional one draws ``num`` examples with no ``label``; a
  mask-conditioned one (:func:`needs` ``mask``) draws for the real masks of
  ``mask_source`` (model inputs, see :func:`masks_for`)."""
  cond = {}
  if conditional(data_config):
    cond["label"] = labels_for(policy, num, int(data_config.num_classes),
                               heldout_labels)
  if needs(method, "mask"):
    if mask_source is None:
      raise methods.CapabilityError(
          f"{type(method).__name__} draws images for given masks; this "
          "caller has no masks to give")
    cond["mask"] = masks_for(mask_source, data_config, num)
  return draw(method, state, data_config, num, rng, batch_size,
              cond or None, desc)


def _map_batches(fn, state: PyTree, batch: Mapping[str, np.ndarray],
                 rng: jax.Array, batch_size: int) -> np.ndarray:
  num = len(batch["image"])
  chunks = [np.asarray(jax.device_get(fn(state, _slice(batch, i, batch_size),
                                         jax.random.fold_in(rng, i))))
            for i in _batches(num, batch_size, None)]
  return np.concatenate(chunks)[:num]


def encode(method, state: PyTree, batch: Mapping[str, np.ndarray],
           rng: jax.Array, batch_size: int) -> np.ndarray:
  """``method.encode`` over ``batch`` (model inputs) in fixed-size calls:
  the latents ``[N, ...]``."""
  return _map_batches(jitted(method, "encode"), state, batch, rng,
                      batch_size)


def reconstruct(method, state: PyTree, data_config: ml_collections.ConfigDict,
                batch: Mapping[str, np.ndarray], rng: jax.Array,
                batch_size: int) -> Arrays:
  """``method.reconstruct`` over ``batch`` (model inputs: mask channels in
  ``image``) in fixed-size calls; returns :func:`split_outputs` of the
  reconstructions."""
  fn = jitted(method, "reconstruct")
  image = _map_batches(lambda s, b, k: fn(s, b, k)["image"], state, batch,
                       rng, batch_size)
  return split_outputs(image, data_config)


def translate(method, state: PyTree, source: np.ndarray, rng: jax.Array,
              batch_size: int) -> np.ndarray:
  """``method.translate`` of ``source [N, *S, C_src]`` in fixed-size calls:
  the translations ``[N, *S, C_tgt]``."""
  fn = jitted(method, "translate")
  return _map_batches(lambda s, b, k: fn(s, b, k)["image"], state,
                      {"image": source, "source": source}, rng, batch_size)
