r"""The augmentation study: does synthetic data help downstream tasks?

Run (this is what ``python launch.py`` runs with no flags)::

  python launch.py --config=configs/study.py --workdir=workdirs/study

It trains the configured generators (default: one of each family, a
label-conditional DDPM, a class-conditional GAN with a projection
discriminator and a conditional VAE, each generating T1w, T2w, FLAIR and the
lesion mask together) on the real training subjects of brain_phantom,
samples a labelled synthetic set from each, scores the generators
(in-domain FID/KID, precision/recall, density/coverage, diversity,
memorization), then trains every downstream task on every arm (real only,
+ classical augmentation, + each generator's synthetic data; + both and
synthetic only in the GPU preset) for every real-data fraction and seed,
scores them on the held-out real test subjects, and writes
``report.md``/``report.html`` with the families side by side, a verdict per
family and task, tables, plots and sample grids.

The GPU/TPU preset, the same study at full strength, is
``configs/study_gpu.py`` (a short file of overrides on this one).

Args (``key=value`` after the colon):
  res: image side (32 here; the GPU preset defaults to 64).
  seeds: seeds per cell (mean and 95% CI over seeds); default 3 (2 with
    runlocal).
  fractions: real-data fractions joined by "+", e.g. "0.1+0.25+1".
  tasks: any of classification, segmentation, translation joined by "+",
    or "all"; each is kept only where the data set supports it.
  gen_steps: generator training steps (0: the size's default).
  task_steps: downstream training steps (0: the size's default).
  generator_data: "full" (one generator on all training subjects: the
    shared-generator scenario, synthetic arms see information from subjects
    outside the fraction) or "per_fraction" (one generator per fraction,
    trained on exactly that fraction's subjects; the strict protocol).
  generators: the generators, as method config names joined by "+"
    (``configs/<name>.py``; default "ddpm+acgan+cvae"); each is trained on
    the study's data with the lesion mask as an extra channel, and every
    generator's arms appear in every table. "ddpm" is the study's tuned
    label-conditional DDPM; other configs run at their own defaults (fewer
    steps here: :data:`CPU_GENERATOR_BUDGET`; their ``runlocal`` size under
    ``runlocal``). "ldm" (label-conditional latent diffusion) trains its
    stage-1 autoencoder on the same subjects first, into
    ``generators/ldm/stage1``.
  translators: translation methods benchmarked on every translation task,
    as config names joined by "+" (pix2pix, cyclegan, vaegan): each is
    trained per fraction and seed on the same real subjects as the task's
    U-Net regression arms and scored the same way (SSIM/PSNR/MAE, lesion
    Dice of a segmenter on the translated images), one row each.
  translator_steps: their training steps (0: each config's default).
  runlocal: a miniature study for tests (tiny models, a few steps).

Sweep the share of synthetic images per batch x seed (``get_sweep``; each run
is a whole study; docs/sweeps.md)::

  python -m medgen_jax.sweep --config=configs/study.py \
      --workdir=workdirs/sweep_ratio
  python -m medgen_jax.sweep collect workdirs/sweep_ratio
"""

import importlib

import ml_collections

from configs import common
from configs import ddpm
from medgen_jax import sweep


def _task(kind: str, inputs, target, num_classes: int, steps: int,
          batch_size: int, lr: float, model: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      kind=kind, inputs=tuple(inputs), target=target, num_classes=num_classes,
      model=model, steps=steps, batch_size=batch_size,
      # Each seed keeps its parameters with the best validation score
      # (checked every steps_per_call steps): every arm gets the same budget
      # and is judged at its best point of it, not at an arbitrary last step.
      model_selection=True,
      # Training steps run inside one jitted lax.scan per call.
      steps_per_call=min(steps, 25),
      conv_lowering="auto",
      optim=dict(name="adamw", lr=lr, schedule="cosine", warmup_steps=0,
                 final_lr_frac=0.05, weight_decay=1e-4, b1=0.9, b2=0.999,
                 grad_clip=1.0)))


def _generator(name: str, a, preset: str) -> ml_collections.ConfigDict:
  """``configs/<name>.py`` at the study's resolution, with the lesion mask
  (with :data:`CPU_GENERATOR_BUDGET` in the CPU preset); the study sets
  its data section."""
  try:
    module = importlib.import_module(f"configs.{name}")
  except ModuleNotFoundError:
    raise ValueError(f"generators: no config configs/{name}.py") from None
  args = [f"res={a.res}", "mask", _GENERATOR_ARGS.get(name, "")]
  args += ["runlocal"] if a.runlocal else []
  gen = module.get_config(",".join(filter(None, args)))
  if preset == "cpu" and not a.runlocal:
    for key, value in CPU_GENERATOR_BUDGET.get(name, {}).items():
      section, field = key.split(".")
      gen[section][field] = value
  if a.gen_steps:
    gen.train.num_steps = a.gen_steps
  # The study scores every synthetic set itself and draws its grid; the
  # generator's own periodic evaluations would cost compiles and minutes
  # (its end-of-training FID would train a second in-domain encoder).
  for run in (gen, gen.get("stage1")):  # a latent model's stage 1 too
    if run is None:
      continue
    for e in run.get("evals", {}).values():
      e.every_steps = 0
    run.train.sample_every = 0
  return gen


# Config args for generators that are unconditional by default: the study
# asks every generator for the same number of images of each class.
_GENERATOR_ARGS = {"ldm": "cond=label"}


# The default job's budget for the other families, so that the three
# fit in its 15 minutes on two CPU cores (docs/study.md): fewer steps than
# their own configs.
CPU_GENERATOR_BUDGET = {
    "acgan": {"train.num_steps": 1000},
    "cvae": {"train.num_steps": 800},
}


# Config args that make a method config a translator.
_TRANSLATOR_ARGS = {"vaegan": "translate"}


def _translator(name: str, a) -> ml_collections.ConfigDict:
  """``configs/<name>.py`` as a translator at the study's resolution; the
  study sets its data and translation sections per cell."""
  try:
    module = importlib.import_module(f"configs.{name}")
  except ModuleNotFoundError:
    raise ValueError(f"translators: no config configs/{name}.py") from None
  args = [f"res={a.res}", _TRANSLATOR_ARGS.get(name, "")]
  args += ["runlocal"] if a.runlocal else []
  t = module.get_config(",".join(filter(None, args)))
  if a.translator_steps:
    t.train.num_steps = a.translator_steps
  # Scored by the study on the test subjects; no periodic evaluation.
  t.evals = ml_collections.ConfigDict()
  t.train.sample_every = 0
  return t


def _entries(key: str, value: str, allow_empty: bool = False):
  """The "+"-joined entries of arg ``key``; an empty list or entry is an
  error (``"0.5+"``, ``"generators="``) unless ``allow_empty``."""
  entries = value.split("+") if value else []
  if (not entries and not allow_empty) or any(not e for e in entries):
    raise ValueError(f"{key}={value!r}: give one or more entries joined by "
                     "'+' (see configs/study.py)")
  return entries


def _fractions(value: str):
  out = []
  for entry in _entries("fractions", value):
    try:
      f = float(entry)
    except ValueError:
      raise ValueError(f"fractions: {entry!r} is not a number") from None
    if not 0.0 < f <= 1.0:
      raise ValueError(f"fractions: {entry} must be in (0, 1] (a share of "
                       "the real training subjects)")
    out.append(f)
  return tuple(out)


# The args and their defaults (see the module docstring).
ARGS = dict(res=32, seeds=-1, fractions="",
            tasks="classification+segmentation", gen_steps=0, task_steps=0,
            generator_data="full", generators="ddpm+acgan+cvae", translators="",
            translator_steps=0, runlocal=False)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return build(common.parse_arg(arg, **ARGS))


def build(a: ml_collections.ConfigDict, preset: str = "cpu"
          ) -> ml_collections.ConfigDict:
  """The study config of parsed args ``a`` (:data:`ARGS`); ``preset="gpu"``
  leaves the other generators at their own configs' budgets for
  ``configs/study_gpu.py`` to size."""
  # Sized for the default job: ~15 min on two CPU cores at 32 px. The
  # GPU/TPU preset (configs/study_gpu.py) overrides the sizes.
  contrasts = ("t1w", "t2w", "flair")
  c = ml_collections.ConfigDict()
  c.kind = "study"
  c.seed = 0
  c.data = common.data_config(res=a.res, contrasts=contrasts)

  # --- generators: any method config; the study sets their data section.
  gen = ddpm.get_config(f"res={a.res}")
  gen.data = common.data_config(res=a.res, contrasts=contrasts, cond="label",
                                batch_size=16)
  gen.data.mask_channels = ("lesion_mask",)
  # v-prediction, 4000 steps, guidance w=3 and eta=1: why, with the
  # measurements, in docs/study.md ("What made the generator usable").
  gen.method.prediction = "v"
  gen.model.update(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1,
                   attn_resolutions=(), num_groups=8)
  gen.optim.update(lr=1e-3, warmup_steps=50, schedule="cosine",
                   final_lr_frac=0.1)
  gen.train.update(num_steps=a.gen_steps or 2700, sample_every=0,
                   ckpt_every=250, log_every=50, ema=0.995, ema_warmup=50)
  gen.sample.update(steps=25, eta=1.0, guidance_scale=3.0, batch_size=128)
  c.generators = ml_collections.ConfigDict()
  for name in _entries("generators", a.generators):
    c.generators[name] = (gen if name == "ddpm" else
                          _generator(name, a, preset))

  steps = a.task_steps or 200
  fractions = a.fractions or "0.1+1"
  c.study = ml_collections.ConfigDict(dict(
      fractions=_fractions(fractions),
      num_seeds=a.seeds if a.seeds >= 0 else 3,
      # Statistical power where it matters: a synthetic arm whose paired
      # p-value (to real-only or to real+classical) falls inside
      # decision_band gets extra_seeds more seeds, as do its two baselines
      # (one here, what the CPU budget allows; 3 in the GPU preset).
      extra_seeds=1,
      decision_band=(0.01, 0.2),
      # Every generator's real+X arm is compared with real-only and with
      # the tuned real+classical arm; real+classical+X and X-only arms are
      # in the GPU preset.
      arms=("real", "real+classical", "real+synthetic"),
      # Share of every training batch drawn from the synthetic set.
      synthetic_ratio=0.5,
      # Multipliers of every classical augmentation probability tried on
      # the validation split (one seed each); the best is every classical
      # arm's, so generative arms are compared with a tuned baseline.
      classical_strengths=(0.5, 1.0),
      synthetic_per_class=128,
      synthetic_seed=1234,
      generator_data=a.generator_data,
      test_split="test",
      export_nifti=False,
      tasks=ml_collections.ConfigDict(),
  ))
  w, batch = 8, 16
  tasks = {
      "classification": _task(
          "classification", ("auto",), "label", 2, steps, batch, 2e-3,
          dict(width=w, stage_sizes=(1, 1, 1), num_groups=8)),
      # Two levels: at 32 px lesions are a few pixels wide, and XLA:CPU
      # time there is per-op overhead rather than FLOPs.
      "segmentation": _task(
          "segmentation", ("auto",), "auto", 2, steps, batch, 2e-3,
          dict(ch=w, ch_mult=(1, 2), num_groups=8)),
      "translation": _task(
          "translation", ("auto",), "auto", 0, steps, batch, 2e-3,
          dict(ch=w, ch_mult=(1, 2, 4), num_groups=8)),
  }
  # Translated T2w images are also scored by the lesion Dice of a segmenter
  # trained on real T2w images (seg_dice; seg_dice_real is its ceiling).
  tasks["translation"].segmenter_steps = steps
  # "auto" inputs and targets are chosen from the data set when the study
  # starts (downstream.study.resolve_for_data: FLAIR, the mask, the first
  # contrast to the second); a task the data cannot support (no label, no
  # mask, one contrast) is dropped with a note in the report.
  for name in (tuple(tasks) if a.tasks == "all" else
               _entries("tasks", a.tasks)):
    if name not in tasks:
      raise ValueError(f"unknown task {name!r}; known: {sorted(tasks)}")
    c.study.tasks[name] = tasks[name]

  c.translators = ml_collections.ConfigDict()
  for name in _entries("translators", a.translators, allow_empty=True):
    c.translators[name] = _translator(name, a)

  c.augment = common.augment_config()
  # The in-domain feature extractor for FID/KID/PR/memorization. It must
  # separate the classes, or the metrics cannot see a generator that gets
  # a class wrong (docs/study.md: held-out AUC 0.59 after 200 steps, 0.79
  # after these 1000).
  c.encoder = ml_collections.ConfigDict(dict(
      width=16, stage_sizes=(1, 1, 1), num_groups=8,
      num_classes=2, steps=1000, steps_per_call=25,
      batch_size=32, seed=0,
      conv_lowering="auto",
      optim=dict(name="adamw", lr=1e-3, schedule="cosine", warmup_steps=0,
                 final_lr_frac=0.05, weight_decay=1e-4, b1=0.9, b2=0.999,
                 grad_clip=1.0)))
  # Evaluators (medgen_jax.eval registry): the study scores every
  # generator's synthetic set with "generative".
  c.evals = ml_collections.ConfigDict(dict(generative=dict(
      type="generative", every_steps=0, kid_subsets=50, kid_subset_size=100,
      pr_k=5, diversity_pairs=200, memorization_quantile=0.01)))

  if a.runlocal:
    # Phantom seed 3 puts lesioned slices in every split at this size.
    c.data.update(num_subjects=10, res=16, phantom_seed=3)
    gen.data.batch_size = 8
    gen.model.update(ch=8, ch_mult=(1, 2), num_groups=4)
    gen.train.update(num_steps=a.gen_steps or 6, ckpt_every=3, log_every=3,
                     ema_warmup=2)
    gen.optim.warmup_steps = 2
    gen.sample.update(steps=3, batch_size=16)
    c.study.update(synthetic_per_class=8, num_seeds=a.seeds if a.seeds >= 0 else 2,
                   classical_strengths=(0.5, 1.0), extra_seeds=1,
                   arms=c.study.arms + ("real+classical+synthetic",
                                        "synthetic"))
    for t in c.study.tasks.values():
      t.update(steps=a.task_steps or 4, steps_per_call=2, batch_size=8)
      if "segmenter_steps" in t:
        t.segmenter_steps = 4
      t.model.update(num_groups=4)
      if "width" in t.model:
        t.model.width = 8
      else:
        t.model.update(ch=8, ch_mult=(1, 2))
    c.encoder.update(width=8, num_groups=4, steps=4, steps_per_call=2,
                     batch_size=8)
    c.evals.generative.update(kid_subsets=5, kid_subset_size=8, pr_k=2,
                              diversity_pairs=8)
  return c


def get_sweep(arg: str = "") -> sweep.Sweep:
  """``study.synthetic_ratio`` (the share of every synthetic arm's batch
  drawn from the synthetic set) x the study's base seed: 6 whole studies,
  each training its own copy of the generator and averaging
  ``study.num_seeds`` seeds per cell."""
  get_config(arg)  # the args' errors first
  return sweep.product([
      sweep.values("study.synthetic_ratio", [0.25, 0.5, 0.75]),
      sweep.values("seed", [0, 1]),
  ])
