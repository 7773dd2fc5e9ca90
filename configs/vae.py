r"""beta-VAE on brain-phantom slices (or volumes).

Run::

  python launch.py --config=configs/vae.py:res=32 --workdir=workdirs/vae_32

Args (``key=value`` after the colon):
  res: image side.
  contrast: t1w|t2w|pd|flair, or several joined by "+".
  dims: 2 (axial slices) or 3 (volumes).
  mask: also model the lesion mask (a mask channel under a Bernoulli
    likelihood), so samples come with their segmentation.
  latent: "vector" (a global latent, the generator's usual choice) or
    "map" (a spatial latent: better reconstructions, poorer samples).
  steps: training steps (0: the default).
  runlocal: tiny model and few steps, for tests and laptops.

A run writes ``samples/step_N.png`` (samples, masks overlaid) and
``samples/recon_step_N.png`` (rows of training images, each followed by
its reconstructions), reconstruction PSNR/SSIM with every grid and the
generative metrics (in-domain FID/KID, precision/recall, ...) at the end
into ``metrics.jsonl``.
"""

import ml_collections

from configs import common


def get_config(arg: str = "", cond: str = "") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, latent="vector", **common.AUTOENCODER_ARGS)
  c = common.autoencoder_base(a, cond)
  vector = a.latent == "vector"
  c.model.update(
      # "vector": z of z_dim numbers (the flattened `bottleneck`-channel map
      # through a Dense); "map": z_dim channels at 1/2^(levels-1) the size.
      latent=a.latent,
      z_dim=(8 if vector else 2) if a.runlocal else (64 if vector else 4),
      bottleneck=4 if a.runlocal else 16)
  c.method = ml_collections.ConfigDict(dict(
      name="vae",
      beta=1.0,
      # Linear KL warm-up against posterior collapse (Bowman et al. 2016).
      kl_warmup_steps=5 if a.runlocal else 500,
      # Nats per latent dimension below which the KL is not penalised
      # (Kingma et al. 2016); 0 turns it off.
      free_bits=0.0,
      likelihood="gaussian",    # gaussian | laplace
      scale="learned",          # learned (one per contrast) | fixed
      fixed_scale=0.1,          # the fixed scale, and the learned one's init
      min_scale=0.01,
      # Lesion insertion (inpaint): latent optimisation steps and rate.
      inpaint_steps=3 if a.runlocal else 100,
      inpaint_lr=0.05,
  ))
  c.sample = ml_collections.ConfigDict(dict(
      temperature=1.0, num=8 if a.runlocal else 64,
      batch_size=8 if a.runlocal else 64))
  c.evals.generative = common.generative_eval(a.runlocal,
                                              c.train.num_steps)
  return c
