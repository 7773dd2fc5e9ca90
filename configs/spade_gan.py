r"""SPADE GAN: images drawn for given lesion masks (any real or edited mask
becomes a paired segmentation example).

Run::

  python launch.py --config=configs/spade_gan.py:res=32 --workdir=workdirs/spade

The sample grids, ``--mode=sample``, the evaluators and the study draw
images for real masks of the data set (training masks for grids and
synthetic sets, held-out masks for the generative metrics); a sample's mask
channel is the mask it was drawn for.

Args: res, contrast, dims, steps, runlocal (as ``configs/vae.py``); the
lesion mask is always the condition.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, **common.AUTOENCODER_ARGS)
  a.mask = True
  c = common.autoencoder_base(a)
  big = a.res >= 64
  ch = 4 if a.runlocal else (32 if big else 16)
  c.model = ml_collections.ConfigDict(dict(
      z_dim=16 if a.runlocal else 64,
      g_ch=ch, g_ch_mult=(1, 2) if a.runlocal else ((1, 2, 4, 8) if big
                                                    else (1, 2, 4)),
      d_ch=ch, d_layers=1 if a.runlocal else (3 if big else 2),
      num_groups=4 if a.runlocal else 8,
      dtype="float32", conv_lowering="auto"))
  c.method = ml_collections.ConfigDict(dict(
      name="spade_gan", loss="hinge", r1_gamma=1.0, disc_lr_mult=2.0))
  c.optim.update(name="adam", lr=2e-4, b1=0.0, b2=0.99, warmup_steps=0,
                 schedule="constant", grad_clip=0.0)
  c.sample = ml_collections.ConfigDict(dict(
      num=8 if a.runlocal else 64, batch_size=8 if a.runlocal else 64))
  del c.evals["reconstruction"]
  c.evals.generative = common.generative_eval(a.runlocal,
                                              c.train.num_steps)
  return c
