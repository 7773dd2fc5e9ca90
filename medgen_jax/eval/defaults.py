"""Every evaluator type's fields and their defaults.

Plain data, importable without JAX: configs build complete ``evals``
entries from it (:func:`complete`), so each field shows in a run's
``config.json`` and can be overridden on the command line
(``--config.evals.generative.encoder.steps=600``); the registry
(:mod:`medgen_jax.eval.registry`) validates entries against it.
"""

import copy
from typing import Any, Dict, Mapping

ENCODER_DEFAULTS = dict(
    width=32, stage_sizes=(1, 1, 1), num_groups=8,
    # 0: data.num_classes.
    num_classes=0,
    steps=300, steps_per_call=25, batch_size=64, seed=0,
    conv_lowering="auto",
    optim=dict(name="adamw", lr=2e-3, schedule="cosine", warmup_steps=0,
               final_lr_frac=0.05, weight_decay=1e-4, b1=0.9, b2=0.999,
               grad_clip=1.0))

SAMPLING_DEFAULTS = dict(
    num_samples=256,
    # 0: config.sample.batch_size.
    batch_size=0,
    seed=0,
    # Conditional generators: "balanced" classes or the "heldout" mix.
    labels="balanced")

GENERATIVE_DEFAULTS = dict(
    **SAMPLING_DEFAULTS,
    kid_subsets=50, kid_subset_size=100, pr_k=5, diversity_pairs=200,
    memorization_quantile=0.01, audit=True,
    # "": <workdir>/encoder.
    encoder_dir="",
    encoder=ENCODER_DEFAULTS)


INCEPTION_DEFAULTS = dict(
    **SAMPLING_DEFAULTS,
    # The converted pytorch-fid weights (.npz); required.
    weights="",
    # "": all contrasts (1 or 3 of them); else the one contrast to score.
    contrast="",
    input_range=(-1.0, 1.0),
    feature_batch_size=50,
    kid_subsets=50, kid_subset_size=100)


LOSS_DEFAULTS = dict(
    # "": data.eval_split.
    split="",
    num_batches=8,
    # 0: data.batch_size.
    batch_size=0,
    seed=0,
    # "ema" (what sampling uses) or "raw" (what the optimizer updates).
    params="ema")


# Fields of the evaluators that score a fixed subset of held-out images.
HELDOUT_DEFAULTS = dict(
    # "": data.eval_split.
    split="",
    # 0: the whole split.
    num_examples=256,
    # 0: data.batch_size.
    batch_size=0,
    seed=0)
RECONSTRUCTION_DEFAULTS = HELDOUT_DEFAULTS


TRANSLATION_DEFAULTS = HELDOUT_DEFAULTS


MASK_FIDELITY_DEFAULTS = dict(
    num_examples=64, batch_size=0, seed=0,
    # "": data.eval_split.
    split="",
    # The real-data lesion segmenter that judges where the lesions are.
    segmenter=dict(ch=16, ch_mult=(1, 2), num_groups=8, steps=200,
                   steps_per_call=25, batch_size=32, seed=0,
                   conv_lowering="auto",
                   optim=dict(name="adamw", lr=2e-3, schedule="cosine",
                              warmup_steps=0, final_lr_frac=0.05,
                              weight_decay=1e-4, b1=0.9, b2=0.999,
                              grad_clip=1.0)))

TYPE_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "generative": GENERATIVE_DEFAULTS,
    "inception_fid": INCEPTION_DEFAULTS,
    "loss": LOSS_DEFAULTS,
    "translation": TRANSLATION_DEFAULTS,
    "reconstruction": RECONSTRUCTION_DEFAULTS,
    "mask_fidelity": MASK_FIDELITY_DEFAULTS,
}


def _fill(given: Mapping[str, Any], known: Mapping[str, Any]
          ) -> Dict[str, Any]:
  out = copy.deepcopy(dict(known))
  for k, v in given.items():
    if isinstance(v, Mapping) and isinstance(known.get(k), Mapping):
      v = _fill(v, known[k])
    out[k] = v
  return out


def complete(entry: Mapping[str, Any]) -> Dict[str, Any]:
  """``entry`` (``type``, ``every_steps`` and some fields) with every other
  field of its type at its default, nested sections included. Unknown
  types and fields are kept as given, for the registry to name."""
  known = TYPE_DEFAULTS.get(entry.get("type", ""))
  if known is None:
    return dict(entry)
  return _fill(entry, dict(known, every_steps=0))
