r"""A class-conditional GAN (lesion present / absent) for few images:
ACGAN (auxiliary classifier) or projection discriminator.

Run::

  python launch.py --config=configs/acgan.py:res=32,mask --workdir=workdirs/acgan

Args: as ``configs/dcgan.py``, plus ``head=projection`` (default) or
``head=acgan`` (the auxiliary classifier). With ``mask`` every sample comes
with its lesion mask.

At res=32 with the mask both heads collapse within each class at the default
budget (3000 steps): the auxiliary-classifier head to one image per class
(per-class collapse score 0.86), the projection head to a few (0.70, label
agreement 1.0); the generative evaluator flags both. The unconditional
``configs/dcgan.py`` stayed diverse at 1000 steps.
"""

import ml_collections

from configs import dcgan


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return dcgan.get_config(arg, cond="label", head="projection")
