r"""Latent diffusion on brain-phantom slices (or volumes): a diffusion model
on the latents of a frozen KL autoencoder (or VQ-VAE), decoded to images
and, with ``mask``, to their lesion masks.

Run::

  # trains stage 1 into W/stage1 first, then the latent diffusion model
  python launch.py --config=configs/ldm.py:res=32,mask,cond=label --workdir=W
  # reuse a trained autoencoder run
  python launch.py --config=configs/ldm.py:res=32 \
      --config.method.autoencoder=workdirs/aekl_32 --workdir=W2

Args (``key=value`` after the colon):
  res, contrast, dims, mask, steps, runlocal: as ``configs/vae.py`` (stage
    1 is built with the same ones).
  stage1: "kl" (``configs/autoencoder_kl.py``, default) or "vq"
    (``configs/vqvae.py``), trained when ``method.autoencoder="auto"``.
  cond: "" or "label" (classifier-free guidance, as ``configs/ddpm.py``).
  objective: "diffusion" or "rectified_flow" (as ``configs/ddpm.py``).
  condition: "none", or "mask": latents generated from given lesion masks,
    folded to the latents' grid (space-to-depth) and fed beside them; with
    ``--config.method.controlnet=<workdir of a configs/ldm.py:mask run>``
    a ControlNet adapter on that frozen base model instead (it uses the
    base's stage 1 and latent scale).

The stage-1 run is recorded in ``frozen_inputs.json`` and in every
checkpoint; resuming with another stage 1 is refused.
"""

import ml_collections

from configs import autoencoder_kl
from configs import common
from configs import ddpm
from configs import vqvae


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, stage1="kl", cond="", objective="diffusion",
                       condition="none", **common.AUTOENCODER_ARGS)
  if a.stage1 not in ("kl", "vq"):
    raise ValueError(f"stage1={a.stage1!r} must be 'kl' or 'vq'")
  if a.condition not in ("none", "mask"):
    raise ValueError(f"condition={a.condition!r} must be 'none' or 'mask'")
  # A mask-conditioned model's stage 1 codes images with their masks.
  mask = a.mask or a.condition == "mask"
  stage1_args = ",".join(
      [f"res={a.res}", f"contrast={a.contrast}", f"dims={a.dims}"] +
      (["mask"] if mask else []) + (["runlocal"] if a.runlocal else []))
  stage1 = (autoencoder_kl if a.stage1 == "kl" else vqvae).get_config(
      stage1_args)
  # The diffusion half is a DDPM config on the same data, with the
  # condition.
  c = ddpm.get_config(
      ",".join([f"res={a.res}", f"contrast={a.contrast}", f"dims={a.dims}",
                f"cond={a.cond}", f"objective={a.objective}",
                f"condition={a.condition}"] +
               (["runlocal"] if a.runlocal else [])))
  c.data = ml_collections.ConfigDict(stage1.data.to_dict())
  c.data.cond = a.cond
  c.stage1 = stage1
  c.method.update(name="ldm", autoencoder="auto", scale_factor=0.0)
  big = a.res >= 64
  # Latents are 4x (CPU size) or 8x smaller per side than the images.
  c.model.update(ch=64 if big else 32, ch_mult=(1, 2, 2) if big else (1, 2),
                 num_res_blocks=2 if big else 1,
                 attn_resolutions=(8,) if a.dims == 2 else ())
  # Latents are scaled to unit variance, not bounded by [-1, 1]: no clip,
  # and v-prediction, whose x0 estimate stays finite near pure noise (an
  # eps model's samples blew up to std ~1800 here).
  c.sample.clip_x0 = False
  if a.objective == "diffusion":
    c.method.prediction = "v"
  c.train.num_steps = 20_000 if big else 2_000
  if a.runlocal:
    c.model.update(ch=16, ch_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(), num_groups=4)
    c.train.num_steps = 20
  if a.steps:
    c.train.num_steps = a.steps
  return c
