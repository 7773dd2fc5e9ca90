r"""DDPM on brain-phantom slices (or volumes).

Run::

  python launch.py --config=configs/ddpm.py:res=32,contrast=t2w \
      --workdir=workdirs/ddpm_t2w_32

Args (``key=value`` after the colon):
  res: image side (32, 64, 128, ...).
  contrast: t1w|t2w|pd|flair, or several joined by "+" (multi-channel).
  dims: 2 (axial slices) or 3 (volumes).
  cond: "" (unconditional) or "label" (lesion present / absent, with
    classifier-free guidance).
  steps: training steps.
  objective: "diffusion" (eps/v prediction on a discrete schedule) or
    "rectified_flow" (velocity on the straight path; Euler sampling).
  mask: the lesion mask as an extra channel, generated jointly with the
    image.
  condition: "none", or "mask": images generated FROM given lesion masks
    (implies mask; ``--mode=sample`` and the evaluators draw for real
    masks of the data set).
  arch: "" (size by res) or "ref6m": the 6.1 M-parameter reference U-Net
    (ch 64, (1,2,2), 2 res blocks, GroupNorm 32, one attention block in the
    middle) used to compare speed with PyTorch.
  inception: path of the converted FID Inception-V3 weights (.npz); adds
    an "inception_fid" evaluator for literature-comparable FID/KID.
  runlocal: tiny model and few steps, for tests and laptops.

Evaluate the latest checkpoint (in-domain FID/KID, precision/recall,
density/coverage, diversity, memorization, validation loss)::

  python launch.py --config=configs/ddpm.py:res=32 \
      --workdir=workdirs/ddpm_t2w_32 --mode=eval

Sweep classifier-free guidance x seed (``get_sweep``; docs/sweeps.md)::

  python -m medgen_jax.sweep --config=configs/ddpm.py:res=32,cond=label \
      --workdir=workdirs/sweep_guidance
  python -m medgen_jax.sweep collect workdirs/sweep_guidance
"""

import ml_collections

from configs import common
from medgen_jax import sweep


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, res=32, contrast="t2w", dims=2, cond="",
                       steps=0, arch="", inception="", runlocal=False,
                       objective="diffusion", mask=False, condition="none")
  contrasts = tuple(a.contrast.split("+"))
  for c in contrasts:
    if c not in common.CONTRASTS:
      raise ValueError(f"contrast {c!r} not in {common.CONTRASTS}")
  c = common.base_config()
  c.data = common.data_config(res=a.res, contrasts=contrasts,
                              spatial_dims=a.dims, cond=a.cond)
  if a.mask or a.condition == "mask":
    c.data.mask_channels = ("lesion_mask",)
  c.model = ml_collections.ConfigDict(dict(
      ch=64 if a.res >= 64 else 32,
      ch_mult=(1, 2, 2, 2) if a.res >= 64 else (1, 2, 2),
      # One block per level keeps the 32x32 default trainable on a CPU.
      num_res_blocks=2 if a.res >= 64 else 1,
      attn_resolutions=(16,) if a.res >= 32 else (),
      num_heads=4,
      dropout=0.0,
      num_groups=8,
      # Compute dtype; parameters and optimizer state stay float32.
      dtype="float32",
      # How convolutions are computed: "xla", "explicit" (gradients as
      # canonical forward convolutions, which XLA:CPU runs fast also inside
      # loops; same numbers) or "auto" (explicit on CPU, xla on GPU/TPU).
      conv_lowering="auto",
  ))
  if a.arch == "ref6m":
    c.model.update(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2,
                   attn_resolutions=(), num_groups=32)
  elif a.arch:
    raise ValueError(f"arch must be '' or 'ref6m', got {a.arch!r}")
  c.method = ml_collections.ConfigDict(dict(
      name="ddpm",
      objective=a.objective,    # diffusion | rectified_flow
      # Channels given as input, not generated: none | mask (the lesion
      # masks of data.mask_channels) | source (translation.source).
      condition=a.condition,
      # With condition="mask": the workdir of a trained unconditional-image
      # run of this config (same model), adapted by a ControlNet whose
      # hint is the mask; its weights stay frozen.
      controlnet="",
      # The diffusion's discrete process (unused by rectified_flow):
      schedule="cosine",        # linear | cosine
      timesteps=1000,
      prediction="eps",         # eps | v
      p_uncond=0.1,             # label dropout for classifier-free guidance
  ))
  flow = a.objective == "rectified_flow"
  c.sample = ml_collections.ConfigDict(dict(
      # diffusion: ddpm | ddim | dpmpp_2m; rectified_flow: euler | dpmpp_2m
      sampler="euler" if flow else "ddim",
      steps=50,
      eta=0.0,
      guidance_scale=1.0,       # 0 = unguided conditional model
      guidance_per_class=(),    # one w per class; () = guidance_scale for all
      num=64,
      batch_size=64,
      # Network evaluations --mode=sampling_cost scores each sampler at.
      cost_steps=(5, 10, 25, 50, 250),
  ))
  # Evaluators (medgen_jax.eval.registry): every_steps=0 runs them only with
  # --mode=eval; set it > 0 to also evaluate periodically during training.
  c.evals = ml_collections.ConfigDict(dict(
      generative=common.evaluator("generative", every_steps=0),
      loss=common.evaluator("loss", every_steps=0, num_batches=8),
  ))
  if a.inception:
    c.evals.inception_fid = common.evaluator(
        "inception_fid", every_steps=0, weights=a.inception, num_samples=256)
  if a.condition == "mask":
    # Do the lesions sit under the given masks? (a real-data segmenter's
    # Dice on images drawn for held-out masks)
    c.evals.mask_fidelity = common.evaluator("mask_fidelity", every_steps=0)
  c.optim.lr = 2e-4 if a.res >= 64 else 5e-4
  c.train.num_steps = 20_000 if a.res >= 64 else 1_500
  c.train.sample_every = 500
  c.train.ckpt_every = 250
  if a.runlocal:
    c.data.num_subjects = 10
    c.data.batch_size = 8
    c.model.update(ch=16, ch_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(), num_groups=4)
    c.train.update(num_steps=20, log_every=5, ckpt_every=10, sample_every=20,
                   num_grid_samples=4, ema_warmup=5)
    c.optim.warmup_steps = 5
    c.sample.update(steps=5, num=8, batch_size=8, cost_steps=(2, 5))
    c.evals.generative.update(
        num_samples=16, kid_subsets=5, kid_subset_size=8, pr_k=2,
        diversity_pairs=8,
        encoder=dict(width=8, num_groups=4, steps=4, steps_per_call=2,
                     batch_size=8))
    c.evals.loss.num_batches = 2
    if a.condition == "mask":
      c.evals.mask_fidelity.update(
          num_examples=16, segmenter=dict(ch=8, num_groups=4, steps=4,
                                          steps_per_call=2, batch_size=8))
    if a.inception:
      c.evals.inception_fid.num_samples = 16
  if a.steps:
    c.train.num_steps = a.steps
  return c


def get_sweep(arg: str = "") -> sweep.Sweep:
  """Guidance scale x seed of the label-conditional model (``cond=label``):
  6 runs, each trained and scored by the ``generative`` evaluator (FID/KID,
  precision/recall, ...) at its last step. The scale changes sampling only,
  so runs of one seed train the same network."""
  c = get_config(arg)
  if c.data.cond != "label":
    raise ValueError("the guidance sweep needs the label-conditional model: "
                     f"add cond=label to the config args ({arg!r})")
  return sweep.product([
      sweep.values("sample.guidance_scale", [0.0, 1.0, 3.0]),
      sweep.values("seed", [0, 1]),
      sweep.fixed("evals.generative.every_steps", c.train.num_steps),
  ])
