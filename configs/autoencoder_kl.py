r"""KL autoencoder with a patch discriminator: the stage 1 of latent
diffusion, on brain-phantom slices (or volumes).

Run::

  python launch.py --config=configs/autoencoder_kl.py:res=32 \
      --workdir=workdirs/aekl_32

Loss: L1 + perceptual distance in a frozen in-domain classifier + a small
KL + a hinge PatchGAN term from ``disc_start`` on; the discriminator has its
own optimizer. With ``method.perceptual_net="auto"`` the run first trains
the in-domain classifier into ``<workdir>/perceptual_net`` (seconds at this
size; no downloaded weights); give a directory to reuse one (e.g. a study's
``encoder/``). The ``reconstruction`` evaluator writes PSNR/SSIM and the
latents' ``latent_scale_factor`` (1 / std, for latent diffusion) with every
grid.

Args: res, contrast, dims, mask, steps, runlocal (as ``configs/vae.py``).
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, **common.AUTOENCODER_ARGS)
  c = common.autoencoder_base(a)
  c.model.update(z_channels=2 if a.runlocal else 4,
                 disc_ch=8 if a.runlocal else 32,
                 disc_layers=1 if a.runlocal else 2)
  c.method = ml_collections.ConfigDict(dict(
      name="autoencoder_kl",
      kl_weight=1e-6,
      reconstruction="l1",      # l1 | mse
      mask_weight=1.0,
      perceptual_weight=0.1,
      # "auto": train the in-domain classifier into <workdir>/perceptual_net
      # before the first step; or the directory of a trained one.
      perceptual_net="auto",
      adv_weight=0.01,
      adv_loss="hinge",         # hinge | nonsaturating | least_squares
      # The adversarial term starts once reconstructions are sharp-ish.
      disc_start=5 if a.runlocal else 1_000,
  ))
  # The in-domain classifier behind the perceptual loss ("auto").
  c.perceptual = ml_collections.ConfigDict(dict(
      width=8 if a.runlocal else 16, stage_sizes=(1, 1, 1),
      num_groups=4 if a.runlocal else 8, num_classes=0,
      steps=4 if a.runlocal else 200, steps_per_call=2 if a.runlocal else 25,
      batch_size=8 if a.runlocal else 32, seed=0, conv_lowering="auto",
      optim=dict(name="adamw", lr=2e-3, schedule="cosine", warmup_steps=0,
                 final_lr_frac=0.05, weight_decay=1e-4, b1=0.9, b2=0.999,
                 grad_clip=1.0)))
  return c
