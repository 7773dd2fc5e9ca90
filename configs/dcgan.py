r"""An unconditional GAN for few images (DCGAN-shaped generator, SN-GAN
discriminator, DiffAugment, R1) on brain-phantom slices (or volumes).

Run::

  python launch.py --config=configs/dcgan.py:res=32 --workdir=workdirs/dcgan

Args (``key=value`` after the colon):
  res, contrast, dims, steps, runlocal: as ``configs/vae.py``.
  mask: the generator emits the lesion mask as an extra channel (the
    discriminator judges image and mask together).
  loss: nonsaturating | hinge | least_squares | wasserstein (adds WGAN-GP).

Every training log line carries D/G losses, D accuracy on real and fake
images, both gradient norms and the penalty: D accuracy near 1 on both with
a rising G loss means D is winning; ``ms_ssim`` of the generative evaluator
near 1 means mode collapse.
"""

import ml_collections

from configs import common


def get_config(arg: str = "", cond: str = "",
               head: str = "none") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, loss="nonsaturating", head=head,
                       **common.AUTOENCODER_ARGS)
  c = common.autoencoder_base(a, cond)
  big = a.res >= 64
  mult = (1, 2, 4, 8) if big else (1, 2, 4)
  ch = 4 if a.runlocal else (32 if big else 16)
  c.model = ml_collections.ConfigDict(dict(
      z_dim=16 if a.runlocal else 128,
      g_ch=ch, g_ch_mult=(1, 2) if a.runlocal else mult,
      d_ch=ch, d_ch_mult=(1, 2) if a.runlocal else mult,
      num_groups=4 if a.runlocal else 8,
      dtype="float32", conv_lowering="auto"))
  c.method = ml_collections.ConfigDict(dict(
      name="gan",
      loss=a.loss,
      head=a.head,              # none | acgan | projection
      spectral_norm=True,
      # Differentiable augmentation of every image the discriminator sees:
      # with a few hundred real slices it otherwise memorises them.
      diff_augment=("brightness", "contrast", "translation", "cutout"),
      r1_gamma=0.0 if a.loss == "wasserstein" else 1.0,
      gp_weight=10.0 if a.loss == "wasserstein" else 0.0,
      class_weight=1.0,
      # Without it a class-conditional generator learns one image per
      # class within 3000 steps here (docs/methods.md).
      mode_seeking=0.03 if cond else 0.0,
      disc_steps=1,
      disc_lr_mult=2.0,         # TTUR (Heusel et al. 2017)
  ))
  # Adam with b1=0 (no momentum) as in SN-GAN / StyleGAN2, no warm-up.
  c.optim.update(name="adam", lr=2e-4, b1=0.0, b2=0.99, warmup_steps=0,
                 schedule="constant", grad_clip=0.0)
  c.train.update(ema=0.999, ema_warmup=100 if not a.runlocal else 5)
  c.sample = ml_collections.ConfigDict(dict(
      num=8 if a.runlocal else 64, batch_size=8 if a.runlocal else 64))
  del c.evals["reconstruction"]
  c.evals.generative = common.generative_eval(a.runlocal,
                                              c.train.num_steps)
  return c
