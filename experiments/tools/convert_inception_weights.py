r"""Converts pytorch-fid's Inception-V3 weights to the ``.npz`` of
:mod:`medgen_jax.eval.inception`.

  python -m experiments.tools.convert_inception_weights \
      --input=pt_inception-2015-12-05-6726825d.pth --output=inception_fid.npz

from the repository root (or ``python experiments/tools/...`` with the
package installed, ``pip install -e .``).

The input is the state dict that pytorch-fid loads for FID (its weights were
ported from TensorFlow's inception-2015-12-05 graph); get the file yourself,
nothing is downloaded here. Needs ``torch`` (only this script does).

Mapping (``X`` is a layer path such as ``Mixed_5b.branch1x1``):

  X.conv.weight [out, in, kh, kw]  ->  params/X/kernel [kh, kw, in, out]
  X.bn.weight / X.bn.bias          ->  params/X/scale / params/X/bias
  X.bn.running_mean / running_var  ->  batch_stats/X/mean / batch_stats/X/var
  X.bn.num_batches_tracked, fc.*, AuxLogits.*  ->  dropped (unused for pool3)

The result is checked name by name and shape by shape against the Flax
network before it is written (atomically), so a wrong file fails here, naming
the first mismatched parameter.
"""

import argparse
import importlib.util
import os
from typing import Dict, Mapping

import numpy as np

# Suffix of a PyTorch name -> (Flax collection, Flax leaf name).
_LEAVES = {
    "conv.weight": ("params", "kernel"),
    "bn.weight": ("params", "scale"),
    "bn.bias": ("params", "bias"),
    "bn.running_mean": ("batch_stats", "mean"),
    "bn.running_var": ("batch_stats", "var"),
}
_DROPPED_SUFFIXES = ("bn.num_batches_tracked",)
_DROPPED_PREFIXES = ("fc.", "AuxLogits.")


def flax_name(torch_name: str) -> str:
  """``Mixed_5b.branch1x1.conv.weight`` -> ``params/Mixed_5b/branch1x1/
  kernel``; empty for names that are dropped."""
  if torch_name.startswith(_DROPPED_PREFIXES) or torch_name.endswith(
      _DROPPED_SUFFIXES):
    return ""
  for suffix, (collection, leaf) in _LEAVES.items():
    if torch_name.endswith("." + suffix):
      layer = torch_name[:-len(suffix) - 1].replace(".", "/")
      return f"{collection}/{layer}/{leaf}"
  raise ValueError(f"unrecognised parameter {torch_name}: not an Inception "
                   "BasicConv2d (conv + bn) parameter")


def convert_state_dict(
    state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """PyTorch names and layouts -> the flattened Flax ``.npz`` arrays."""
  out = {}
  for name, value in state.items():
    key = flax_name(name)
    if not key:
      continue
    value = np.asarray(value, np.float32)
    if key.endswith("/kernel"):
      if value.ndim != 4:
        raise ValueError(f"{name}: expected a 4-d convolution weight, got "
                         f"shape {value.shape}")
      value = value.transpose(2, 3, 1, 0)
    out[key] = value
  return out


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
  """The tensors of a ``.pth`` state dict, as numpy arrays."""
  import torch  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle, zip and torch errors alike
    raise ValueError(f"{path}: not a readable PyTorch state dict ({e})") from e
  if not isinstance(state, Mapping) or not all(
      isinstance(v, torch.Tensor) for v in state.values()):
    raise ValueError(f"{path}: expected a state dict of tensors")
  return {k: v.detach().cpu().numpy() for k, v in state.items()}


def convert_file(src: str, dst: str) -> int:
  """Converts ``src`` (``.pth``) into ``dst`` (``.npz``); returns the number
  of arrays written."""
  # pylint: disable=import-outside-toplevel
  from flax import traverse_util
  from medgen_jax.eval import inception
  state = load_torch_state_dict(src)
  try:
    arrays = convert_state_dict(state)
  except ValueError as e:
    raise ValueError(f"{src}: {e}") from e
  inception.check_arrays(arrays, src)
  inception.save_variables(traverse_util.unflatten_dict(arrays, sep="/"), dst)
  return len(arrays)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--input", required=True, help="pytorch-fid .pth file")
  p.add_argument("--output", required=True, help=".npz to write")
  args = p.parse_args(argv)
  if importlib.util.find_spec("medgen_jax") is None:
    p.error("medgen_jax is not importable: run this as `python -m "
            "experiments.tools.convert_inception_weights` from the "
            "repository root, or `pip install -e .` first")
  n = convert_file(args.input, args.output)
  print(f"wrote {n} arrays to {args.output}")


if __name__ == "__main__":
  main()
