"""The generic training loop: any method, any mesh.

The trainer owns everything a method should not care about: the mesh and
shardings, jit, checkpoint/resume, EMA (through the method's update), metric
writing, progress reporting and periodic sample grids. Steps, data order and
per-step PRNG keys are functions of the step number, so a resumed run
continues exactly where the last checkpoint left it.

In a multi-process run (docs/multihost.md) every process runs this loop on
its own slice of each global batch; process 0 alone writes the workdir's
files (config, metrics, grids, TensorBoard events), orbax writes the
checkpoints from all of them, and a signal to any process stops all of them
after the same step.
"""

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview

from medgen_jax import errors
from medgen_jax import jsonl
from medgen_jax import runtime
from medgen_jax import sampling
from medgen_jax import viz
from medgen_jax.data import pipeline
from medgen_jax.eval import registry as eval_registry
from medgen_jax.methods import base as methods
from medgen_jax.train import checkpoint
from medgen_jax.train import frozen as frozen_lib
from medgen_jax.train import interrupts as interrupts_lib
from medgen_jax.train import sharding as sharding_lib
from medgen_jax.train import state as state_lib

PyTree = Any


class NonFiniteLossError(errors.NonFiniteError):
  """Raised when a logged training metric becomes NaN or Inf."""


def is_primary() -> bool:
  """This process writes the workdir's files (process 0 of a multi-process
  run; every one-process run)."""
  return jax.process_index() == 0


def _sync_processes(name: str) -> None:
  """Waits until every process got here (no-op in a one-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def _prepare_data(data_cfg: ml_collections.ConfigDict) -> None:
  """Builds a missing data set once, on process 0, before the others read
  it: processes building it together would write the same files at once."""
  if jax.process_count() > 1:
    if is_primary():
      pipeline.prepare(data_cfg)
    _sync_processes("medgen_jax: data set prepared")


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything built from a config before the first compilation."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  data: pipeline.TrainData
  method: methods.Method
  abstract_state: PyTree
  state_shardings: PyTree
  init_rng: jax.Array
  train_rng: jax.Array
  sample_rng: jax.Array
  # Inputs read from other runs (``state.frozen``), or None.
  frozen: Optional[frozen_lib.FrozenInputs] = None


def example_batch(data: pipeline.TrainData,
                  mesh: jax.sharding.Mesh) -> Dict[str, jax.Array]:
  """The step-0 global batch; methods use it for shapes only."""
  return sharding_lib.global_batch(data.batcher.batch(0),
                                   sharding_lib.batch_sharding(mesh))


def build_experiment(config: ml_collections.ConfigDict,
                     devices=None) -> Experiment:
  """Mesh, data, method and state layout (traces shapes, compiles nothing).

  ``devices`` restricts the mesh (default: all devices).
  """
  mesh = sharding_lib.make_mesh(config.train, devices)
  _prepare_data(config.data)
  data = pipeline.make_train_data(config.data)
  batch = example_batch(data, mesh)
  method = methods.build(config, batch)
  _, train_rng, sample_rng = jax.random.split(jax.random.key(config.seed), 3)
  init_rng = runtime.init_key(config.seed)
  abstract_state = jax.eval_shape(method.init, init_rng, batch)
  frozen = method.frozen_inputs() if methods.has(method,
                                                 "frozen_inputs") else None
  if frozen is not None:
    abstract_state = abstract_state.replace(
        frozen=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            frozen.tree))
  shardings = sharding_lib.state_shardings(mesh, abstract_state, config.train)
  return Experiment(config, mesh, data, method, abstract_state, shardings,
                    init_rng, train_rng, sample_rng, frozen)


def attach_frozen(exp: Experiment, state: PyTree) -> PyTree:
  """``state`` with the experiment's frozen inputs placed on the mesh (a
  fresh or restored state has none: checkpoints leave them out)."""
  if exp.frozen is None:
    return state
  return state.replace(frozen=jax.device_put(exp.frozen.tree,
                                             exp.state_shardings.frozen))


def restore_state(exp: Experiment, mngr, step: Optional[int] = None
                  ) -> Tuple[int, PyTree, Dict[str, Any]]:
  """A checkpoint restored onto the mesh, with the frozen inputs attached;
  refuses one trained on other frozen inputs than the config names."""
  step, state, meta = checkpoint.restore(
      mngr, state_lib.for_checkpoint(exp.abstract_state),
      state_lib.for_checkpoint(exp.state_shardings), step)
  frozen_lib.check_same(meta.get("frozen"),
                        exp.frozen.record if exp.frozen else None,
                        f"{mngr.directory}/{step}")
  return step, attach_frozen(exp, state), meta


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """An ahead-of-time compiled train step: ``(train_step,)`` or
  ``(grad_step, apply_step)``; called as ``(state, batch, rng) -> (state,
  metrics)``."""

  programs: Tuple[jax.stages.Compiled, ...]

  def __call__(self, state: PyTree, batch: PyTree, rng: jax.Array):
    return _run_step(self.programs, state, batch, rng)

  def as_text(self) -> str:
    """The optimized HLO of every program, one module after the other."""
    return "\n".join(p.as_text() for p in self.programs)


def _run_step(programs, state, batch, rng):
  if len(programs) == 1:
    return programs[0](state, batch, rng)
  grads, metrics = programs[0](state, batch, rng)
  state, more = programs[1](state, grads)
  return state, {**metrics, **more}


class TrainStep:
  """The method's train step, jitted over the mesh; donates the old state.

  On CPUs, a method that exposes ``grad_step`` and ``apply_step`` (see
  ``methods.base``) runs as those two programs, and the update program
  compiles on a second thread while the gradient program is traced and
  compiled: XLA:CPU compiles a program mostly on one core, and the optimizer
  update with its per-parameter kernels is about a quarter of the ref6m
  step's compile. Three alternating cold compiles took 8.4-8.6 s instead of
  10.1-10.8 s, at the same peak memory; the step runs as fast (the
  gradients are materialised either way). Elsewhere one program, which
  lets XLA schedule the update with the backward pass. A step split into
  microbatches compiles with its own XLA:CPU scheduler (see
  ``runtime.train_step_compiler_options``).

  The first call compiles (as :meth:`compile`); later calls reuse the
  executables through ``jax.jit``'s cache.
  """

  def __init__(self, exp: Experiment):
    method = exp.method
    state_sh = exp.state_shardings
    batch_sh = sharding_lib.batch_sharding(exp.mesh)
    repl = sharding_lib.replicated(exp.mesh)
    options = runtime.train_step_compiler_options(
        getattr(method, "microbatches", 1))
    if (jax.default_backend() == "cpu" and hasattr(method, "grad_step") and
        hasattr(method, "apply_step")):
      self.jitted = (
          jax.jit(method.grad_step, in_shardings=(state_sh, batch_sh, repl),
                  out_shardings=(state_sh.params, repl),
                  compiler_options=options),
          # The new state takes the old one's buffers, so there is no use
          # for the gradients' (donating them too only draws a warning).
          jax.jit(method.apply_step, in_shardings=(state_sh, state_sh.params),
                  out_shardings=(state_sh, repl), donate_argnums=(0,)))
    else:
      self.jitted = (jax.jit(
          method.train_step, in_shardings=(state_sh, batch_sh, repl),
          out_shardings=(state_sh, repl), donate_argnums=(0,),
          compiler_options=options),)
    self._compiled = False

  @property
  def split(self) -> bool:
    """The step runs as a gradient program and an update program."""
    return len(self.jitted) == 2

  def compile(self, state: PyTree, batch: PyTree,
              rng: jax.Array) -> CompiledStep:
    """Lowers for these arguments (or their shapes) and compiles; a split
    step's two programs concurrently."""
    if not self.split:
      programs = (self.jitted[0].lower(state, batch, rng).compile(),)
    else:
      # The small update program compiles on a thread (XLA releases the
      # GIL) while this one traces and then compiles the gradient program;
      # that overlaps less compiler memory than two compiles at once.
      with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # Gradients have the parameters' shapes and dtypes.
        update = pool.submit(
            self.jitted[1].lower(state, state.params).compile)
        programs = (self.jitted[0].lower(state, batch, rng).compile(),
                    update.result())
    self._compiled = True
    return CompiledStep(programs)

  def __call__(self, state: PyTree, batch: PyTree, rng: jax.Array):
    if not self._compiled:
      self.compile(state, batch, rng)
    return _run_step(self.jitted, state, batch, rng)


class ProcessInterrupts(interrupts_lib.Interrupts):
  """Ctrl-C and SIGTERM for a multi-process run: all processes stop after the
  same step.

  A scheduler signals every process, but each at its own point of the loop,
  and one that stopped alone would leave the others waiting in the next
  step's collectives. Here a signal never interrupts: it is held, and at
  :meth:`stop_point`, which every process calls once per step, the processes
  combine what they hold (a max over one number per device). The result is
  read one step later, so the host never waits for the device: a signal
  that arrived during step ``s`` stops every process after step ``s + 1``.
  """

  def __init__(self):
    super().__init__()
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
    self._sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("all"))
    self._max = jax.jit(lambda x: x.max(),
                        out_shardings=sharding_lib.replicated(mesh))
    self._combined: Optional[jax.Array] = None  # of the last stop point

  def _handle(self, signum, frame):
    del frame
    if self.pending is None:
      logging.warning("Received signal %d; all processes stop after the next "
                      "step.", signum)
    self.pending = signum

  @contextlib.contextmanager
  def deferred(self):
    """Signals are always held; the block never raises for one."""
    yield

  def stop_point(self) -> None:
    """Raises ``KeyboardInterrupt`` on every process if any process held a
    signal at the previous stop point. Collective: every process calls it
    once per step."""
    held = np.full((jax.local_device_count(),), self.pending or 0, np.int32)
    combined = self._max(
        jax.make_array_from_process_local_data(self._sharding, held))
    previous, self._combined = self._combined, combined
    if previous is not None and int(previous):
      self.pending = None
      raise KeyboardInterrupt(f"received signal {int(previous)}")


class _LocalInterrupts(interrupts_lib.Interrupts):
  """One process: a held signal is raised when its block ends."""

  def stop_point(self) -> None:
    pass


def interrupts_for_run() -> interrupts_lib.Interrupts:
  """The signal handling of this run's process count."""
  return ProcessInterrupts() if jax.process_count() > 1 else _LocalInterrupts()


def jit_train_step(exp: Experiment) -> TrainStep:
  """The experiment's :class:`TrainStep`."""
  return TrainStep(exp)


def init_state(exp: Experiment) -> PyTree:
  batch = example_batch(exp.data, exp.mesh)
  init = jax.jit(exp.method.init,
                 out_shardings=state_lib.for_checkpoint(exp.state_shardings))
  state = jax.block_until_ready(init(exp.init_rng, batch))
  runtime.release_free_memory()
  return attach_frozen(exp, state)


def checkpoint_meta(exp: Experiment) -> Dict[str, Any]:
  meta = {"normalization": {k: list(v) for k, v in exp.data.stats.items()},
          "contrasts": list(exp.config.data.contrasts),
          "image_shape": list(exp.data.image_shape),
          "method": exp.config.method.name}
  if exp.frozen is not None:
    meta["frozen"] = exp.frozen.record
  return meta


def changed_settings(config_path: str, config: ml_collections.ConfigDict,
                     show: int = 8) -> str:
  """``"model.ch 16 -> 8, ..."``: the keys of ``config`` that differ from the
  ``config.json`` an earlier run wrote (``"unknown"`` without one)."""
  try:
    with open(config_path) as f:
      old = _flat_hparams(json.load(f))
  except (OSError, ValueError):
    return "unknown (no readable config.json)"
  # Through JSON, as config.json was written: tuples compare as lists.
  new = _flat_hparams(json.loads(json.dumps(config.to_dict(), default=str)))
  diffs = [f"{k} {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}"
           for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  if not diffs:
    return "no setting"
  more = f" (and {len(diffs) - show} more)" if len(diffs) > show else ""
  return ", ".join(diffs[:show]) + more


def _truncate_jsonl(path: str, last_step: int) -> None:
  """Drops lines written after ``last_step`` by a run that was killed.

  Those steps are re-run (deterministically) after resuming, so keeping them
  would show every such step twice.
  """
  if os.path.exists(path):
    jsonl.rewrite(path, lambda r: r.get("step", 0) <= last_step)


def _append_jsonl(path: str, record: Dict[str, Any]) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")


def _average_metrics(names) -> type:
  return clu_metrics.Collection.create(
      **{k: clu_metrics.Average.from_output(k) for k in names})


def metric_accumulator(names: Sequence[str]
                       ) -> Tuple[Callable[..., Any], Callable[..., Any]]:
  """``(first, merge)``: jitted ``metrics -> acc`` and ``(acc, metrics) ->
  acc`` averaging a step's ``metrics`` (keys ``names``) over steps with
  clu's ``Average``, so each step costs one dispatch: op by op, a method
  with a dozen metrics ran ~120 eager ops per step, which on a CPU took
  as long as a small model's whole step (docs/performance.md)."""
  collection = _average_metrics(sorted(names))
  first = jax.jit(lambda m: collection.single_from_model_output(**m))
  merge = jax.jit(
      lambda acc, m: acc.merge(collection.single_from_model_output(**m)))
  return first, merge


def write_sample_grid(exp: Experiment, state: PyTree, path: str,
                      num: int) -> np.ndarray:
  """Draws ``num`` examples with a fixed key (balanced classes), saves the
  grid PNG (first contrast, masks overlaid) and returns it."""
  d = exp.config.data
  out = sampling.draw_for_classes(exp.method, state, d, num, exp.sample_rng,
                                  num,
                                  mask_source=exp.data.batcher.arrays["image"])
  return _save_grid(out, d, path)


def _first_examples(exp: Experiment, num: int) -> Dict[str, np.ndarray]:
  """The first ``num`` examples of the step-0 global batch: the same on
  every process (a process's own batcher yields only its slice)."""
  whole = dataclasses.replace(exp.data.batcher, process_index=0,
                              process_count=1)
  return {k: np.asarray(v[:num]) for k, v in whole.batch(0).items()}


def write_reconstruction_grid(exp: Experiment, state: PyTree, path: str,
                              num: int) -> np.ndarray:
  """Rows of real training examples and below each its reconstruction (a
  method with ``reconstruct``); saves the PNG and returns it."""
  d = exp.config.data
  batch = _first_examples(exp, num)
  recon = sampling.reconstruct(exp.method, state, d, batch, exp.sample_rng,
                               len(batch["image"]))
  real = sampling.split_outputs(batch["image"], d)
  cols = max(1, int(np.ceil(np.sqrt(len(batch["image"])))))
  rows = []
  for i in range(0, len(batch["image"]), cols):
    rows += [{k: v[i:i + cols] for k, v in real.items()},
             {k: v[i:i + cols] for k, v in recon.items()}]
  both = {k: np.concatenate([r[k] for r in rows]) for k in real}
  return _save_grid(both, d, path, ncol=cols)


def write_translation_grid(exp: Experiment, state: PyTree, path: str,
                           num: int) -> np.ndarray:
  """Rows of source images (first source contrast), their translations and
  the real targets (first target contrast), from training examples; saves
  the PNG and returns it."""
  t = exp.config.translation
  contrasts = list(exp.config.data.contrasts)
  image = _first_examples(exp, num)["image"]
  src = image[..., [contrasts.index(c) for c in t.source]]
  tgt = image[..., [contrasts.index(c) for c in t.target]]
  pred = sampling.translate(exp.method, state, src, exp.sample_rng, len(src))
  rows = np.concatenate([src[..., :1], pred[..., :1], tgt[..., :1]])
  grid = viz.image_grid(rows, exp.config.data.spatial_dims, ncol=len(src))
  if is_primary():
    viz.save_png(grid, path)
  return grid


def _save_grid(out: Dict[str, np.ndarray], d, path: str,
               ncol: Optional[int] = None) -> np.ndarray:
  mask_keys = tuple(d.get("mask_channels", ()))
  masks = out[mask_keys[0]] if mask_keys else None
  grid = viz.image_grid(out["image"], d.spatial_dims, masks=masks,
                        ncol=ncol)
  if is_primary():  # every process drew the same grid
    viz.save_png(grid, path)
  return grid


def restore_or_init(exp: Experiment, mngr) -> Tuple[int, PyTree]:
  """Latest checkpoint in the workdir if any, else a fresh state."""
  if mngr.latest_step() is not None:
    step, state, _ = restore_state(exp, mngr)
    logging.info("Resumed from checkpoint step %d in %s", step,
                 mngr.directory)
    return step, state
  return 0, init_state(exp)


def train(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains ``config.method`` until ``config.train.num_steps``.

  Writes to ``workdir``: ``config.json``, ``checkpoints/``, TensorBoard
  events, ``metrics.jsonl`` and ``samples/step_N.png``; evaluators of
  ``config.evals`` with ``every_steps > 0`` add ``eval/<name>`` lines and
  ``eval/<name>_step_N.json``.

  Returns:
    A summary: final step, last logged metrics, wall time, sample PNG paths.
  """
  os.makedirs(workdir, exist_ok=True)
  exp = build_experiment(config)
  mngr = checkpoint.manager(workdir, keep=config.train.keep_ckpts)
  # Closed on every path, after its pending save: a manager left open at
  # exit makes its background thread report a second error after the real
  # one.
  with contextlib.closing(mngr):
    return _train(exp, mngr, workdir)


def _train(exp: Experiment, mngr, workdir: str) -> Dict[str, Any]:
  """:func:`train` with its experiment and checkpoint manager."""
  config = exp.config
  tc = config.train
  config_path = os.path.join(workdir, "config.json")
  try:
    start, state = restore_or_init(exp, mngr)
  except checkpoint.CheckpointMismatchError as e:
    raise checkpoint.CheckpointMismatchError(
        f"{e} Changed since: {changed_settings(config_path, config)}. Use a "
        "new --workdir, or the checkpoint's settings.") from None
  primary = is_primary()
  meta = checkpoint_meta(exp)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if primary:
    # Written once the checkpoint is known to fit: a refused resume keeps
    # the record of the settings that produced it.
    jsonl.write_json(config_path, config.to_dict())
    jsonl.write_json(os.path.join(workdir, "data_stats.json"), meta)
    _truncate_jsonl(metrics_path, start)

  writer, report = _writer_and_report(workdir, tc.num_steps, primary)
  if start == 0:
    if jax.process_count() == 1:
      parameter_overview.log_parameter_overview(state.params)
    else:  # no statistics: those need every process's shards
      parameter_overview.log_parameter_overview(
          state.params, include_stats="sharding", jax_logging_process=0)
    writer.write_hparams(_flat_hparams(config))
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("%s: %.2fM parameters, %d training examples, mesh %s",
               config.method.name, n_params / 1e6,
               exp.data.batcher.num_examples, dict(exp.mesh.shape))

  train_step = jit_train_step(exp)
  if exp.frozen is not None and primary:
    jsonl.write_json(os.path.join(workdir, "frozen_inputs.json"),
                     exp.frozen.record)
  # Built once (reads data, loads or trains the in-domain encoder); only
  # evaluators with every_steps > 0 run during training.
  evaluators = eval_registry.build_all(config, workdir, periodic_only=True)
  accumulate, acc, last = None, None, {}
  samples: List[str] = []
  t0 = time.time()
  done = start  # the last step whose state `state` holds
  batches = runtime.progress(
      pipeline.prefetch_to_mesh(exp.data.batcher, start, tc.num_steps,
                                exp.mesh),
      total=tc.num_steps, initial=start, desc="train")
  interrupts = interrupts_for_run()
  with interrupts:
    try:
      for step, batch in enumerate(batches, start=start + 1):
        # A signal waits for the step, its metrics and its checkpoint: the
        # step donates the old state, so stopping inside it could leave
        # nothing to save.
        with interrupts.deferred():
          rng = jax.random.fold_in(exp.train_rng, step)
          state, m = train_step(state, batch, rng)
          done = step
          if step == start + 1:
            runtime.release_free_memory()  # the compiler's scratch
          if accumulate is None:
            accumulate = metric_accumulator(m)
          acc = accumulate[0](m) if acc is None else accumulate[1](acc, m)
          report(step)
          if step % tc.log_every == 0 or step == tc.num_steps:
            last = {k: float(v) for k, v in acc.compute().items()}
            acc = None
            if not all(np.isfinite(v) for v in last.values()):
              raise NonFiniteLossError(
                  f"non-finite training metrics at step {step}: {last}. The "
                  f"last good checkpoint is step {mngr.latest_step()} in "
                  f"{workdir}; lower optim.lr, keep optim.grad_clip > 0, or "
                  "check the data normalisation.")
            writer.write_scalars(step, last)
            if primary:
              _append_jsonl(metrics_path, {"step": step, "split": "train",
                                           **last})
          if step % tc.ckpt_every == 0 or step == tc.num_steps:
            with report.timed("checkpoint"):
              checkpoint.save(mngr, step, state_lib.for_checkpoint(state),
                              meta)
        if tc.sample_every and (step % tc.sample_every == 0 or
                                step == tc.num_steps):
          with report.timed("sample"):
            grids = {}
            if methods.has(exp.method, "sample"):
              path = os.path.join(workdir, "samples", f"step_{step}.png")
              grids["samples"] = write_sample_grid(exp, state, path,
                                                   tc.num_grid_samples)
              samples.append(path)
            if methods.has(exp.method, "translate"):
              path = os.path.join(workdir, "samples",
                                  f"translate_step_{step}.png")
              grids["translations"] = write_translation_grid(
                  exp, state, path, tc.num_grid_samples)
              samples.append(path)
            if methods.has(exp.method, "reconstruct"):
              path = os.path.join(workdir, "samples", f"recon_step_{step}.png")
              grids["reconstructions"] = write_reconstruction_grid(
                  exp, state, path, tc.num_grid_samples)
              samples.append(path)
            writer.write_images(step, {k: g[None] for k, g in grids.items()})
        due = [e for e in evaluators if e.due(step, tc.num_steps)]
        if due:
          with report.timed("eval"):
            eval_registry.evaluate_and_write(due, exp.method, state, step,
                                             workdir, writer)
        # Once per step on every process (a collective when there are
        # several): a signal stops all of them here.
        interrupts.stop_point()
    except KeyboardInterrupt:
      # Ctrl-C, or SIGTERM (a scheduler's pre-emption): keep the work done
      # so far. Further signals wait for the save.
      logging.warning("Interrupted at step %d; saving a checkpoint.", done)
      with interrupts.deferred():
        if done > (mngr.latest_step() or 0):
          checkpoint.save(mngr, done, state_lib.for_checkpoint(state), meta)
      raise
    finally:
      with interrupts.deferred():
        try:
          mngr.wait_until_finished()
        finally:
          writer.flush()
  return {"step": int(done), "metrics": last, "seconds": time.time() - t0,
          "samples": samples, "workdir": workdir}


class _Silent:
  """Writer and progress report of a process that writes nothing (all but
  process 0 of a multi-process run)."""

  def write_scalars(self, step, scalars):
    del step, scalars

  def write_images(self, step, images):
    del step, images

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    pass

  def __call__(self, step):
    del step

  def timed(self, name):
    del name
    return contextlib.nullcontext()


def _writer_and_report(workdir: str, num_steps: int, primary: bool):
  """clu's metric writer (TensorBoard events and log lines) and progress
  report on the primary process, silent stand-ins elsewhere."""
  if not primary:
    return _Silent(), _Silent()
  # clu's writers and periodic actions import TensorFlow (~650 MB, seconds):
  # only a training run's primary process needs them, not the benchmark,
  # sampling or the other processes.
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  from clu import periodic_actions  # pylint: disable=import-outside-toplevel
  writer = metric_writers.create_default_writer(workdir)
  return writer, periodic_actions.ReportProgress(num_train_steps=num_steps,
                                                 writer=writer)


def _flat_hparams(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  flat = {}

  def walk(prefix, node):
    for k, v in node.items():
      key = f"{prefix}{k}"
      if isinstance(v, (dict, ml_collections.ConfigDict)):
        walk(key + ".", v)
      elif isinstance(v, (int, float, str, bool)):
        flat[key] = v
      else:
        flat[key] = str(v)

  walk("", config)
  return flat


def load_for_sampling(config: ml_collections.ConfigDict, workdir: str,
                      step: Optional[int] = None):
  """Experiment and restored state from a trained workdir (for sample/eval)."""
  exp = build_experiment(config)
  if not checkpoint.steps_on_disk(workdir):
    raise errors.MissingFileError(
        f"no checkpoint in {workdir}/checkpoints; train first with "
        "--mode=train")
  mngr = checkpoint.manager(workdir, keep=config.train.keep_ckpts,
                            async_save=False)
  # Closed on every path: a manager left open at exit makes its background
  # thread report a second error after the real one.
  with contextlib.closing(mngr):
    if mngr.latest_step() is None:
      raise errors.MissingFileError(
          f"no checkpoint in {workdir}/checkpoints; train first with "
          "--mode=train")
    step, state, meta = restore_state(exp, mngr, step)
  return exp, step, state, meta
