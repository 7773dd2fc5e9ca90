r"""pix2pix: paired translation between contrasts (T1w -> T2w by default).

Run::

  python launch.py --config=configs/pix2pix.py:res=32 --workdir=workdirs/p2p
  python launch.py --config=configs/pix2pix.py:source=t1w,target=flair \
      --workdir=workdirs/p2p_flair

Args (``key=value`` after the colon):
  source, target: contrasts joined by "+" (``t1w+t2w`` -> ``flair``).
  res, dims, steps, runlocal: as ``configs/vae.py``.

The ``translation`` evaluator writes SSIM/PSNR/MAE of the target contrasts
on the held-out split into ``metrics.jsonl`` with every grid.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, source="t1w", target="t2w", res=32, dims=2,
                       steps=0, runlocal=False)
  source, target = tuple(a.source.split("+")), tuple(a.target.split("+"))
  a.contrast = "+".join(source + target)
  a.mask = False
  c = common.autoencoder_base(a)
  c.translation = ml_collections.ConfigDict(dict(source=source,
                                                 target=target))
  big = a.res >= 64
  c.model = ml_collections.ConfigDict(dict(
      g_ch=4 if a.runlocal else (32 if big else 16),
      g_ch_mult=(1, 2) if a.runlocal else ((1, 2, 4, 8) if big else
                                           (1, 2, 4)),
      d_ch=4 if a.runlocal else (32 if big else 16),
      d_layers=1 if a.runlocal else (3 if big else 2),
      num_groups=4 if a.runlocal else 8,
      dtype="float32", conv_lowering="auto"))
  c.method = ml_collections.ConfigDict(dict(
      name="pix2pix",
      l1_weight=100.0,          # Isola et al. 2017
      loss="nonsaturating",     # nonsaturating | hinge | least_squares
      disc_lr_mult=1.0,
  ))
  c.optim.update(name="adam", lr=2e-4, b1=0.5, b2=0.999, warmup_steps=0,
                 schedule="linear", final_lr_frac=0.0, grad_clip=0.0)
  every = c.evals.reconstruction.every_steps
  num = c.evals.reconstruction.num_examples
  del c.evals["reconstruction"]
  c.evals.translation = common.evaluator("translation", every_steps=every,
                                         num_examples=num)
  return c
