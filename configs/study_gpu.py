r"""The augmentation study at full strength, for one GPU or TPU host.

Run::

  python launch.py --config=configs/study_gpu.py --workdir=workdirs/study_gpu
  python launch.py --config=configs/study_gpu.py:res=128 --workdir=...

The same study as ``configs/study.py`` (which takes the same args; ``res``
defaults to 64 here) with the sizes a GPU affords: the DDPM of
``configs/ddpm.py`` at this resolution (v-prediction, 40k steps, 50 DDIM
steps, guidance w=1), 1000 synthetic images per class, four real-data
fractions, five arms (synthetic-only too), 3 seeds (+3 where a decision is
close) and larger downstream networks trained 2000 steps. What fits in
accelerator memory: docs/performance.md ("What fits").
"""

import ml_collections

from configs import common
from configs import ddpm
from configs import study


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, **dict(study.ARGS, res=64))
  c = study.build(a, preset="gpu")
  if a.runlocal:  # the miniature stays the miniature
    return c
  if "ddpm" in c.generators:
    gen = c.generators.ddpm
    base = ddpm.get_config(f"res={a.res}")
    gen.model = base.model
    gen.model.num_groups = 32
    gen.optim = base.optim
    gen.data.batch_size = 64
    gen.train.update(num_steps=a.gen_steps or 40_000, sample_every=5_000,
                     ckpt_every=1_000, log_every=100, ema=base.train.ema,
                     ema_warmup=base.train.ema_warmup)
    gen.sample.update(steps=50, eta=0.0, guidance_scale=1.0)
  sc = c.study
  sc.update(synthetic_per_class=1000, extra_seeds=3,
            classical_strengths=(0.25, 0.5, 1.0),
            arms=("real", "real+classical", "real+synthetic",
                  "real+classical+synthetic", "synthetic"))
  if not a.fractions:
    sc.fractions = (0.05, 0.1, 0.25, 1.0)
  steps = a.task_steps or 2000
  for t in sc.tasks.values():
    t.update(steps=steps, batch_size=64)
    if "segmenter_steps" in t:
      t.segmenter_steps = steps
    if "width" in t.model:  # the classifier
      t.model.update(width=32, stage_sizes=(2, 2, 2))
    else:                   # U-Nets
      t.model.update(ch=32, ch_mult=(1, 2, 4))
  c.encoder.update(width=32, steps=2000, batch_size=64)
  return c
