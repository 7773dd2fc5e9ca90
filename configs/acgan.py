r"""A class-conditional GAN (lesion present / absent) for few images:
ACGAN (auxiliary classifier) or projection discriminator.

Run::

  python launch.py --config=configs/acgan.py:res=32,mask --workdir=workdirs/acgan

Args: as ``configs/dcgan.py``, plus ``head=projection`` (default) or
``head=acgan`` (the auxiliary classifier). With ``mask`` every sample comes
with its lesion mask.

What the default budget produces (and where both heads collapse within a
class): docs/methods.md.
"""

import ml_collections

from configs import dcgan


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return dcgan.get_config(arg, cond="label", head="projection")
