r"""Class-conditional VAE (CVAE): lesion present / absent, optionally with
the lesion mask.

Run::

  python launch.py --config=configs/cvae.py:res=32,mask --workdir=workdirs/cvae

With ``mask`` the model generates each image together with its lesion mask
(ICVAE / PAVAE-like), so its samples are paired segmentation examples, and
``VAE.inpaint`` inserts a lesion with a given mask into a healthy image.
Args: as ``configs/vae.py``.
"""

import ml_collections

from configs import vae


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return vae.get_config(arg, cond="label")
