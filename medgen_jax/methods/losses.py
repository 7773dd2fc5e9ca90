"""Pure loss terms shared by the methods (a helper module, not a method).

Likelihoods and KL terms are elementwise (same shape as their inputs), so
each method chooses how to reduce them (sum over pixels for an ELBO in
nats, mean for a weighted reconstruction loss). Adversarial losses take
discriminator logits of any shape and return scalars; every discriminator
loss is the average of its real and fake terms (as in taming-transformers)
and every generator loss is its one fake term. Everything computes in
float32 and is jit-able.
"""

import math

import jax
import jax.numpy as jnp
import optax

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _f32(*xs):
  return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def gaussian_nll(x: jax.Array, mean: jax.Array,
                 log_scale: jax.Array) -> jax.Array:
  """``-log N(x; mean, exp(log_scale)^2)`` elementwise, in nats.

  ``0.5 ((x - mean) / s)^2 + log s + 0.5 log(2 pi)``; broadcasting shape.
  """
  x, mean, log_scale = _f32(x, mean, log_scale)
  r = (x - mean) * jnp.exp(-log_scale)
  return 0.5 * jnp.square(r) + log_scale + _HALF_LOG_2PI


def laplace_nll(x: jax.Array, loc: jax.Array,
                log_scale: jax.Array) -> jax.Array:
  """``-log Laplace(x; loc, b = exp(log_scale))`` elementwise, in nats.

  ``|x - loc| / b + log b + log 2``; broadcasting shape.
  """
  x, loc, log_scale = _f32(x, loc, log_scale)
  return jnp.abs(x - loc) * jnp.exp(-log_scale) + log_scale + math.log(2.0)


def kl_diag_gaussian(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """``KL(N(mean, exp(logvar)) || N(0, 1))`` elementwise, in nats.

  ``0.5 (exp(logvar) + mean^2 - 1 - logvar)``; same shape as ``mean``.
  """
  mean, logvar = _f32(mean, logvar)
  return 0.5 * (jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar)


def free_bits(kl: jax.Array, free_nats: float) -> jax.Array:
  """KL with a floor of ``free_nats`` per latent dimension (Kingma et al.
  2016, "free bits").

  Each dimension's KL is averaged over the batch first, then clamped from
  below: a dimension under the floor gets no gradient, so the optimiser
  stops squeezing dimensions that already carry little information
  (posterior collapse) while the floor keeps the objective a bound.

  Args:
    kl: ``[B, *dims]`` elementwise KL (e.g. :func:`kl_diag_gaussian`).
    free_nats: floor per dimension, in nats; ``0`` gives the plain
      batch mean of the per-example KL sums.

  Returns:
    float32 scalar: ``sum_dims max(mean_batch kl, free_nats)``.
  """
  per_dim = jnp.mean(jnp.asarray(kl, jnp.float32), axis=0)
  return jnp.sum(jnp.maximum(per_dim, free_nats))


def kl_weight(step: jax.Array, beta: float, warmup_steps: int) -> jax.Array:
  """KL weight rising linearly from 0 at step 0 to ``beta`` at
  ``warmup_steps`` (Bowman et al. 2016), then constant.

  Args:
    step: int scalar, may be traced.
    beta: final weight.
    warmup_steps: static; ``0`` means ``beta`` from the start.

  Returns:
    float32 scalar.
  """
  if warmup_steps <= 0:
    return jnp.asarray(beta, jnp.float32)
  frac = jnp.asarray(step, jnp.float32) / warmup_steps
  return beta * jnp.clip(frac, 0.0, 1.0)


def commitment_loss(z_e: jax.Array, z_q: jax.Array,
                    commitment: float = 0.25) -> jax.Array:
  """VQ-VAE commitment term ``commitment * mean((z_e - sg(z_q))^2)``.

  Pulls encoder outputs towards their codes (van den Oord et al. 2017).
  ``z_q`` may be the straight-through output of
  :func:`medgen_jax.nn.autoencoder.quantize` (its value is the code; the
  stop-gradient removes its path back to ``z_e``). With EMA codebooks this
  is the whole VQ loss: the codebook is updated by
  :func:`~medgen_jax.nn.autoencoder.ema_update`, not by a codebook term.

  Args:
    z_e: ``[..., D]`` encoder outputs.
    z_q: ``[..., D]`` their codes.
    commitment: weight (the paper's beta; 0.25).

  Returns:
    float32 scalar.
  """
  z_e, z_q = _f32(z_e, z_q)
  return commitment * jnp.mean(jnp.square(z_e - jax.lax.stop_gradient(z_q)))


def hinge_d(real: jax.Array, fake: jax.Array) -> jax.Array:
  """Hinge discriminator loss ``0.5 (E relu(1 - real) + E relu(1 + fake))``
  on logits; float32 scalar."""
  real, fake = _f32(real, fake)
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) +
                jnp.mean(jax.nn.relu(1.0 + fake)))


def hinge_g(fake: jax.Array) -> jax.Array:
  """Hinge generator loss ``-E fake`` on logits; float32 scalar."""
  return -jnp.mean(jnp.asarray(fake, jnp.float32))


def nonsaturating_d(real: jax.Array, fake: jax.Array) -> jax.Array:
  """Logistic discriminator loss ``0.5 (E softplus(-real) + E softplus(
  fake))`` (binary cross-entropy on logits); float32 scalar."""
  real, fake = _f32(real, fake)
  return 0.5 * (jnp.mean(jax.nn.softplus(-real)) +
                jnp.mean(jax.nn.softplus(fake)))


def nonsaturating_g(fake: jax.Array) -> jax.Array:
  """Non-saturating generator loss ``E softplus(-fake)`` = ``-E log
  sigmoid(fake)`` (Goodfellow et al. 2014); float32 scalar."""
  return jnp.mean(jax.nn.softplus(-jnp.asarray(fake, jnp.float32)))


def least_squares_d(real: jax.Array, fake: jax.Array) -> jax.Array:
  """LSGAN discriminator loss ``0.5 (E (real - 1)^2 + E fake^2)`` (Mao et
  al. 2017, targets 1/0); float32 scalar."""
  real, fake = _f32(real, fake)
  return 0.5 * (jnp.mean(jnp.square(real - 1.0)) +
                jnp.mean(jnp.square(fake)))


def least_squares_g(fake: jax.Array) -> jax.Array:
  """LSGAN generator loss ``E (fake - 1)^2``; float32 scalar."""
  return jnp.mean(jnp.square(jnp.asarray(fake, jnp.float32) - 1.0))


def adaptive_weight(nll_grad_norm: jax.Array, g_grad_norm: jax.Array,
                    max_weight: float = 1e4) -> jax.Array:
  """VQGAN's adaptive adversarial weight (Esser et al. 2021, eq. 7).

  ``clip(|grad nll| / (|grad g| + 1e-4), 0, max_weight)``, with both norms
  the gradients' norms at the decoder's last layer, so the adversarial
  term's gradient there is as large as the reconstruction term's. Returned
  with a stop-gradient: it is a weight, not a loss term.

  Args:
    nll_grad_norm: scalar norm of the reconstruction loss's gradient.
    g_grad_norm: scalar norm of the generator loss's gradient.
    max_weight: upper clip (taming-transformers: 1e4).

  Returns:
    float32 scalar.
  """
  nll_grad_norm, g_grad_norm = _f32(nll_grad_norm, g_grad_norm)
  w = jnp.clip(nll_grad_norm / (g_grad_norm + 1e-4), 0.0, max_weight)
  return jax.lax.stop_gradient(w)



def reconstruction(x: jax.Array, raw: jax.Array, num_contrasts: int,
                   kind: str = "l1") -> dict:
  """Per-example reconstruction terms ``[B]`` of an autoencoder whose
  decoder emits contrast values then mask logits.

  Args:
    x: ``[B, *S, C + M]`` model inputs: contrasts, then masks in {-1, 1}.
    raw: ``[B, *S, C + M]`` decoder outputs: contrast values, mask logits.
    num_contrasts: ``C``.
    kind: ``l1`` or ``mse`` for the contrasts (means over their elements).

  Returns:
    ``{"image_rec": [B]}`` plus ``{"mask_bce": [B]}`` (mean Bernoulli
    cross-entropy of the mask channels) when there are masks.
  """
  x, raw = _f32(x, raw)
  c = num_contrasts
  axes = tuple(range(1, x.ndim))
  diff = raw[..., :c] - x[..., :c]
  err = jnp.abs(diff) if kind == "l1" else jnp.square(diff)
  out = {"image_rec": jnp.mean(err, axis=axes)}
  if x.shape[-1] > c:
    target = (x[..., c:] > 0).astype(jnp.float32)
    out["mask_bce"] = jnp.mean(
        optax.sigmoid_binary_cross_entropy(raw[..., c:], target), axis=axes)
  return out


def wasserstein_d(real: jax.Array, fake: jax.Array) -> jax.Array:
  """WGAN critic loss ``mean(fake) - mean(real)`` (Arjovsky et al. 2017);
  pair it with :func:`gradient_penalty`."""
  real, fake = _f32(real, fake)
  return jnp.mean(fake) - jnp.mean(real)


def wasserstein_g(fake: jax.Array) -> jax.Array:
  """WGAN generator loss ``-mean(fake)``."""
  return -jnp.mean(jnp.asarray(fake, jnp.float32))


def gradient_penalty(critic, real: jax.Array, fake: jax.Array,
                     rng: jax.Array) -> jax.Array:
  """WGAN-GP's ``mean((|grad critic(x_hat)| - 1)^2)`` at random points
  ``x_hat`` between real and fake examples (Gulrajani et al. 2017).

  Args:
    critic: ``x [B, ...] -> [B]`` scores.
    real, fake: ``[B, ...]``.
    rng: key of the interpolation weights.
  """
  real, fake = _f32(real, fake)
  eps = jax.random.uniform(rng, (real.shape[0],) + (1,) * (real.ndim - 1))
  x_hat = eps * real + (1.0 - eps) * jax.lax.stop_gradient(fake)
  g = jax.grad(lambda x: jnp.sum(critic(x)))(x_hat)
  norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))) +
                  1e-12)
  return jnp.mean(jnp.square(norm - 1.0))


def r1_penalty(critic, real: jax.Array) -> jax.Array:
  """``mean |grad critic(real)|^2`` (Mescheder et al. 2018); the loss adds
  ``gamma / 2`` times it."""
  real = jnp.asarray(real, jnp.float32)
  g = jax.grad(lambda x: jnp.sum(critic(x)))(real)
  return jnp.mean(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))))


def mode_seeking(images_a: jax.Array, images_b: jax.Array, z_a: jax.Array,
                 z_b: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Mode-seeking term of a conditional generator (Mao et al. 2019).

  Two samples of one condition from two latents should differ in
  proportion to the latents: the ratio ``mean|a - b| / mean|z_a - z_b|``
  is small when the generator ignores ``z`` (one image per class), and the
  generator minimises ``1 / (ratio + eps)``.

  Args:
    images_a, images_b: ``[B, ...]`` samples drawn with the same conditions.
    z_a, z_b: ``[B, D]`` their latents.
    eps: keeps the term finite when the samples coincide.

  Returns:
    A scalar.
  """
  images_a, images_b, z_a, z_b = _f32(images_a, images_b, z_a, z_b)
  ratio = (jnp.mean(jnp.abs(images_a - images_b)) /
           jnp.mean(jnp.abs(z_a - z_b)))
  return 1.0 / (ratio + eps)


ADVERSARIAL_LOSSES = ("nonsaturating", "hinge", "least_squares",
                      "wasserstein")


def adversarial(kind: str):
  """``(d_loss(real, fake), g_loss(fake))`` on logits for ``kind`` in
  :data:`ADVERSARIAL_LOSSES`."""
  table = {"nonsaturating": (nonsaturating_d, nonsaturating_g),
           "hinge": (hinge_d, hinge_g),
           "least_squares": (least_squares_d, least_squares_g),
           "wasserstein": (wasserstein_d, wasserstein_g)}
  if kind not in table:
    raise ValueError(f"adversarial loss {kind!r} must be one of "
                     f"{ADVERSARIAL_LOSSES}")
  return table[kind]
