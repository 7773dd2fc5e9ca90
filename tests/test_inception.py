"""FID Inception-V3: forward shape, weights file round trip and its errors,
and the pytorch-fid converter (without the real weights)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from medgen_jax.eval import inception as inc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def variables():
  """Random variables of the right shapes (no init pass: it compiles)."""
  rng = np.random.default_rng(0)
  flat = {}
  for name, shape in inc.expected_shapes().items():
    if name.endswith("/kernel"):
      fan_in = np.prod(shape[:-1])
      flat[name] = rng.normal(0, np.sqrt(2 / fan_in), shape)
    elif name.endswith(("/scale", "/var")):
      flat[name] = rng.uniform(0.5, 1.5, shape)
    else:
      flat[name] = rng.normal(0, 0.1, shape)
  return traverse_util.unflatten_dict(
      {k: v.astype(np.float32) for k, v in flat.items()}, sep="/")


@pytest.fixture(scope="module")
def weights_file(variables, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("inception") / "inception_fid.npz")
  inc.save_variables(variables, path)
  return path


def test_architecture_matches_the_fid_network():
  shapes = inc.expected_shapes()
  # 94 conv + BN layers, each with kernel, scale, bias, mean and var.
  assert len(shapes) == 94 * 5
  assert shapes["params/Conv2d_1a_3x3/kernel"] == (3, 3, 3, 32)
  assert shapes["params/Mixed_6b/branch7x7_2/kernel"] == (1, 7, 128, 128)
  assert shapes["params/Mixed_7c/branch_pool/kernel"] == (1, 1, 2048,
                                                               192)
  assert shapes["batch_stats/Mixed_5b/branch_pool/var"] == (32,)
  n_params = sum(np.prod(s) for k, s in shapes.items()
                 if k.startswith("params/"))
  # torchvision's Inception-V3 (27,161,264) without the auxiliary head
  # (3,326,696) and the 1000-way classifier (2,049,000).
  assert n_params == 21_785_568


def test_forward_shape_on_small_grayscale_input(variables):
  model = inc.InceptionV3(resize=False, input_range=(-1.0, 1.0))
  x = jax.random.uniform(jax.random.key(0), (2, 75, 75, 1), minval=-1.0)
  # The whole network compiles once; light XLA optimisation keeps it quick.
  apply = jax.jit(model.apply).lower(variables, x).compile(compiler_options={
      "xla_backend_optimization_level": 0,
      "xla_llvm_disable_expensive_passes": True})
  feats = apply(variables, x)
  assert feats.shape == (2, inc.FEATURE_DIM) and feats.dtype == jnp.float32
  assert np.isfinite(feats).all() and (feats >= 0).all()  # after ReLU
  assert not np.allclose(feats[0], feats[1])
  with pytest.raises(ValueError, match="75x75 minimum"):
    model.apply(variables, x[:, :40, :40])


def test_preprocess_range_channels_and_resize():
  x = jnp.array([[0.0, 0.5], [1.0, 2.0]]).reshape(1, 2, 2, 1)
  y = inc.preprocess(x, input_range=(0.0, 1.0))
  assert y.shape == (1, inc.INPUT_SIZE, inc.INPUT_SIZE, 3)
  assert float(y.min()) == -1.0 and float(y.max()) == 1.0  # 2.0 is clipped
  np.testing.assert_array_equal(y[..., 0], y[..., 2])
  same = inc.preprocess(2 * x - 1, input_range=(-1.0, 1.0))
  np.testing.assert_allclose(same, y, atol=1e-6)
  with pytest.raises(ValueError, match=r"\[B, H, W, 1\] or \[B, H, W, 3\]"):
    inc.preprocess(jnp.zeros((1, 8, 8, 2)))


def test_weights_round_trip(variables, weights_file):
  loaded = inc.load_variables(weights_file)
  a = traverse_util.flatten_dict(variables, sep="/")
  b = traverse_util.flatten_dict(loaded, sep="/")
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(b[k]), a[k], err_msg=k)


def test_weights_errors_name_file_and_parameter(weights_file, tmp_path):
  missing = str(tmp_path / "nope.npz")
  with pytest.raises(FileNotFoundError, match="nope.npz not found"):
    inc.load_variables(missing)
  with np.load(weights_file) as f:
    arrays = {k: f[k] for k in f.files}
  name = "params/Mixed_6b/branch7x7_2/kernel"
  bad = dict(arrays, **{name: arrays[name].transpose(1, 0, 2, 3)})
  path = str(tmp_path / "bad.npz")
  np.savez(path, **bad)
  with pytest.raises(ValueError) as e:
    inc.load_variables(path)
  assert str(e.value) == (f"{path}: parameter {name} has shape (7, 1, 128, "
                          "128), expected (1, 7, 128, 128)")
  without = {k: v for k, v in arrays.items() if k != name}
  with pytest.raises(ValueError, match=f"x.npz: missing parameter {name} "
                     r"\(expected shape \(1, 7, 128, 128\)\)"):
    inc.check_arrays(without, "x.npz")
  with pytest.raises(ValueError, match="unexpected parameter params/fc"):
    inc.check_arrays(dict(arrays, **{"params/fc/kernel": np.zeros(1)}), "x")
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="garbage.npz: not a readable .npz"):
    inc.load_variables(str(garbage))


def _converter():
  path = os.path.join(ROOT, "experiments", "tools",
                      "convert_inception_weights.py")
  spec = importlib.util.spec_from_file_location("convert_inception", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _pytorch_fid_state(variables):
  """pytorch-fid names and layouts for ``variables`` (plus unused keys)."""
  leaves = {"kernel": "conv.weight", "scale": "bn.weight",
            "bias": "bn.bias", "mean": "bn.running_mean",
            "var": "bn.running_var"}
  state = {}
  for name, value in traverse_util.flatten_dict(variables, sep="/").items():
    _, *layer, leaf = name.split("/")
    value = np.asarray(value)
    if leaf == "kernel":
      value = value.transpose(3, 2, 0, 1)  # [out, in, kh, kw]
    state[".".join(layer) + "." + leaves[leaf]] = value
    state[".".join(layer) + ".bn.num_batches_tracked"] = np.array(0)
  state["fc.weight"] = np.zeros((1008, 2048), np.float32)
  state["fc.bias"] = np.zeros(1008, np.float32)
  return state


def _torch_conv2d(x, w, padding):
  """PyTorch's Conv2d by its definition (cross-correlation), in numpy:
  ``x`` ``[in, H, W]``, ``w`` ``[out, in, kh, kw]``."""
  ph, pw = padding
  x = np.pad(x, ((0, 0), (ph, ph), (pw, pw)))
  kh, kw = w.shape[2:]
  h, wd = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  out = np.zeros((w.shape[0], h, wd))
  for u in range(kh):
    for v in range(kw):
      out += np.einsum("oi,ihw->ohw", w[:, :, u, v], x[:, u:u + h, v:v + wd])
  return out


def test_converter_maps_names_and_layouts(variables):
  conv = _converter()
  state = _pytorch_fid_state(variables)
  arrays = conv.convert_state_dict(state)
  inc.check_arrays(arrays, "converted")  # every name and shape
  # A 1x7 convolution gives PyTorch's output in Flax, so height/width and
  # in/out axes were not swapped.
  layer = "Mixed_6b.branch7x7_2"
  x = np.random.default_rng(1).normal(size=(128, 5, 9)).astype(np.float32)
  want = _torch_conv2d(x, state[layer + ".conv.weight"], (0, 3))
  kernel = arrays["params/Mixed_6b/branch7x7_2/kernel"]
  got = jax.lax.conv_general_dilated(
      jnp.asarray(x.transpose(1, 2, 0))[None], kernel, (1, 1),
      ((0, 0), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(np.asarray(got)[0].transpose(2, 0, 1), want,
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(
      arrays["batch_stats/Mixed_7c/branch_pool/var"],
      state["Mixed_7c.branch_pool.bn.running_var"])
  with pytest.raises(ValueError, match="unrecognised parameter "
                     "classifier.weight"):
    conv.convert_state_dict({"classifier.weight": np.zeros((2, 2))})


def test_converter_reads_pth_and_fails_before_writing(tmp_path):
  torch = pytest.importorskip("torch")
  conv = _converter()
  src, dst = str(tmp_path / "pt_inception.pth"), str(tmp_path / "out.npz")
  weight = torch.arange(6.0).reshape(1, 2, 3, 1)
  torch.save({"Conv2d_1a_3x3.conv.weight": weight}, src)
  state = conv.load_torch_state_dict(src)
  np.testing.assert_array_equal(state["Conv2d_1a_3x3.conv.weight"],
                                weight.numpy())
  # An incomplete state dict fails naming the input; nothing is written.
  with pytest.raises(ValueError, match="pt_inception.pth: missing parameter "
                     "batch_stats/Conv2d_1a_3x3/mean"):
    conv.convert_file(src, dst)
  assert not os.path.exists(dst)
  with pytest.raises(FileNotFoundError, match="nothing.pth"):
    conv.convert_file(str(tmp_path / "nothing.pth"), dst)
  (tmp_path / "junk.pth").write_bytes(b"junk")
  with pytest.raises(ValueError, match="junk.pth: not a readable PyTorch"):
    conv.convert_file(str(tmp_path / "junk.pth"), dst)
