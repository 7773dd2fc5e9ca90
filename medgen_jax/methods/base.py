"""The contract every generative method follows, and the method registry.

A method is a small object holding static things (networks, optimizers,
hyper-parameters) and pure functions of a :class:`TrainState`. The generic
trainer (:mod:`medgen_jax.train.trainer`) jits and shards them; evaluators,
``--mode=sample``, the trainer's grids and the study's synthetic sets reach
them through :mod:`medgen_jax.sampling` and ask for *capabilities* by name
(:func:`has`) instead of knowing the method.

Required (:class:`Method`): ``init``, ``train_step`` (or its halves
``grad_step``/``apply_step``), ``loss`` (validation).

Optional capabilities (:data:`CAPABILITIES`), each a pure, jit-able method:

- ``sample(state, rng, num, cond=None) -> {"image", ["label"]}``: ``num``
  new examples; ``cond`` follows the conditioning spec below.
- ``reconstruct(state, batch, rng) -> {"image"}``: the batch passed through
  the model (autoencoders).
- ``encode(state, batch, rng) -> latents`` and ``decode(state, latents,
  cond=None) -> {"image"}``: stage 1 of a latent model.
- ``translate(state, batch, rng) -> {"image"}``: ``batch["source"]`` mapped
  to the target domain.
- ``inpaint(state, batch, rng) -> {"image"}``: ``batch["image"]`` with the
  region of ``batch["mask"]`` regenerated to match it (e.g. a lesion
  inserted into a healthy slice with its mask).
- ``frozen_inputs() -> train.frozen.FrozenInputs``: parameters read from
  another run that the trainer places in ``state.frozen``.

Conditioning spec: ``cond`` is ``None`` or a dict of arrays with a leading
``num`` axis, with any of ``label [num] int32``, ``mask [num, *S, M]`` (in
{-1, 1}, like the mask channels of the data) and ``source [num, *S, C]``.
A method ignores none silently: it raises for a key it cannot use.

Batches are dicts of arrays. Images are channels-last: ``[B, H, W, C]`` in
2D, ``[B, D, H, W, C]`` in 3D; a generator trained with
``data.mask_channels`` sees the masks as the last channels of ``image``.

Each method module provides ``make(config, example_batch) -> Method`` and
``config_errors(config) -> [str]``: the problems of its own sections
(``method``, ``model``, ``sample``), each naming the key; the central
validator (:mod:`medgen_jax.config_check`) checks only what all methods
share.
"""

import importlib
import types
from typing import Any, Callable, Dict, List, Mapping, Protocol, Tuple

import jax
import ml_collections

from medgen_jax import errors
from medgen_jax.train.state import TrainState

Batch = Dict[str, jax.Array]
Metrics = Dict[str, jax.Array]

CAPABILITIES = ("sample", "reconstruct", "encode", "decode", "translate",
                "inpaint", "frozen_inputs")
COND_KEYS = ("label", "mask", "source")

# Method name (``config.method.name``) -> module. Adding a method is its own
# file plus one line here; helper modules of this package (``losses``) are
# not methods.
REGISTRY: Mapping[str, str] = types.MappingProxyType({
    "ddpm": "medgen_jax.methods.ddpm",
    "vae": "medgen_jax.methods.vae",
    "vqvae": "medgen_jax.methods.vqvae",
    "autoencoder_kl": "medgen_jax.methods.autoencoder_kl",
    "gan": "medgen_jax.methods.gan",
    "pix2pix": "medgen_jax.methods.pix2pix",
    "cyclegan": "medgen_jax.methods.cyclegan",
    "spade_gan": "medgen_jax.methods.spade_gan",
    "vaegan": "medgen_jax.methods.vaegan",
    "ldm": "medgen_jax.methods.ldm",
})


# The family of each method, as the study's report groups generators.
FAMILIES: Mapping[str, str] = types.MappingProxyType({
    "ddpm": "diffusion", "ldm": "diffusion",
    "vae": "VAE", "vqvae": "VAE", "autoencoder_kl": "VAE",
    "gan": "GAN", "pix2pix": "GAN", "cyclegan": "GAN", "spade_gan": "GAN",
    "vaegan": "VAE-GAN",
})


class Method(Protocol):
  """What every generative method provides."""

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """Initial state; ``batch`` only provides shapes."""

  def train_step(self, state: TrainState, batch: Batch,
                 rng: jax.Array) -> Tuple[TrainState, Metrics]:
    """One trainer step (any number of optimizer updates inside; the
    state's ``step`` grows by one); pure and jit-able. Metrics are scalars
    (``loss`` first)."""

  def loss(self, state: TrainState, batch: Batch,
           rng: jax.Array) -> jax.Array:
    """The training objective on ``batch`` with ``state.params``, dropout
    off: the validation loss (the ``loss`` evaluator passes EMA or raw
    parameters as ``state.params``)."""

  # Optional: a method whose step is "gradients, then an update" can also
  # expose the halves, ``grad_step(state, batch, rng) -> (grads, metrics)``
  # and ``apply_step(state, grads) -> (state, metrics)``, with
  # ``train_step`` their composition; on CPUs the trainer then runs them as
  # two programs and compiles the update beside the gradients (see
  # ``trainer.TrainStep``).


class CapabilityError(errors.UserError, ValueError):
  """A command or evaluator asked a method for a capability it lacks."""


def has(method: Any, capability: str) -> bool:
  """Whether ``method`` provides ``capability`` (one of
  :data:`CAPABILITIES`)."""
  if capability not in CAPABILITIES:
    raise ValueError(f"unknown capability {capability!r}; known: "
                     f"{CAPABILITIES}")
  return callable(getattr(method, capability, None))


def require(method: Any, capability: str, who: str) -> Callable:
  """``method.<capability>``, or a :class:`CapabilityError` saying ``who``
  needs it."""
  if not has(method, capability):
    provided = [c for c in CAPABILITIES if has(method, c)]
    raise CapabilityError(f"{who} needs a method that can {capability}; "
                          f"{type(method).__name__} provides {provided}")
  return getattr(method, capability)


def available() -> Tuple[str, ...]:
  """Names of the registered methods."""
  return tuple(sorted(REGISTRY))


def module(name: str) -> types.ModuleType:
  """The module of method ``name``."""
  if name not in REGISTRY:
    raise ValueError(f"unknown method {name!r}; available: {available()}")
  return importlib.import_module(REGISTRY[name])


def config_errors(config: ml_collections.ConfigDict) -> List[str]:
  """The method's own checks of ``config`` (see the module docstring)."""
  name = config.method.get("name")
  if name not in REGISTRY:
    return [f"method.name={name!r} must be one of {available()}"]
  return list(module(name).config_errors(config))


def build(config: ml_collections.ConfigDict, example_batch: Batch) -> Method:
  """``<method module>.make(config, example_batch)``.

  Modules are imported when first asked for, so a run imports only its own
  method.
  """
  return module(config.method.name).make(config, example_batch)
