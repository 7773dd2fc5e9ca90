"""medgen_jax: deep generative data augmentation for medical imaging, in JAX."""

__version__ = "0.1.0"
