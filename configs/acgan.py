r"""A class-conditional GAN (lesion present / absent) for few images:
ACGAN (auxiliary classifier) or projection discriminator.

Run::

  python launch.py --config=configs/acgan.py:res=32,mask --workdir=workdirs/acgan

Args: as ``configs/dcgan.py``, plus ``head=projection`` (default) or
``head=acgan`` (the auxiliary classifier). With ``mask`` every sample comes
with its lesion mask. The projection head is the default: at res=32 with the
mask, 3000 steps of the auxiliary-classifier head drew one image per class
(per-class collapse score 0.86), while 1000 steps of the projection head
drew lesion masks in the lesion class only and varied within each class.
"""

import ml_collections

from configs import dcgan


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return dcgan.get_config(arg, cond="label", head="projection")
