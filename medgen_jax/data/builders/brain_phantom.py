"""TFDS builder for the simulated multi-contrast brain MRI phantom.

Examples come from :mod:`medgen_jax.data.phantom`; nothing is downloaded.
Records are stored as ArrayRecord, so ``builder.as_data_source(split)`` (or
``tfds.data_source``) gives random access without tf.data.

Usage::

  builder = prepare(config.data)   # builds into data_dir if missing
  train = builder.as_data_source("train")
  example = train[0]               # dict of numpy arrays

Atomicity: ``download_and_prepare`` writes into a sibling
``incomplete.XXXXXX_<version>`` directory and renames it to the version
directory only after every split and ``dataset_info.json`` are written
(``tfds.core.utils.incomplete_dir``, TFDS 4.9.10). A killed build therefore
leaves no complete-looking dataset, and ``is_prepared()`` stays False.
"""

import dataclasses
from typing import Any, Dict, Iterator, Tuple

import numpy as np
import tensorflow_datasets as tfds

from medgen_jax.data import builder_lib
from medgen_jax.data import phantom

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)

_DESCRIPTION = """\
Simulated multi-contrast brain MRI (T1w, T2w, PD, FLAIR) of virtual subjects.
Each subject is the ICBM152 2009a tissue probability maps (as shipped with
nilearn) under a random affine and smooth elastic deformation, with optional
MS-like periventricular white-matter lesions, per-subject jittered 1.5 T
relaxation times, spin-echo / inversion-recovery signal equations with partial
volume, a smooth multiplicative bias field shared by all contrasts, and Rician
noise. Images are in physical signal units (not normalised). 2D configs hold
axial slices (label: lesion visible in the slice); 3D configs hold volumes
(label: lesion visible in the volume). Splits are by subject (70/15/15).
"""

_CITATION = """\
@article{fonov2011unbiased,
  title={Unbiased average age-appropriate atlases for pediatric studies},
  author={Fonov, Vladimir and Evans, Alan C and Botteron, Kelly and
          Almli, C Robert and McKinstry, Robert C and Collins, D Louis},
  journal={NeuroImage},
  volume={54},
  number={1},
  pages={313--327},
  year={2011}
}
"""

_VERSION = "1.0.0"
_DEFAULTS = dict(slices_per_subject=16,
                 max_lesions=phantom.PhantomParams().max_lesions)


@dataclasses.dataclass(eq=False)
class BrainPhantomConfig(tfds.core.BuilderConfig):
  """Parameters of one brain-phantom variant (each caches to its own dir).

  Attributes:
    spatial_dims: 2 (axial slices) or 3 (volumes).
    res: image side (2D) or cube side (3D).
    num_subjects: virtual subjects, split 70/15/15 by subject.
    snr: mean brain signal over the Rician noise sigma, per contrast.
    seed: the data set is a deterministic function of the config.
    slices_per_subject: axial slices per subject (2D only; ignored by 3D,
      though still part of the name).
    max_lesions: lesioned subjects get 1..max_lesions lesions.
  """

  spatial_dims: int = 2
  res: int = 32
  num_subjects: int = 40
  snr: float = 30.0
  seed: int = 0
  slices_per_subject: int = _DEFAULTS["slices_per_subject"]
  max_lesions: int = _DEFAULTS["max_lesions"]


def config_name(spatial_dims: int, res: int, num_subjects: int, snr: float,
                seed: int, slices_per_subject: int, max_lesions: int) -> str:
  """Name encoding every parameter, e.g. ``d2_r32_n40_snr30_s0_k16_l24``."""
  snr_str = f"{float(snr):g}".replace(".", "p").replace("+", "")
  return (f"d{spatial_dims}_r{res}_n{num_subjects}_snr{snr_str}_s{seed}"
          f"_k{slices_per_subject}_l{max_lesions}")


def _new_config(spatial_dims: int, res: int, num_subjects: int, snr: float,
                seed: int, slices_per_subject: int,
                max_lesions: int) -> BrainPhantomConfig:
  if spatial_dims not in (2, 3):
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
  if num_subjects < len(SPLITS):
    raise ValueError(f"need >= {len(SPLITS)} subjects (one per split), got "
                     f"{num_subjects}")
  kind = "axial slices" if spatial_dims == 2 else "volumes"
  return BrainPhantomConfig(
      name=config_name(spatial_dims, res, num_subjects, snr, seed,
                       slices_per_subject, max_lesions),
      version=_VERSION,
      description=(f"{num_subjects} subjects, {kind} of side {res}, SNR "
                   f"{snr:g}, seed {seed}."),
      spatial_dims=spatial_dims, res=res, num_subjects=num_subjects,
      snr=float(snr), seed=seed, slices_per_subject=slices_per_subject,
      max_lesions=max_lesions)


# Presets: `tfds.builder("brain_phantom/<name>")` works for these.
PRESETS = (
    _new_config(2, 32, 40, 30.0, 0, **_DEFAULTS),
    _new_config(2, 64, 40, 30.0, 0, **_DEFAULTS),
    _new_config(3, 32, 40, 30.0, 0, **_DEFAULTS),
)


def make_builder_config(spatial_dims: int, res: int, num_subjects: int,
                        snr: float, seed: int,
                        slices_per_subject: int = _DEFAULTS[
                            "slices_per_subject"],
                        max_lesions: int = _DEFAULTS["max_lesions"]
                        ) -> BrainPhantomConfig:
  """Config for any parameter combination.

  Returns the preset instance when the parameters match one: TFDS refuses a
  custom config that shares a preset's name but is a different object.
  """
  cfg = _new_config(spatial_dims, res, num_subjects, snr, seed,
                    slices_per_subject, max_lesions)
  return {c.name: c for c in PRESETS}.get(cfg.name, cfg)


def split_subjects(num_subjects: int, seed: int) -> Dict[str, np.ndarray]:
  """Disjoint, sorted subject ids per split (70/15/15, >= 1 each).

  The permutation depends only on (num_subjects, seed).
  """
  if num_subjects < len(SPLITS):
    raise ValueError(f"need >= {len(SPLITS)} subjects, got {num_subjects}")
  n_val, n_test = (max(1, int(round(f * num_subjects)))
                   for f in SPLIT_FRACTIONS[1:])
  n_train = num_subjects - n_val - n_test
  if n_train < 1:  # e.g. 3 or 4 subjects
    n_val, n_test = 1, 1
    n_train = num_subjects - 2
  # A stream separate from the subjects' own (SeedSequence(seed, spawn_key)).
  rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5B117]))
  perm = rng.permutation(num_subjects)
  bounds = np.cumsum([n_train, n_val])
  return {name: np.sort(ids).astype(np.int64)
          for name, ids in zip(SPLITS, np.split(perm, bounds))}


def _features(res: int, spatial_dims: int) -> tfds.features.FeaturesDict:
  shape = (res,) * spatial_dims
  image = lambda dtype: tfds.features.Tensor(shape=shape, dtype=dtype)
  return tfds.features.FeaturesDict({
      **{c: image(np.float32) for c in phantom.CONTRASTS},
      "tissue": image(np.uint8),
      "lesion_mask": image(np.uint8),
      "label": tfds.features.ClassLabel(names=["no_lesion", "lesion"]),
      "subject_id": tfds.features.Tensor(shape=(), dtype=np.int32),
      "slice_index": tfds.features.Tensor(shape=(), dtype=np.int32),
  })


def subject_examples(cfg: BrainPhantomConfig,
                     subject: int) -> Iterator[Tuple[str, Dict[str, Any]]]:
  """(key, example) pairs of one subject: its slices (2D) or its volume (3D).

  ``slice_index`` is the axial position on the 1 mm ICBM152 grid (template
  voxel z index; MNI z = index - 72), or -1 for volumes.
  """
  geom = phantom.Geometry(res=cfg.res, spatial_dims=cfg.spatial_dims,
                          slices_per_subject=cfg.slices_per_subject)
  params = phantom.PhantomParams(snr=cfg.snr, max_lesions=cfg.max_lesions)
  s = phantom.simulate_subject(cfg.seed, subject, geom, params)
  keys = ("tissue", "lesion_mask") + phantom.CONTRASTS

  def example(arrays, slice_index):
    return dict(**arrays,
                label=int(phantom.has_lesion(arrays["lesion_mask"])),
                subject_id=np.int32(subject),
                slice_index=np.int32(slice_index))

  if cfg.spatial_dims == 3:
    yield f"s{subject:05d}", example({k: s[k] for k in keys}, -1)
    return
  for k, z in enumerate(s["slice_index"]):
    yield (f"s{subject:05d}_z{int(z):03d}",
           example({key: s[key][k] for key in keys}, z))


class BrainPhantom(tfds.core.GeneratorBasedBuilder):
  """Simulated multi-contrast brain MRI with MS-like lesions."""

  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = {_VERSION: "Initial release."}
  BUILDER_CONFIGS = list(PRESETS)

  def __init__(self, *, file_format=None, **kwargs):
    # ArrayRecord by default: random access via `as_data_source`.
    super().__init__(
        file_format=file_format or tfds.core.FileFormat.ARRAY_RECORD,
        **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=_features(cfg.res, cfg.spatial_dims),
        supervised_keys=None,
        homepage="https://nilearn.github.io/stable/modules/datasets.html",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is simulated offline.
    cfg = self.builder_config
    return {name: self._generate_examples(ids)
            for name, ids in split_subjects(cfg.num_subjects,
                                            cfg.seed).items()}

  def _generate_examples(self, subject_ids):
    for subject in subject_ids:
      yield from subject_examples(self.builder_config, int(subject))


def validate_config(data_cfg) -> list:
  """Problems of a ``brain_phantom`` data section (unknown keys included)."""
  errors = builder_lib.check_keys(
      data_cfg, "brain_phantom", ("num_subjects", "snr", "phantom_seed"),
      ("slices_per_subject", "max_lesions"))
  errors += builder_lib.check_contrasts(data_cfg.get("contrasts", ()),
                                        phantom.CONTRASTS, "brain_phantom")
  if data_cfg.get("num_subjects", len(SPLITS)) < len(SPLITS):
    errors.append(f"data.num_subjects={data_cfg.num_subjects} must be >= "
                  f"{len(SPLITS)} (one subject per split)")
  return errors


def _data_field(data_cfg, name: str, default: Any = None) -> Any:
  value = data_cfg.get(name, default)
  if value is None:
    raise ValueError(f"data config lacks {name!r}")
  return value


def load_builder(data_cfg) -> tfds.core.DatasetBuilder:
  """The builder for a ``data`` config section (see configs/common.py).

  Reads ``res``, ``spatial_dims``, ``num_subjects``, ``snr``,
  ``phantom_seed``, ``data_dir`` and, if present, ``slices_per_subject`` and
  ``max_lesions``. Does not build anything.
  """
  dataset = data_cfg.get("dataset", "brain_phantom")
  if dataset != "brain_phantom":
    raise ValueError(f"not a brain_phantom config: dataset={dataset!r}")
  cfg = make_builder_config(
      spatial_dims=int(_data_field(data_cfg, "spatial_dims")),
      res=int(_data_field(data_cfg, "res")),
      num_subjects=int(_data_field(data_cfg, "num_subjects")),
      snr=float(_data_field(data_cfg, "snr")),
      seed=int(_data_field(data_cfg, "phantom_seed")),
      slices_per_subject=int(data_cfg.get("slices_per_subject",
                                          _DEFAULTS["slices_per_subject"])),
      max_lesions=int(data_cfg.get("max_lesions",
                                   _DEFAULTS["max_lesions"])))
  return BrainPhantom(config=cfg,
                      data_dir=str(_data_field(data_cfg, "data_dir")))


def prepare(data_cfg) -> tfds.core.DatasetBuilder:
  """:func:`load_builder`, building the data set first if it is missing."""
  builder = load_builder(data_cfg)
  if not builder.is_prepared():
    builder.download_and_prepare(
        file_format=tfds.core.FileFormat.ARRAY_RECORD,
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False,
            compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder
