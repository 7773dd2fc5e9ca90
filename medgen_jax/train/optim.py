"""Optimizers and learning-rate schedules from a config section."""

from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections
import optax


def make_schedule(cfg: ml_collections.ConfigDict,
                  num_steps: int) -> optax.Schedule:
  """Linear warm-up into ``constant``, ``cosine`` or ``linear`` decay."""
  warmup = int(cfg.get("warmup_steps", 0))
  decay_steps = max(num_steps - warmup, 1)
  if cfg.schedule == "constant":
    main = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(cfg.lr, decay_steps,
                                       alpha=cfg.get("final_lr_frac", 0.0))
  elif cfg.schedule == "linear":
    main = optax.linear_schedule(cfg.lr, cfg.lr * cfg.get("final_lr_frac", 0.0),
                                 decay_steps)
  else:
    raise ValueError(f"optim.schedule must be constant|cosine|linear, "
                     f"got {cfg.schedule!r}")
  if warmup <= 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def make_optimizer(cfg: ml_collections.ConfigDict,
                   num_steps: int) -> optax.GradientTransformation:
  """Builds ``cfg.name`` (adam|adamw|sgd) with optional global-norm clipping.

  Args:
    cfg: the ``optim`` config section: name, lr, schedule, warmup_steps,
      weight_decay, b1, b2, grad_clip (0 disables clipping).
    num_steps: total training steps, for the decay schedule.
  """
  lr = make_schedule(cfg, num_steps)
  if cfg.name == "adamw":
    opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2,
                      weight_decay=cfg.weight_decay)
  elif cfg.name == "adam":
    opt = optax.adam(lr, b1=cfg.b1, b2=cfg.b2)
  elif cfg.name == "sgd":
    opt = optax.sgd(lr, momentum=cfg.b1)
  else:
    raise ValueError(f"optim.name must be adam|adamw|sgd, got {cfg.name!r}")
  if cfg.grad_clip and cfg.grad_clip > 0:
    opt = optax.chain(clip_by_global_norm(cfg.grad_clip), opt)
  return opt


def global_norm(tree: Any) -> jax.Array:
  """``sqrt(sum of squares)`` over every leaf of ``tree``, float32.

  Each leaf's sum of squares is a dot product of the flattened leaf with
  itself (full precision): XLA:CPU hands a dot to its matrix library as it
  is, where ``sum(x ** 2)`` first writes ``x ** 2`` out through a kernel of
  its own for every leaf shape.
  """
  sq = [jnp.dot(x.reshape(-1), x.reshape(-1), precision="highest",
                preferred_element_type=jnp.float32)
        for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(sq)) if sq else jnp.zeros((), jnp.float32)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """Scales the updates by ``min(1, max_norm / global_norm)``.

  The same transformation as ``optax.clip_by_global_norm`` (equal up to
  float rounding), applied as one scalar multiplication that XLA fuses into
  the optimizer's own update kernels, instead of a division by the norm
  that it writes out per leaf.
  """

  def update(updates, state, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / global_norm(updates))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      update)


def adversarial_optimizers(cfg: ml_collections.ConfigDict, num_steps: int,
                           disc_lr_mult: float
                           ) -> Dict[str, optax.GradientTransformation]:
  """``{"gen", "disc"}``: the ``optim`` section for the generator, and for
  the discriminator with its learning rate times ``disc_lr_mult`` (the
  two time-scale update rule, Heusel et al. 2017)."""
  d_cfg = ml_collections.ConfigDict(cfg.to_dict())
  d_cfg.lr = cfg.lr * disc_lr_mult
  return {"gen": make_optimizer(cfg, num_steps),
          "disc": make_optimizer(d_cfg, num_steps)}
