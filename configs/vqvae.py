r"""VQ-VAE with an EMA codebook on brain-phantom slices (or volumes).

Run::

  python launch.py --config=configs/vqvae.py:res=32 --workdir=workdirs/vqvae

Logs codebook perplexity, usage and restarted codes with every training
line; reconstruction PSNR/SSIM with every grid (``samples/recon_step_N.png``:
rows of training images, each followed by its reconstructions). It has no
sampler of its own: its prior over the codes comes with latent diffusion.

Args: res, contrast, dims, mask, steps, runlocal (as ``configs/vae.py``).
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, **common.AUTOENCODER_ARGS)
  c = common.autoencoder_base(a)
  c.model.update(embedding_dim=4 if a.runlocal else 8,
                 num_codes=16 if a.runlocal else 256)
  c.method = ml_collections.ConfigDict(dict(
      name="vqvae",
      commitment=0.25,
      decay=0.99,
      eps=1e-5,
      # Codes whose EMA use (assignments per batch) falls below this are
      # restarted at encoder outputs of the batch.
      restart_threshold=1.0,
      reconstruction="l1",      # l1 | mse
      mask_weight=1.0,
  ))
  return c
