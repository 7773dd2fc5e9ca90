r"""CycleGAN: unpaired translation between contrasts (T1w <-> T2w by
default); the two domains of every batch come from different subjects.

Run::

  python launch.py --config=configs/cyclegan.py:res=32 --workdir=workdirs/cyc

Args: as ``configs/pix2pix.py``. The ``translation`` evaluator scores
source -> target on *paired* held-out images (SSIM/PSNR/MAE), which
training never sees.
"""

import ml_collections

from configs import pix2pix


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = pix2pix.get_config(arg)
  c.data.unpaired = True
  c.method = ml_collections.ConfigDict(dict(
      name="cyclegan",
      cycle_weight=10.0,        # Zhu et al. 2017
      identity_weight=0.5,      # times cycle_weight; needs as many
                                # source as target contrasts
      pool_size=50,
  ))
  return c
