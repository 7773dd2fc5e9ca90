"""The same train steps on 1 and on 4 (virtual CPU) devices agree."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import json, sys
import jax, numpy as np
from configs import ddpm
from medgen_jax import runtime
from medgen_jax.train import trainer
runtime.enable_compilation_cache()
c = ddpm.get_config("res=16,runlocal")
c.data.data_dir = sys.argv[1]
c.data.num_subjects = 5
c.train.mesh_fsdp = int(sys.argv[2])
c.train.fsdp_min_size = 64
out = {}
for name, devices in (("one", jax.devices()[:1]), ("four", jax.devices())):
  if name == "one":
    c.train.mesh_fsdp = 1
  else:
    c.train.mesh_fsdp = int(sys.argv[2])
  exp = trainer.build_experiment(c, devices)
  state = trainer.init_state(exp)
  step = trainer.jit_train_step(exp)
  losses = []
  for s in range(3):
    batch = trainer.example_batch(exp.data, exp.mesh) if s == 0 else \
        trainer.sharding_lib.global_batch(exp.data.batcher.batch(s),
                                          trainer.sharding_lib.batch_sharding(exp.mesh))
    state, m = step(state, batch, jax.random.fold_in(exp.train_rng, s))
    losses.append(float(m["loss"]))
  shards = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
  out[name] = dict(losses=losses, shards=sorted(shards),
                   params=[np.asarray(x).ravel()[:50].tolist()
                           for x in jax.tree.leaves(state.params)])
print("RESULT" + json.dumps(out))
"""


def _run(data_dir, fsdp):
  # The script imports configs and medgen_jax from this checkout, whatever
  # the interpreter's own sys.path holds.
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=os.pathsep.join(
                 p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  r = subprocess.run([sys.executable, "-c", _SCRIPT, data_dir, str(fsdp)],
                     cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  line = [l for l in r.stdout.splitlines() if l.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


def _assert_same(out):
  one, four = out["one"], out["four"]
  for a, b in zip(one["losses"], four["losses"]):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one["losses"], four["losses"])
  for a, b in zip(one["params"], four["params"]):
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_data_parallel_and_fsdp_match_single_device(tiny_config):
  out = _run(tiny_config.data.data_dir, fsdp=2)  # mesh 2 (data) x 2 (fsdp)
  _assert_same(out)
  # Parameter sharding really happened on the 4-device mesh.
  assert any("fsdp" in s for s in out["four"]["shards"])
  assert all("fsdp" not in s for s in out["one"]["shards"])
