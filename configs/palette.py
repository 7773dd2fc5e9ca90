r"""Image-conditioned diffusion for translation (Palette, Saharia et al.
2022): the target contrasts denoised from noise with the source contrasts
as extra input channels (T1w -> T2w by default).

Run::

  python launch.py --config=configs/palette.py:res=32 --workdir=workdirs/palette
  python launch.py --config=configs/palette.py:source=t1w+t2w,target=flair \
      --workdir=workdirs/palette_flair

Args (``key=value`` after the colon):
  source, target: contrasts joined by "+".
  res, dims, steps, runlocal: as ``configs/ddpm.py``.
  objective: "diffusion" or "rectified_flow".

Translations use ``sample.sampler`` with ``sample.steps`` network
evaluations per image (DDIM 25 here; ``dpmpp_2m`` reaches the same
quality in fewer). The ``translation`` evaluator writes SSIM/PSNR/MAE of the
target contrasts on the held-out split with every grid.
"""

import ml_collections

from configs import common
from configs import ddpm


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, source="t1w", target="t2w", res=32, dims=2,
                       steps=0, objective="diffusion", runlocal=False)
  source, target = tuple(a.source.split("+")), tuple(a.target.split("+"))
  c = ddpm.get_config(
      ",".join([f"res={a.res}", f"dims={a.dims}", f"objective={a.objective}",
                f"contrast={'+'.join(source + target)}"] +
               (["runlocal"] if a.runlocal else []) +
               ([f"steps={a.steps}"] if a.steps else [])))
  c.translation = ml_collections.ConfigDict(dict(source=source,
                                                 target=target))
  c.method.condition = "source"
  # The source fixes the anatomy: fewer steps than unconditional sampling.
  if not a.runlocal:
    c.sample.steps = 25
  every = c.train.sample_every
  c.evals = ml_collections.ConfigDict(dict(
      translation=common.evaluator("translation", every_steps=every,
                                   num_examples=16 if a.runlocal else 64),
      loss=common.evaluator("loss", every_steps=0,
                            num_batches=2 if a.runlocal else 8)))
  return c
