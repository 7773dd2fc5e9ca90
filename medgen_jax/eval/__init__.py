"""Evaluation: realism, diversity, memorization and downstream-task metrics.

Metric modules (pure functions over numpy/JAX arrays, no state):

* :mod:`~medgen_jax.eval.features`: FID (:func:`fid_from_features`,
  :func:`frechet_distance`), KID (:func:`kid_from_features`), improved
  precision/recall (:func:`precision_recall`) and density/coverage
  (:func:`density_coverage`) on feature vectors ``[N, D]``.
* :mod:`~medgen_jax.eval.distances`: memory-bounded, jitted k-NN queries
  used by the k-NN metrics and the memorization audit.
* :mod:`~medgen_jax.eval.image`: SSIM, MS-SSIM, PSNR, MAE (2D and 3D,
  data-range aware) and MS-SSIM diversity of a sample set.
* :mod:`~medgen_jax.eval.segmentation`: Dice per class, HD95, Hausdorff and
  ASSD with explicit empty-mask conventions.
* :mod:`~medgen_jax.eval.classification`: accuracy, balanced accuracy and
  ROC AUC (binary, one-vs-rest macro).
* :mod:`~medgen_jax.eval.memorization`: nearest-training-sample audit that
  flags likely copies against held-out real data.
* :mod:`~medgen_jax.eval.inception`: the FID Inception-V3 in Flax, loading
  user-supplied weights (converted with
  ``experiments/tools/convert_inception_weights.py``).

Each function's docstring gives the definition, the reference, the direction
(higher or lower is better) and the conventions for edge cases. Feature-space
numbers are only comparable when extractor and preprocessing match: store
them beside every value.
"""
