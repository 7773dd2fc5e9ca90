"""Shared pieces of every experiment config.

``get_config(arg)`` functions take a ``"key=value,flag"`` string, e.g.
``"res=64,contrast=t1w,runlocal"``. :func:`parse_arg` turns it into a dict and
rejects keys the config does not know, so a typo fails before any compilation.
"""

import os
from typing import Any, Dict, Mapping, Optional

import ml_collections

from medgen_jax.eval import defaults as eval_defaults

CONTRASTS = ("t1w", "t2w", "pd", "flair")


def _convert(value: str, default: Any) -> Any:
  if isinstance(default, bool):
    if value.lower() in ("1", "true", "yes", ""):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"expected a boolean, got {value!r}")
  if isinstance(default, int):
    return int(value)
  if isinstance(default, float):
    return float(value)
  return value


def parse_arg(arg: str, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses ``"k1=v1,k2,k3=v3"`` against ``defaults``.

  A bare key is a boolean switch set to True. Values take the type of their
  default. Unknown keys and unconvertible values raise ``ValueError`` naming
  the key and the allowed keys.
  """
  out: Dict[str, Any] = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(
          f"unknown config arg {key!r} in {arg!r}; known: {sorted(defaults)}")
    try:
      out[key] = _convert(value.strip(), defaults[key]) if "=" in item else True
    except ValueError as e:
      raise ValueError(f"config arg {key!r}: {e}") from None
  return ml_collections.ConfigDict(out)


def default_data_dir() -> str:
  """Where built data sets are cached (``$MEDGEN_DATA_DIR`` overrides)."""
  return os.environ.get(
      "MEDGEN_DATA_DIR",
      os.path.join(os.path.expanduser("~"), ".cache", "medgen_jax", "data"))


def data_config(*, res: int, contrasts=("t2w",), batch_size: int = 32,
                spatial_dims: int = 2, num_subjects: int = 40,
                snr: float = 30.0, seed: int = 0,
                cond: str = "") -> ml_collections.ConfigDict:
  """The ``data`` section for the built-in ``brain_phantom`` data set.

  Args:
    res: in-plane resolution of slices (2D) or cube side of volumes (3D).
    contrasts: which contrasts form the image channels, in order.
    batch_size: global batch size (split over all devices).
    spatial_dims: 2 for axial slices, 3 for volumes.
    num_subjects: virtual subjects simulated (split 70/15/15 by subject).
    snr: Rician-noise SNR of the simulated scans.
    seed: phantom seed (the data set is deterministic given it).
    cond: "" or "label" - which batch key is passed as conditioning.
  """
  return ml_collections.ConfigDict(dict(
      dataset="brain_phantom",
      data_dir=default_data_dir(),
      spatial_dims=spatial_dims,
      res=res,
      num_subjects=num_subjects,
      snr=snr,
      phantom_seed=seed,
      contrasts=tuple(contrasts),
      # Per-contrast intensity normalisation: "minmax" maps [p_low, p_high]
      # percentiles of the training split to [-1, 1]; "zscore" uses its mean
      # and std; "none" keeps physical signal units.
      normalization="minmax",
      clip_percentiles=(0.5, 99.5),
      batch_size=batch_size,
      shuffle_seed=0,
      num_classes=2,            # lesion absent / present
      train_split="train",
      eval_split="val",
      cond=cond,
      # Train on a random subset of the training subjects (small-data
      # experiments); normalisation statistics still use the whole split.
      subject_fraction=1.0,
      subject_seed=0,
      # Binary masks appended to the image as channels in {-1, 1}, so a
      # generator learns images together with their segmentations.
      mask_channels=(),
  ))


# ---------------------------------------------------------------------------
# ``data`` sections for users' own data sets. Each helper returns a complete
# section: the generic keys of :func:`data_config` (batching, normalisation,
# conditioning) without the phantom's, plus the builder's own keys with their
# defaults, so every key can be overridden on the command line. Builders and
# their keys: medgen_jax/data/builders/<dataset>.py.

_PHANTOM_KEYS = ("num_subjects", "snr", "phantom_seed")


def _user_data(dataset: str, *, res: int, contrasts, spatial_dims: int,
               batch_size: int, cond: str, num_classes: int, data_dir: str,
               **builder_keys: Any) -> ml_collections.ConfigDict:
  d = data_config(res=res, contrasts=contrasts, batch_size=batch_size,
                  spatial_dims=spatial_dims, cond=cond).to_dict()
  for k in _PHANTOM_KEYS:
    d.pop(k)
  d.update(dataset=dataset, data_dir=data_dir or default_data_dir(),
           num_classes=num_classes,
           # CT windows per contrast: a preset name (brain, subdural, stroke,
           # bone, lung, abdomen, liver, mediastinum) or (center, width) in
           # HU; a contrast "ct:bone" uses the preset without an entry here.
           windows={},
           # Per-contrast normalisation overriding data.normalization.
           contrast_normalization={},
           **builder_keys)
  return ml_collections.ConfigDict(d)


def _label_keys(label_source: str, labels_csv: str, class_names,
                has_mask: bool) -> Dict[str, Any]:
  source = label_source or ("csv" if labels_csv else
                            "mask" if has_mask else "none")
  return dict(label_source=source, labels_csv=labels_csv,
              subject_column="subject", label_column="label",
              class_names=tuple(class_names))


def _num_classes(label_source: str, class_names) -> int:
  if label_source == "csv":
    return len(class_names)
  return 2 if label_source == "mask" else 1


def _volume_keys(**overrides: Any) -> Dict[str, Any]:
  """Geometry/intensity keys of the volume builders (see volumes.py)."""
  keys = dict(
      slice_axis="axial",         # axial | coronal | sagittal (2D)
      volume_mode="resize",       # 3D: resize | patches (of res^3 voxels)
      patch_stride=0,             # 0: res (no overlap)
      target_spacing=(),          # (x, y, z) mm in RAS order; () = native
      crop_foreground=True,
      crop_margin=2,
      foreground_threshold=0.05,  # fraction of the [p0.5, p99.5] range
      min_foreground=0.05,        # drop slices/patches with less foreground
      keep_aspect=True,           # pad to a square/cube before resizing
      # per-volume: auto (minmax for MR, HU kept for CT) | none | zscore |
      # minmax
      volume_norm="auto",
      volume_percentiles=(0.5, 99.5),
      split_seed=0,
      split_fractions=(0.7, 0.15, 0.15),
  )
  unknown = sorted(set(overrides) - set(keys))
  if unknown:
    raise ValueError(f"unknown data key(s) {unknown}; known: {sorted(keys)}")
  keys.update(overrides)
  return keys


def nifti_data_config(*, root: str, modalities: Mapping[str, str],
                      mask: str = "", mask_values=(), labels_csv: str = "",
                      class_names=(), label_source: str = "", res: int = 64,
                      spatial_dims: int = 2, contrasts=None,
                      batch_size: int = 32, cond: str = "",
                      data_dir: str = "", skip_incomplete: bool = False,
                      affine_tol: float = 1e-3,
                      **volume_keys: Any) -> ml_collections.ConfigDict:
  """The ``data`` section of a ``nifti_folder`` data set.

  Args:
    root: folder with the volumes.
    modalities: feature name -> path pattern relative to ``root`` with
      ``{subject}`` (e.g. ``{"t1": "{subject}/*_t1.nii.gz"}``).
    mask: path pattern of the label maps ("" for none).
    mask_values: allowed label values, stored as their index (BraTS:
      ``(0, 1, 2, 4)``); ``()`` keeps 0..255 as they are.
    labels_csv: per-subject classes (columns ``subject``, ``label`` and
      optionally ``split``), relative to ``root``.
    class_names: the classes, in label order (needed with a labels CSV).
    label_source: ``csv``, ``mask`` (label = the example shows the mask) or
      ``none``; default: ``csv`` with a CSV, else ``mask`` with a mask.
    res: output side; ``spatial_dims`` 2 gives slices, 3 volumes/patches.
    contrasts: image channels (default: all modalities, in order).
    skip_incomplete: skip subjects lacking a file instead of failing.
    affine_tol: largest affine difference (mm) between a subject's volumes.
    **volume_keys: overrides of the geometry keys (``slice_axis``,
      ``target_spacing``, ``volume_norm``, ...; see ``_volume_keys``).
  """
  labels = _label_keys(label_source, labels_csv, class_names, bool(mask))
  return _user_data(
      "nifti_folder", res=res, spatial_dims=spatial_dims,
      contrasts=tuple(contrasts or modalities), batch_size=batch_size,
      cond=cond, data_dir=data_dir,
      num_classes=_num_classes(labels["label_source"], class_names),
      root=root, modalities=dict(modalities), mask=mask,
      mask_values=tuple(mask_values), reorient=True, affine_tol=affine_tol,
      skip_incomplete=skip_incomplete, **labels,
      **_volume_keys(**volume_keys))


def dicom_data_config(*, root: str, series: Optional[Mapping[str, str]] = None,
                      mask: str = "auto", labels_csv: str = "",
                      class_names=(), label_source: str = "", res: int = 64,
                      spatial_dims: int = 2, contrasts=None,
                      batch_size: int = 32, cond: str = "",
                      data_dir: str = "", subject_tag: str = "PatientID",
                      skip_incomplete: bool = False,
                      image_filter: Optional[Mapping[str, Any]] = None,
                      **volume_keys: Any) -> ml_collections.ConfigDict:
  """The ``data`` section of a ``dicom_folder`` data set.

  Args:
    root: folder searched recursively for DICOM files.
    series: feature name -> glob on SeriesDescription (case-insensitive),
      one matching series per subject and feature; default ``{"ct": "*"}``.
    mask: ``auto`` (DICOM-SEG label maps when the series have them) or
      ``none``.
    labels_csv, class_names, label_source, res, spatial_dims, contrasts:
      as in :func:`nifti_data_config`.
    subject_tag: the DICOM attribute naming a subject (``StudyInstanceUID``
      makes every study an example).
    skip_incomplete: skip subjects lacking a series instead of failing.
    image_filter: DICOM attribute -> value every image must have (text as
      a glob), applied before any series is checked: one echo
      (``{"EchoNumbers": 1}``), one time point
      (``{"TemporalPositionIdentifier": 1}``) or the magnitude images
      (``{"ImageType": "*\\M\\*"}``) of a 4D series.
    **volume_keys: overrides of the geometry keys.
  """
  series = dict(series or {"ct": "*"})
  labels = _label_keys(label_source, labels_csv, class_names, False)
  return _user_data(
      "dicom_folder", res=res, spatial_dims=spatial_dims,
      contrasts=tuple(contrasts or series), batch_size=batch_size, cond=cond,
      data_dir=data_dir,
      num_classes=_num_classes(labels["label_source"], class_names),
      root=root, series=series, mask=mask, subject_tag=subject_tag,
      skip_incomplete=skip_incomplete, image_filter=dict(image_filter or {}),
      **labels,
      **_volume_keys(**volume_keys))


def medmnist_data_config(*, flag: str, size: int = 28, res: int = 0,
                         manual_dir: str = "", download: bool = False,
                         contrasts=None, batch_size: int = 32,
                         cond: str = "", data_dir: str = ""
                         ) -> ml_collections.ConfigDict:
  """The ``data`` section of a MedMNIST(+) data set.

  Args:
    flag: e.g. ``pathmnist``, ``chestmnist``, ``organmnist3d``.
    size: 28, 64, 128 or 224 (2D); 28 or 64 (3D): reads
      ``<flag>.npz`` (28) or ``<flag>_<size>.npz`` from ``manual_dir``.
    res: output side if different from ``size`` (resized at build time).
    manual_dir: where the official ``.npz`` files are (default
      ``<data_dir>/downloads/manual``).
    download: fetch a missing file from Zenodo (needs network).
    contrasts: default ``("image",)``, or ``("red", "green", "blue")`` for
      the RGB sets.
  """
  # Imported here: the table is plain data, but configs stay import-light.
  from medgen_jax.data import medmnist_info  # pylint: disable=import-outside-toplevel
  info = medmnist_info.info(flag)
  names = medmnist_info.class_names(flag)
  return _user_data(
      "medmnist", res=res or size, spatial_dims=info.spatial_dims,
      contrasts=tuple(contrasts or medmnist_info.channel_names(flag)),
      batch_size=batch_size, cond=cond, data_dir=data_dir,
      num_classes=len(names), flag=flag, size=size, manual_dir=manual_dir,
      download=download, download_url=medmnist_info.DOWNLOAD_URL)


def image_folder_data_config(*, root: str, labels_csv: str = "",
                             class_names=(), masks_dir: str = "",
                             mask_values=(), color_mode: str = "gray",
                             res: int = 64, contrasts=None,
                             batch_size: int = 32, cond: str = "",
                             data_dir: str = "", **keys: Any
                             ) -> ml_collections.ConfigDict:
  """The ``data`` section of an ``image_folder`` data set (PNG/JPEG/TIFF,
  2D DICOM).

  Args:
    root: folder with the images.
    labels_csv: CSV with columns ``file`` (relative to ``root``), ``label``
      and optionally ``subject`` and ``split``; "" takes the class from the
      first folder level (``root/<class>/<image>``).
    class_names: the classes in label order (required).
    masks_dir: folder with a label map per image at the same relative path
      (any image extension); "" for none.
    mask_values: allowed label values (stored as their index); ``()`` keeps
      0..255.
    color_mode: ``gray`` (feature ``image``) or ``rgb`` (``red``, ``green``,
      ``blue``).
    **keys: ``images_glob``, ``file_column``, ``label_column``,
      ``subject_column``, ``keep_aspect``, ``split_seed``,
      ``split_fractions``; for DICOM files ``dicom_window`` (``auto``:
      the header's VOI window to [0, 1], CT kept in HU; ``header``;
      ``none``; or ``"center/width"``), ``dicom_frames`` (cine loops:
      ``refuse``, ``split`` into images, or the ``middle`` frame) and
      ``subject_tag`` (the attribute naming the patient, so a patient's
      images share a split; "" makes every image its own subject).
  """
  defaults = dict(images_glob="**/*", file_column="file",
                  label_column="label", subject_column="subject",
                  keep_aspect=True, split_seed=0,
                  split_fractions=(0.7, 0.15, 0.15), dicom_window="auto",
                  dicom_frames="refuse", subject_tag="PatientID")
  unknown = sorted(set(keys) - set(defaults))
  if unknown:
    raise ValueError(f"unknown data key(s) {unknown}; known: "
                     f"{sorted(defaults)}")
  channels = ("image",) if color_mode == "gray" else ("red", "green", "blue")
  return _user_data(
      "image_folder", res=res, spatial_dims=2,
      contrasts=tuple(contrasts or channels), batch_size=batch_size,
      cond=cond, data_dir=data_dir, num_classes=len(class_names), root=root,
      labels_csv=labels_csv, class_names=tuple(class_names),
      masks_dir=masks_dir, mask_values=tuple(mask_values),
      color_mode=color_mode, **{**defaults, **keys})


def base_config() -> ml_collections.ConfigDict:
  """Sections common to every generative-method config."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=2e-4, schedule="constant", warmup_steps=100,
      final_lr_frac=0.0, weight_decay=0.0, b1=0.9, b2=0.999, grad_clip=1.0))
  c.train = ml_collections.ConfigDict(dict(
      num_steps=10_000,
      log_every=50,
      ckpt_every=500,
      keep_ckpts=3,
      sample_every=2_000,
      num_grid_samples=16,
      ema=0.999,
      ema_warmup=100,
      # Slices of the batch each step accumulates gradients over (same loss
      # and gradients, 1/n of the activation memory). 0 = auto: 1 on
      # GPU/TPU; on CPU, for per-device batches >= 32, up to 4 of at least 8
      # examples each (faster there).
      microbatches=0,
      # Devices on the data axis (-1: all) and on the parameter-sharding axis.
      mesh_data=-1,
      mesh_fsdp=1,
      # Parameters larger than this many elements are sharded over "fsdp".
      fsdp_min_size=2**18,
      # Multi-process training (docs/multihost.md): True initialises
      # jax.distributed. The three settings below override
      # $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES and $JAX_PROCESS_ID;
      # left unset ("", 0, -1) they come from there or from the cluster
      # (SLURM, TPU pods). num_processes > 1 implies distributed.
      distributed=False,
      coordinator_address="",
      num_processes=0,
      process_id=-1,
  ))
  return c


def augment_config(**overrides: Any) -> ml_collections.ConfigDict:
  """The ``augment`` section: classical on-device augmentation.

  Read by :func:`medgen_jax.data.augment.make_augment_fn`. Every transform
  has its own probability, drawn independently per example. Symmetric ranges
  take a number ``s`` (meaning ``[-s, s]``) or a pair ``(lo, hi)``; ``scale``,
  ``contrast`` and ``noise_std`` take pairs. Defaults are a strong
  TorchIO/MONAI/nnU-Net-like baseline for 2D/3D brain MRI at 32-64 px; scale
  the pixel-valued ``elastic_magnitude_px`` with the resolution.

  Spatial (one resampling of image and masks per example):
    flip_prob: per listed axis, probability of mirroring it.
    flip_axes: spatial axes that may flip (negative counts from the last).
      The default -1 is the patient left-right axis (columns) of the
      phantom's display layout; anatomy is not up-down symmetric.
    affine_prob: probability of a random affine about the image centre.
    rotate_deg: rotation in degrees (in-plane in 2D, about each axis in 3D);
      positive is counter-clockwise as displayed (rows down, columns right).
    scale: per-axis zoom factors (> 1 enlarges the anatomy).
    isotropic_scale: one zoom factor for all axes.
    translate_frac: shift as a fraction of each axis' size.
    shear: off-diagonal shear coefficients.
    elastic_prob: probability of a smooth random elastic deformation.
    elastic_grid: control points per axis (cubic interpolation between).
    elastic_magnitude_px: maximum control-point displacement in pixels.

  Intensity (image only, after the spatial transform, in this order):
    gamma_prob, log_gamma: x01 ** exp(U(log_gamma)) on the per-example,
      per-channel [0, 1]-rescaled intensities (range preserved).
    bias_prob, bias_order, bias_strength: multiplicative field
      exp(polynomial of total degree <= bias_order), coefficients in
      U(-bias_strength, bias_strength), log-mean removed; it scales the
      signal above the background.
    contrast_prob, contrast: (x - mean) * c + mean per channel.
    brightness_prob, brightness: additive shift in normalised units (the
      [-1, 1] range is 2 wide).
    noise_prob, noise_std, noise_type: noise with std ~ U(noise_std),
      "gaussian" or "rician" (magnitude noise on the signal above background).
    clip: "input" clips the result to each example's per-channel input
      range (background stays the minimum); "none" leaves it unclipped.

  Args:
    **overrides: field values replacing the defaults; unknown names raise
      ``ValueError``.
  """
  defaults = dict(
      enabled=True,
      flip_prob=0.5,
      flip_axes=(-1,),
      affine_prob=0.5,
      rotate_deg=10.0,
      scale=(0.9, 1.1),
      isotropic_scale=False,
      translate_frac=0.05,
      shear=0.05,
      elastic_prob=0.25,
      elastic_grid=5,
      elastic_magnitude_px=2.0,
      gamma_prob=0.3,
      log_gamma=0.3,
      bias_prob=0.3,
      bias_order=3,
      bias_strength=0.3,
      contrast_prob=0.2,
      contrast=(0.75, 1.25),
      brightness_prob=0.2,
      brightness=0.1,
      noise_prob=0.2,
      noise_std=(0.0, 0.05),
      noise_type="gaussian",
      clip="input",
  )
  unknown = sorted(set(overrides) - set(defaults))
  if unknown:
    raise ValueError(
        f"unknown augment field(s) {unknown}; known: {sorted(defaults)}")
  # Merged before the ConfigDict exists so an override may change a field's
  # type (a number -> a (lo, hi) pair).
  return ml_collections.ConfigDict({**defaults, **overrides})


AUTOENCODER_ARGS = dict(res=32, contrast="t2w", dims=2, mask=False, steps=0,
                        runlocal=False)


def autoencoder_base(a: ml_collections.ConfigDict, cond: str = ""
                     ) -> ml_collections.ConfigDict:
  """The sections the VAE family shares (``configs/vae.py`` & co): data,
  the conv pyramid of ``model``, optimizer, training and the
  reconstruction evaluator, from the parsed args ``a`` (those of
  :data:`AUTOENCODER_ARGS`)."""
  contrasts = tuple(a.contrast.split("+"))
  for c in contrasts:
    if c not in CONTRASTS:
      raise ValueError(f"contrast {c!r} not in {CONTRASTS}")
  c = base_config()
  big = a.res >= 64
  c.data = data_config(res=a.res, contrasts=contrasts, spatial_dims=a.dims,
                       cond=cond, batch_size=32 if big else 16)
  if a.mask:
    c.data.mask_channels = ("lesion_mask",)
  # res <= 32 is sized for a 2-core CPU (minutes); res >= 64 for a GPU.
  c.model = ml_collections.ConfigDict(dict(
      ch=32 if big else 16, ch_mult=(1, 2, 4, 4) if big else (1, 2, 2),
      num_res_blocks=1, num_groups=8, mid_attention=False, dtype="float32",
      conv_lowering="auto"))
  c.optim.update(lr=1e-3, warmup_steps=100, schedule="cosine",
                 final_lr_frac=0.1)
  steps = a.steps or (20_000 if a.res >= 64 else 3_000)
  c.train.update(num_steps=steps, sample_every=1_000, ckpt_every=500,
                 ema=0.999, ema_warmup=100)
  # Reconstruction PSNR/SSIM into metrics.jsonl with every sample grid.
  c.evals = ml_collections.ConfigDict(dict(
      reconstruction=evaluator("reconstruction", every_steps=1_000,
                               num_examples=256),
      loss=evaluator("loss", every_steps=0, num_batches=8)))
  if a.runlocal:
    c.data.num_subjects = 10
    c.data.batch_size = 8
    c.model.update(ch=8, ch_mult=(1, 2), num_groups=4)
    c.train.update(num_steps=a.steps or 20, log_every=5, ckpt_every=10,
                   sample_every=20, num_grid_samples=4, ema_warmup=5)
    c.optim.warmup_steps = 5
    c.evals.reconstruction.update(every_steps=20, num_examples=16)
    c.evals.loss.num_batches = 2
  return c


def evaluator(type_name: str, **fields: Any) -> ml_collections.ConfigDict:
  """An ``evals`` entry with every field of its type (defaults where not
  given), so each one can be overridden on the command line, e.g.
  ``--config.evals.generative.encoder.steps=600``."""
  return ml_collections.ConfigDict(
      eval_defaults.complete(dict(type=type_name, **fields)))


def generative_eval(runlocal: bool, every_steps: int = 0
                    ) -> ml_collections.ConfigDict:
  """The ``generative`` evaluator (in-domain FID/KID, precision/recall,
  diversity, memorization) of a generator's config."""
  e = evaluator("generative", every_steps=every_steps)
  if runlocal:
    e.update(num_samples=16, kid_subsets=5, kid_subset_size=8, pr_k=2,
             diversity_pairs=8)
    e.encoder.update(width=8, num_groups=4, steps=4, steps_per_call=2,
                     batch_size=8)
  return e
