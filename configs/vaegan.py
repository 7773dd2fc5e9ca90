r"""VAE-GAN with an auxiliary-classifier discriminator (CAE-ACGAN-like), as
a class-conditional generator or, with ``translate``, as a translator.

Run::

  python launch.py --config=configs/vaegan.py:res=32,mask --workdir=workdirs/vaegan
  python launch.py --config=configs/vaegan.py:translate,source=t1w,target=t2w \
      --workdir=workdirs/vaegan_t1t2

Args (``key=value`` after the colon):
  translate: translation mode (``source``/``target`` contrasts, joined by
    "+"); otherwise generation of ``contrast`` (+ the lesion mask with
    ``mask``) for a class.
  res, contrast, dims, mask, steps, runlocal: as ``configs/vae.py``.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, translate=False, source="t1w", target="t2w",
                       **common.AUTOENCODER_ARGS)
  if a.translate:
    source, target = tuple(a.source.split("+")), tuple(a.target.split("+"))
    a.contrast = "+".join(source + target)
    a.mask = False
  c = common.autoencoder_base(a, cond="" if a.translate else "label")
  if a.translate:
    c.translation = ml_collections.ConfigDict(dict(source=source,
                                                   target=target))
    every = c.evals.reconstruction.every_steps
    num = c.evals.reconstruction.num_examples
    del c.evals["reconstruction"]
    c.evals.translation = common.evaluator(
        "translation", every_steps=every, num_examples=num)
  else:
    c.evals.generative = common.generative_eval(a.runlocal,
                                                c.train.num_steps)
  c.model.update(z_dim=8 if a.runlocal else 64,
                 bottleneck=4 if a.runlocal else 16,
                 d_ch=4 if a.runlocal else 16,
                 d_ch_mult=(1, 2) if a.runlocal else (1, 2, 4))
  c.method = ml_collections.ConfigDict(dict(
      name="vaegan",
      rec_weight=10.0,
      kl_weight=0.01,
      adv_weight=1.0,
      class_weight=1.0,
      loss="nonsaturating",     # nonsaturating | hinge | least_squares
  ))
  c.optim.update(name="adam", lr=2e-4, b1=0.5, b2=0.999, warmup_steps=0,
                 schedule="constant", grad_clip=0.0)
  c.sample = ml_collections.ConfigDict(dict(
      num=8 if a.runlocal else 64, batch_size=8 if a.runlocal else 64))
  return c
