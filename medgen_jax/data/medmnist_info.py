"""Metadata of the MedMNIST v2/v3 and MedMNIST+ data sets.

Task types, class names and channel counts of the 12 2D and 6 3D data sets
(Yang et al., "MedMNIST v2 - A large-scale lightweight benchmark for 2D and
3D biomedical image classification", Scientific Data 10, 2023). Files are
``<flag>.npz`` (28 px) or ``<flag>_<size>.npz`` (MedMNIST+: 64, 128, 224 px
in 2D; 64 voxels in 3D) with ``{train,val,test}_{images,labels}`` arrays.
Plain data, importable by configs without pulling in TFDS.
"""

import dataclasses
from typing import Dict, Tuple

DOWNLOAD_URL = "https://zenodo.org/records/10519652/files/{file}?download=1"
TASKS = ("multi-class", "binary-class", "multi-label", "ordinal-regression")
SIZES_2D = (28, 64, 128, 224)
SIZES_3D = (28, 64)

_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left",
           "kidney-right", "liver", "lung-left", "lung-right", "pancreas",
           "spleen")


@dataclasses.dataclass(frozen=True)
class MedMnistInfo:
  """One data set.

  Attributes:
    task: one of :data:`TASKS`.
    labels: class names in label order (for ``multi-label``: the findings,
      one binary label each).
    n_channels: 1 (grayscale) or 3 (RGB).
    spatial_dims: 2 or 3.
    modality: imaging modality, as described by MedMNIST.
  """

  task: str
  labels: Tuple[str, ...]
  n_channels: int
  spatial_dims: int
  modality: str


INFO: Dict[str, MedMnistInfo] = {
    "pathmnist": MedMnistInfo(
        "multi-class",
        ("adipose", "background", "debris", "lymphocytes", "mucus",
         "smooth muscle", "normal colon mucosa", "cancer-associated stroma",
         "colorectal adenocarcinoma epithelium"), 3, 2,
        "colon pathology"),
    "chestmnist": MedMnistInfo(
        "multi-label",
        ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass",
         "nodule", "pneumonia", "pneumothorax", "consolidation", "edema",
         "emphysema", "fibrosis", "pleural", "hernia"), 1, 2,
        "chest X-ray"),
    "dermamnist": MedMnistInfo(
        "multi-class",
        ("actinic keratoses and intraepithelial carcinoma",
         "basal cell carcinoma", "benign keratosis-like lesions",
         "dermatofibroma", "melanoma", "melanocytic nevi",
         "vascular lesions"), 3, 2, "dermatoscope"),
    "octmnist": MedMnistInfo(
        "multi-class",
        ("choroidal neovascularization", "diabetic macular edema", "drusen",
         "normal"), 1, 2, "retinal OCT"),
    "pneumoniamnist": MedMnistInfo(
        "binary-class", ("normal", "pneumonia"), 1, 2, "chest X-ray"),
    "retinamnist": MedMnistInfo(
        "ordinal-regression", ("0", "1", "2", "3", "4"), 3, 2,
        "fundus camera"),
    "breastmnist": MedMnistInfo(
        "binary-class", ("malignant", "normal, benign"), 1, 2,
        "breast ultrasound"),
    "bloodmnist": MedMnistInfo(
        "multi-class",
        ("basophil", "eosinophil", "erythroblast",
         "immature granulocytes(myelocytes, metamyelocytes and "
         "promyelocytes)", "lymphocyte", "monocyte", "neutrophil",
         "platelet"), 3, 2, "blood cell microscope"),
    "tissuemnist": MedMnistInfo(
        "multi-class",
        ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
         "Glomerular endothelial cells", "Interstitial endothelial cells",
         "Leukocytes", "Podocytes", "Proximal Tubule Segments",
         "Thick Ascending Limb"), 1, 2, "kidney cortex microscope"),
    "organamnist": MedMnistInfo("multi-class", _ORGANS, 1, 2,
                                "abdominal CT (axial)"),
    "organcmnist": MedMnistInfo("multi-class", _ORGANS, 1, 2,
                                "abdominal CT (coronal)"),
    "organsmnist": MedMnistInfo("multi-class", _ORGANS, 1, 2,
                                "abdominal CT (sagittal)"),
    "organmnist3d": MedMnistInfo("multi-class", _ORGANS, 1, 3,
                                 "abdominal CT"),
    "nodulemnist3d": MedMnistInfo("binary-class", ("benign", "malignant"),
                                  1, 3, "chest CT"),
    "adrenalmnist3d": MedMnistInfo("binary-class", ("normal", "hyperplasia"),
                                   1, 3, "shape from abdominal CT"),
    "fracturemnist3d": MedMnistInfo(
        "multi-class",
        ("buckle rib fracture", "nondisplaced rib fracture",
         "displaced rib fracture"), 1, 3, "chest CT"),
    "vesselmnist3d": MedMnistInfo("binary-class", ("vessel", "aneurysm"), 1,
                                  3, "shape from brain MRA"),
    "synapsemnist3d": MedMnistInfo(
        "binary-class", ("inhibitory synapse", "excitatory synapse"), 1, 3,
        "electron microscope"),
}

# A multi-label set gets one class label too (for conditioning): whether
# any finding is present; the findings themselves are kept as a vector.
MULTI_LABEL_CLASSES = ("no_finding", "finding")


def info(flag: str) -> MedMnistInfo:
  if flag not in INFO:
    raise ValueError(f"unknown MedMNIST data set {flag!r}; known: "
                     f"{sorted(INFO)}")
  return INFO[flag]


def sizes(flag: str) -> Tuple[int, ...]:
  return SIZES_3D if info(flag).spatial_dims == 3 else SIZES_2D


def file_name(flag: str, size: int) -> str:
  """``pathmnist.npz`` for 28 px, ``pathmnist_224.npz`` otherwise."""
  if size not in sizes(flag):
    raise ValueError(f"{flag} comes in sizes {sizes(flag)}, not {size}")
  return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def class_names(flag: str) -> Tuple[str, ...]:
  """Names of the ``label`` classes (multi-label: finding / no finding)."""
  i = info(flag)
  return MULTI_LABEL_CLASSES if i.task == "multi-label" else i.labels


def channel_names(flag: str) -> Tuple[str, ...]:
  return ("red", "green", "blue") if info(flag).n_channels == 3 else (
      "image",)
