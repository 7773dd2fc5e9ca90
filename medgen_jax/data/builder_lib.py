"""Shared machinery of the builders for users' own data sets.

Every folder builder (``nifti_folder``, ``dicom_folder``, ``medmnist``,
``image_folder``) follows the same steps in its ``prepare(data_cfg)``:

1. read its settings from the ``data`` config section (:func:`settings_from`),
2. list the source files and check what can be checked without reading
   pixels (missing files, labels, splits),
3. name the TFDS config after a hash of the settings and of the source files'
   paths, sizes and modification times (:func:`config_name`), so changed
   settings or changed data build into a new directory,
4. build into a temporary directory that is renamed when complete
   (:func:`build`); a failed build leaves nothing behind.

Bad input raises :class:`DataError` with one message naming the file and the
problem.
"""

import csv
import dataclasses
import hashlib
import json
import os
import re
import shutil
from typing import (Any, Dict, Iterable, List, Mapping, Optional, Sequence,
                    Tuple)

import numpy as np
import tensorflow_datasets as tfds

from medgen_jax import errors

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
VERSION = "1.0.0"

# Keys of the ``data`` section read by the input pipeline and the trainer for
# every data set; a builder adds its own (see ``validate_config`` of each
# builder module). Add a key here when the pipeline starts reading it.
REQUIRED_DATA_KEYS = (
    "dataset", "data_dir", "spatial_dims", "res", "contrasts",
    "normalization", "clip_percentiles", "batch_size", "shuffle_seed",
    "num_classes", "train_split", "eval_split", "cond",
)
GENERIC_DATA_KEYS = REQUIRED_DATA_KEYS + (
    "windows", "contrast_normalization", "subject_fraction", "subject_seed",
    "mask_channels", "unpaired",
)


class DataError(errors.UserError, ValueError):
  """Bad input data; the message names the file and the problem."""


def file_error(path: str, problem: str) -> DataError:
  return DataError(f"{path}: {problem}")


def describe(e: BaseException) -> str:
  """``"Type: message"`` on one line (library messages may span lines)."""
  return f"{type(e).__name__}: {' '.join(str(e).split())}"


# ------------------------------------------------------------------ config --


def check_keys(data_cfg, dataset: str, required: Iterable[str],
               optional: Iterable[str] = ()) -> List[str]:
  """Messages for missing builder keys and keys no one reads.

  Returns:
    one message per problem (empty when the section is complete).
  """
  required, optional = tuple(required), tuple(optional)
  known = set(GENERIC_DATA_KEYS) | set(required) | set(optional)
  errors = [f"data.{k} is missing (required by data.dataset={dataset!r})"
            for k in required if k not in data_cfg]
  for k in sorted(set(data_cfg.keys()) - known):
    errors.append(
        f"data.{k} is not a key of data.dataset={dataset!r} (its keys: "
        f"{sorted(set(required) | set(optional))}; generic keys: "
        f"{sorted(GENERIC_DATA_KEYS)} in medgen_jax/data/builder_lib.py)")
  return errors


def plain(value: Any) -> Any:
  """ConfigDicts, tuples and numpy scalars -> JSON-able python values."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def settings_from(cls, data_cfg, **overrides):
  """An instance of the settings dataclass ``cls`` from the ``data`` section.

  Fields missing from ``data_cfg`` keep their defaults; lists become tuples
  (hashable, frozen).
  """
  values = {}
  for f in dataclasses.fields(cls):
    if f.name in overrides:
      values[f.name] = overrides[f.name]
    elif f.name in data_cfg:
      v = plain(data_cfg[f.name])
      values[f.name] = tuple(v) if isinstance(v, list) else v
  return cls(**values)


def settings_json(settings) -> str:
  return json.dumps(plain(dataclasses.asdict(settings)), sort_keys=True)


def source_fingerprint(paths: Iterable[str]) -> str:
  """Hash of the files' paths, sizes and modification times."""
  h = hashlib.sha256()
  for p in sorted(set(paths)):
    st = os.stat(p)
    h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()


def config_name(prefix: str, settings, fingerprint: str = "") -> str:
  """``<prefix>_<12 hex>``: a hash of the settings and the source files."""
  h = hashlib.sha256((settings_json(settings) + fingerprint).encode())
  slug = "".join(c if c.isalnum() else "_" for c in prefix.lower())
  return f"{slug}_{h.hexdigest()[:12]}"


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  """TFDS config of a folder data set; ``settings`` is canonical JSON."""

  # Not in the repr: TFDS logs the config, and the name already hashes it.
  settings: str = dataclasses.field(default="{}", repr=False)


# ------------------------------------------------------------------ splits --


def assign_splits(subjects: Sequence[str], seed: int,
                  fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
                  explicit: Optional[Mapping[str, str]] = None,
                  source: str = "") -> Dict[str, List[str]]:
  """Disjoint subject lists per split, deterministic given ``seed``.

  Subjects are sorted before the seeded permutation, so the split does not
  depend on the order files are listed in. ``explicit`` (subject -> split,
  e.g. a ``split`` column of the labels CSV) overrides the random split.

  Raises:
    DataError: fewer subjects than splits, or an empty split.
  """
  subjects = sorted(subjects)
  where = f" in {source}" if source else ""
  if explicit:
    out = {s: [] for s in SPLITS}
    for subject in subjects:
      out[explicit[subject]].append(subject)
    empty = [s for s in SPLITS if not out[s]]
    if empty:
      raise DataError(f"the split column{where} assigns no subject to "
                      f"{empty}; every split needs at least one")
    return out
  if len(subjects) < len(SPLITS):
    raise DataError(f"need at least {len(SPLITS)} subjects (one per split), "
                    f"found {len(subjects)}{where}")
  fractions = np.asarray(fractions, np.float64)
  if fractions.shape != (3,) or (fractions < 0).any() or fractions.sum() <= 0:
    raise DataError(f"data.split_fractions must be 3 non-negative numbers, "
                    f"got {tuple(fractions)}")
  fractions = fractions / fractions.sum()
  n = len(subjects)
  n_val, n_test = (max(1, int(round(f * n))) for f in fractions[1:])
  if n - n_val - n_test < 1:
    n_val, n_test = 1, 1
  rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5B117]))
  perm = [subjects[i] for i in rng.permutation(n)]
  bounds = (n - n_val - n_test, n - n_test)
  return {"train": sorted(perm[:bounds[0]]),
          "val": sorted(perm[bounds[0]:bounds[1]]),
          "test": sorted(perm[bounds[1]:])}


# ------------------------------------------------------------------- CSV ----


@dataclasses.dataclass(frozen=True)
class CsvTable:
  """Rows of a CSV file keyed by one column (row numbers kept for errors)."""

  path: str
  key_column: str
  rows: Dict[str, Dict[str, str]]
  line: Dict[str, int]


def read_csv_table(path: str, key_column: str,
                   columns: Sequence[str] = ()) -> CsvTable:
  """Reads ``path`` keyed by ``key_column``; ``columns`` must exist.

  Raises:
    DataError: missing/empty file, missing columns, empty or duplicate keys.
  """
  if not os.path.isfile(path):
    raise file_error(path, "labels CSV not found")
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
      raise file_error(path, "empty CSV (no header row)")
    reader.fieldnames = header
    missing = [c for c in (key_column, *columns) if c not in header]
    if missing:
      raise file_error(path, f"no column(s) {missing}; the header has "
                       f"{header}")
    rows, line = {}, {}
    for row in reader:
      lineno = reader.line_num
      key = (row.get(key_column) or "").strip()
      if not key:
        raise file_error(path, f"line {lineno}: empty {key_column!r}")
      if key in rows:
        raise file_error(path, f"line {lineno}: {key_column} {key!r} appears "
                         f"twice (first on line {line[key]})")
      rows[key] = {k: (v or "").strip() for k, v in row.items() if k}
      line[key] = lineno
  if not rows:
    raise file_error(path, "no data rows")
  return CsvTable(path, key_column, rows, line)


def class_index(value: str, class_names: Sequence[str]) -> Optional[int]:
  """Index of ``value``: a class name, or an integer index into the names."""
  if value in class_names:
    return list(class_names).index(value)
  try:
    i = int(value)
  except ValueError:
    return None
  return i if 0 <= i < len(class_names) and str(i) == value else None


def labels_from_table(table: CsvTable, keys: Sequence[str], column: str,
                      class_names: Sequence[str]) -> Dict[str, int]:
  """Class index per key from ``table[column]``.

  Raises:
    DataError: a key without a row, or a value that is not a class.
  """
  out = {}
  for key in keys:
    if key not in table.rows:
      raise file_error(table.path, f"no row for {table.key_column} {key!r} "
                       "(every subject/image needs a label)")
    value = table.rows[key][column]
    idx = class_index(value, class_names)
    if idx is None:
      raise file_error(
          table.path, f"line {table.line[key]}: unknown label {value!r} for "
          f"{key!r}; data.class_names={tuple(class_names)} (a name or its "
          "index)")
    out[key] = idx
  return out


def splits_from_table(table: CsvTable, keys: Sequence[str],
                      column: str = "split") -> Optional[Dict[str, str]]:
  """Explicit split per key if the table has a ``split`` column."""
  if not table.rows or column not in next(iter(table.rows.values())):
    return None
  out = {}
  for key in keys:
    value = table.rows[key][column].lower()
    if value not in SPLITS:
      raise file_error(table.path, f"line {table.line[key]}: split {value!r} "
                       f"for {key!r} must be one of {SPLITS}")
    out[key] = value
  return out


# ---------------------------------------------------------------- features --


def image_features(names: Iterable[str], shape: Tuple[int, ...],
                   masks: Iterable[str] = ()) -> Dict[str, Any]:
  """float32 Tensor per channel name and uint8 Tensor per mask."""
  out = {n: tfds.features.Tensor(shape=shape, dtype=np.float32)
         for n in names}
  out.update({m: tfds.features.Tensor(shape=shape, dtype=np.uint8)
              for m in masks})
  return out


def id_features(slice_index: bool = True) -> Dict[str, Any]:
  """``subject_id`` (int, as the phantom), ``subject`` (name), slice index."""
  out = {"subject_id": tfds.features.Tensor(shape=(), dtype=np.int32),
         "subject": tfds.features.Text()}
  if slice_index:
    out["slice_index"] = tfds.features.Tensor(shape=(), dtype=np.int32)
  return out


def require_examples(count: int, split: str, hint: str) -> None:
  if not count:
    raise DataError(f"split {split!r} has no examples: {hint}")


# ------------------------------------------------------------------ build ---


def _remove_empty_dirs(path: str, stop: str) -> None:
  """Removes ``path`` and its parents up to ``stop`` while they are empty."""
  path, stop = os.path.abspath(path), os.path.abspath(stop)
  while path.startswith(stop + os.sep) and os.path.isdir(path):
    if os.listdir(path):
      return
    os.rmdir(path)
    path = os.path.dirname(path)


def build(builder: tfds.core.DatasetBuilder, data_dir: str
          ) -> tfds.core.DatasetBuilder:
  """Builds ``builder`` if needed; on failure leaves no trace in ``data_dir``.

  TFDS writes into ``incomplete.*`` and renames it when every split is done
  (and deletes it on error); the empty config directories it made on the way
  are removed here too.
  """
  if builder.is_prepared():
    return builder
  version_dir = os.fspath(builder.data_dir)
  try:
    builder.download_and_prepare(
        file_format=tfds.core.FileFormat.ARRAY_RECORD,
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False,
            compute_stats=tfds.download.ComputeStatsMode.SKIP))
  except BaseException:
    _remove_empty_dirs(os.path.dirname(version_dir), data_dir)
    for sub in ("downloads/extracted", "downloads"):
      _remove_empty_dirs(os.path.join(data_dir, sub), data_dir)
    raise
  return builder


def damage(builder: tfds.core.DatasetBuilder) -> Optional[str]:
  """What is wrong with a built data set's files, ``None`` if nothing.

  Opens every split and reads the first and last record of every shard (a
  truncated ArrayRecord file fails on open or on its last record) and
  compares the counts with ``dataset_info.json``; cheap next to training.
  """
  for split, info in builder.info.splits.items():
    try:
      source = builder.as_data_source(split=split)
      if len(source) != info.num_examples:
        return (f"split {split!r} has {len(source)} of its "
                f"{info.num_examples} examples")
      start = 0
      for length in info.shard_lengths or [info.num_examples]:
        if length:
          _ = source[start], source[start + length - 1]
        start += length
    except Exception as e:  # pylint: disable=broad-except
      # ArrayRecord, TFDS and protobuf each raise their own types.
      return f"split {split!r}: {describe(e)[:300]}"
  return None


def discard(version_dir: str) -> None:
  """Removes a damaged built data set: renamed aside first, so no reader
  ever sees it half-deleted, then deleted (it is derived data: the sources
  rebuild it)."""
  aside = f"{version_dir}.damaged{os.getpid()}"
  os.replace(version_dir, aside)
  shutil.rmtree(aside, ignore_errors=True)


def prepared_builder(data_dir: str, builder_name: str, name: str
                     ) -> Optional[tfds.core.DatasetBuilder]:
  """The finished data set ``<data_dir>/<builder>/<name>/<version>``, if any.

  Read back from its own ``dataset_info.json``/``features.json``, so a data
  set that is already built is opened without scanning its sources again
  (a DICOM folder would re-read every header).
  """
  path = os.path.join(str(data_dir), builder_name, name, VERSION)
  if not os.path.isfile(os.path.join(path, "dataset_info.json")):
    return None
  return tfds.builder_from_directory(path)


def atomic_write_bytes(path: str, chunks: Iterable[bytes]) -> None:
  """Writes ``chunks`` to ``path`` via a temp file and rename."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      for chunk in chunks:
        f.write(chunk)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def walk_files(root: str) -> List[str]:
  """Sorted paths relative to ``root`` (posix separators), hidden skipped."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    rel = os.path.relpath(dirpath, root)
    for name in filenames:
      if not name.startswith("."):
        out.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
  return sorted(out)


def require_dir(root: str, key: str = "data.root") -> str:
  """``root`` as an absolute path; it must be an existing directory."""
  if not str(root or ""):
    raise DataError(f"{key} is empty: set it to the folder with your data")
  path = os.path.abspath(os.path.expanduser(str(root)))
  if not os.path.isdir(path):
    raise DataError(f"{path}: {key} is not a directory")
  return path


def check_contrasts(contrasts: Sequence[str], features: Sequence[str],
                    dataset: str) -> List[str]:
  """``data.contrasts`` must name features (``"ct:bone"`` reads ``ct``)."""
  if not contrasts:
    return []  # reported by the generic checks.
  bad = [c for c in contrasts if str(c).split(":", 1)[0] not in features]
  if bad:
    return [f"data.contrasts {bad} are not features of data.dataset="
            f"{dataset!r} (has {list(features)}; 'name:window' applies a CT "
            "window to feature 'name')"]
  return []


def check_num_classes(data_cfg, class_names: Sequence[str]) -> List[str]:
  n = data_cfg.get("num_classes")
  if n != len(class_names):
    return [f"data.num_classes={n!r} must equal the number of classes "
            f"{len(class_names)} ({tuple(class_names)})"]
  return []


def resolve_path(path: str, root: str) -> str:
  """``path`` made absolute relative to ``root`` ('' stays '')."""
  if not path:
    return ""
  path = os.path.expanduser(str(path))
  return path if os.path.isabs(path) else os.path.join(root, path)


LABEL_SOURCES = ("csv", "mask", "none")


@dataclasses.dataclass(frozen=True)
class LabelSettings:
  """Where per-subject (or per-example) class labels come from.

  Attributes:
    label_source: ``csv`` (a column of ``labels_csv``), ``mask`` (whether the
      example shows any labelled voxel: 0/1) or ``none`` (every label 0).
    labels_csv: CSV with one row per subject; relative to ``data.root``. An
      optional ``split`` column (train/val/test) fixes the split.
    subject_column: the CSV column holding subject names.
    label_column: the CSV column holding class names (or indices).
    class_names: the classes in label order (required with ``csv``).
  """

  label_source: str = "none"
  labels_csv: str = ""
  subject_column: str = "subject"
  label_column: str = "label"
  class_names: Tuple[str, ...] = ()

  def names(self) -> Tuple[str, ...]:
    if self.label_source == "csv":
      return tuple(self.class_names)
    if self.label_source == "mask":
      return tuple(self.class_names) or ("absent", "present")
    return ("all",)

  def problems(self, has_mask: bool) -> List[str]:
    out = []
    if self.label_source not in LABEL_SOURCES:
      out.append(f"data.label_source={self.label_source!r} must be one of "
                 f"{LABEL_SOURCES}")
    elif self.label_source == "csv":
      if not self.labels_csv:
        out.append("data.label_source='csv' needs data.labels_csv")
      if not self.class_names:
        out.append("data.label_source='csv' needs data.class_names (the "
                   "classes in label order)")
    elif self.label_source == "mask":
      if not has_mask:
        out.append("data.label_source='mask' needs a label map (data.mask)")
      if self.class_names and len(self.class_names) != 2:
        out.append(f"data.class_names={tuple(self.class_names)} must have 2 "
                   "names with data.label_source='mask'")
    if len(set(self.class_names)) != len(self.class_names):
      out.append(f"data.class_names={tuple(self.class_names)} has duplicates")
    return out


def subject_labels(cfg: LabelSettings, subjects: Sequence[str], root: str
                   ) -> Tuple[Dict[str, int], Optional[Dict[str, str]]]:
  """``(label per subject, explicit split per subject or None)``.

  Labels are 0 unless ``label_source == "csv"`` (``mask`` labels are set
  per example). The CSV is read whenever it is given, for its ``split``
  column.
  """
  labels = {s: 0 for s in subjects}
  if not cfg.labels_csv:
    return labels, None
  path = resolve_path(cfg.labels_csv, root)
  columns = (cfg.label_column,) if cfg.label_source == "csv" else ()
  table = read_csv_table(path, cfg.subject_column, columns)
  if cfg.label_source == "csv":
    labels = labels_from_table(table, subjects, cfg.label_column,
                               cfg.class_names)
  splits = splits_from_table(table, subjects) if all(
      s in table.rows for s in subjects) else None
  if splits is None and "split" in next(iter(table.rows.values())):
    missing = sorted(set(subjects) - set(table.rows))
    raise file_error(path, f"no row for subjects {missing[:5]} (the split "
                     "column must cover every subject)")
  return labels, splits


def pattern_regex(pattern: str) -> "re.Pattern[str]":
  """Regex of a path pattern; ``{subject}`` is the named group ``subject``.

  ``*`` matches within one path component, ``**/`` any number of folders,
  ``?`` one character; a repeated ``{subject}`` must match the same name.
  """
  out, i, seen = [], 0, False
  while i < len(pattern):
    if pattern.startswith("{subject}", i):
      out.append("(?P=subject)" if seen else "(?P<subject>[^/]+?)")
      seen, i = True, i + len("{subject}")
    elif pattern.startswith("**/", i):
      out.append("(?:[^/]+/)*")
      i += 3
    elif pattern[i] == "*":
      out.append("[^/]*")
      i += 1
    elif pattern[i] == "?":
      out.append("[^/]")
      i += 1
    else:
      out.append(re.escape(pattern[i]))
      i += 1
  return re.compile("".join(out))
