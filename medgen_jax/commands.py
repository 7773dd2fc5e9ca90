"""What each ``launch.py --mode`` does."""

import json
import os
from typing import Any, Dict

import jax
import ml_collections
import numpy as np
from absl import logging

from medgen_jax import errors
from medgen_jax import sampling
from medgen_jax import viz
from medgen_jax import workdir_lock
from medgen_jax.data import pipeline
from medgen_jax.train import trainer


def _summary_table(rows) -> str:
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _print(text: str) -> None:
  """Prints a command's summary once: from process 0 of a multi-process
  run (the others computed the same)."""
  if trainer.is_primary():
    print(text, flush=True)


def resolve_auto_inputs(config: ml_collections.ConfigDict, workdir: str
                        ) -> ml_collections.ConfigDict:
  """``config`` with the inputs its method names ``"auto"`` produced first
  (a method module's ``resolve_auto(config, workdir, train_encoder,
  train_run)``: an in-domain encoder, or a whole training run such as a
  latent diffusion's stage 1): the method says what it needs, this layer
  trains it."""
  from medgen_jax.methods import base as methods  # pylint: disable=import-outside-toplevel
  module = methods.module(config.method.name)
  if not hasattr(module, "resolve_auto"):
    return config

  def train_encoder(section, directory: str) -> str:
    from medgen_jax.eval import encoder as encoder_lib  # pylint: disable=import-outside-toplevel
    from medgen_jax.eval import registry as eval_registry  # pylint: disable=import-outside-toplevel
    d = config.data
    real = eval_registry.RealData(config)
    enc = ml_collections.ConfigDict(section.to_dict())
    if not enc.num_classes:
      enc.num_classes = int(d.num_classes)
    encoder_lib.train_or_load(
        enc, d.contrasts, d.spatial_dims, real.train, real.heldout,
        directory, extra_card=dict(dataset=d.dataset,
                                   train_split=d.train_split,
                                   normalization=d.normalization))
    return directory

  def train_run(run_config: ml_collections.ConfigDict, directory: str) -> str:
    """Trains ``run_config`` into ``directory`` (resuming a cut run; a
    finished one is reused as it is)."""
    from medgen_jax import config_check  # pylint: disable=import-outside-toplevel
    from medgen_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
    steps = checkpoint.steps_on_disk(directory)
    done = steps[-1] if steps else None
    if done is not None and done >= run_config.train.num_steps:
      logging.info("reusing the finished run in %s (step %d)", directory,
                   done)
      return directory
    config_check.validate(run_config, num_devices=jax.device_count())
    run_config = resolve_auto_inputs(run_config, directory)
    logging.info("training %s into %s first", run_config.method.name,
                 directory)
    with workdir_lock.hold(directory, "--mode=train (a frozen input)",
                           primary=jax.process_index() == 0):
      trainer.train(run_config, directory)
    return directory

  return module.resolve_auto(config, workdir, train_encoder, train_run)


def train(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  out = trainer.train(config, workdir)
  rows = [("workdir", os.path.abspath(workdir)), ("final step", out["step"]),
          ("wall time", f"{out['seconds']:.1f} s")]
  rows += [(f"train {k}", f"{v:.5g}") for k, v in sorted(out["metrics"].items())]
  if out["samples"]:
    rows.append(("last sample grid", out["samples"][-1]))
  _print("Training finished:\n" + _summary_table(rows))
  return out


def sample(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Draws ``config.sample.num`` samples in batches into ``workdir/samples``.

  Writes ``final_step_N.npz`` with ``image`` (the contrasts, normalised
  [-1, 1]), ``image_signal`` (back in the data set's signal units), one
  array per mask of ``data.mask_channels`` and ``label`` (balanced classes)
  when the model is conditional, plus a PNG grid of the first 64.
  """
  from medgen_jax.methods import base as methods  # pylint: disable=import-outside-toplevel
  exp, step, state, meta = trainer.load_for_sampling(config, workdir)
  methods.require(exp.method, "sample", "--mode=sample")
  sc = config.sample
  out = sampling.draw_for_classes(
      exp.method, state, config.data, sc.num, exp.sample_rng, sc.batch_size,
      desc="sample", mask_source=exp.data.batcher.arrays["image"])
  stats = {k: tuple(v) for k, v in meta["normalization"].items()}
  out["image_signal"] = pipeline.denormalize(out["image"], meta["contrasts"],
                                             stats)
  base = os.path.join(workdir, "samples", f"final_step_{step}")
  if trainer.is_primary():  # every process drew the same samples
    _write_samples(out, config.data, base)
    print(f"Wrote {sc.num} samples from step {step}: {base}.npz, "
          f"{base}.png", flush=True)
  return out


def _write_samples(out: Dict[str, np.ndarray], d: ml_collections.ConfigDict,
                   base: str) -> None:
  """``<base>.npz`` (atomically) and ``<base>.png``, a grid of the first
  64 with the first mask overlaid."""
  mask_keys = tuple(d.get("mask_channels", ()))
  os.makedirs(os.path.dirname(base), exist_ok=True)
  tmp = base + ".tmp.npz"
  np.savez_compressed(tmp, **out)
  os.replace(tmp, base + ".npz")
  masks = out[mask_keys[0]][:64] if mask_keys else None
  viz.save_png(viz.image_grid(out["image"][:64], d.spatial_dims,
                              masks=masks), base + ".png")
  logging.info("wrote %d samples to %s.npz", len(out["image"]), base)


def evaluate(config: ml_collections.ConfigDict, workdir: str
             ) -> Dict[str, Any]:
  """Runs every evaluator of ``config.evals`` (one default ``generative``
  when there is none) on the latest checkpoint and prints a table.

  Writes ``metrics.jsonl`` lines ``{"step", "split": "eval/<name>", ...}``,
  TensorBoard scalars ``eval/<name>/<metric>`` and
  ``eval/<name>_step_N.json`` (metrics, details and the extractor card).
  """
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  from medgen_jax.eval import registry as eval_registry  # pylint: disable=import-outside-toplevel
  exp, step, state, _ = trainer.load_for_sampling(config, workdir)
  evaluators = eval_registry.build_all(config, workdir)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  try:
    results = eval_registry.evaluate_and_write(
        evaluators, exp.method, state, step, workdir, writer)
  finally:
    writer.close()
  rows = [("checkpoint step", step)]
  for name, r in results.items():
    rows += [(f"{name} {k}", f"{v:.5g}") for k, v in sorted(r.metrics.items())]
    rows.append((f"{name} record",
                 eval_registry.record_path(workdir, name, step)))
  _print("Evaluation finished:\n" + _summary_table(rows))
  return {"step": step, "results": results}


COST_STEPS = (5, 10, 25, 50, 250)


def sampling_cost(config: ml_collections.ConfigDict, workdir: str
                  ) -> Dict[str, Any]:
  """In-domain FID/KID, precision/recall and wall time against the number
  of network evaluations (NFE), for every sampler of an iterative
  generator, on the latest checkpoint.

  NFE come from ``sample.cost_steps`` (default :data:`COST_STEPS`); the
  ancestral ``ddpm`` sampler runs only when its ``T`` is among them. The
  metrics are the ``generative`` evaluator's (its ``num_samples``, seed and
  label policy); each program is compiled before it is timed. Prints a
  table and writes ``eval/sampling_cost_step_N.{json,md}``.
  """
  from medgen_jax.eval import registry as eval_registry  # pylint: disable=import-outside-toplevel
  from medgen_jax.methods import base as methods  # pylint: disable=import-outside-toplevel
  exp, step, state, _ = trainer.load_for_sampling(config, workdir)
  samplers = getattr(exp.method, "samplers", None)
  if samplers is None:
    raise errors.UserError(
        f"--mode=sampling_cost needs an iterative sampler (a diffusion or "
        f"flow config); {type(exp.method).__name__} draws in one network "
        "pass")
  entries = eval_registry.entries(config)
  name = next((k for k, v in entries.items()
               if v.get("type") == "generative"), None)
  if name is None:
    raise errors.UserError("--mode=sampling_cost scores with a 'generative' "
                           "evaluator; config.evals has none")
  real = eval_registry.RealData(config)
  evaluator = eval_registry.build(config, name, entries[name], workdir, real)
  batch_size = evaluator.fields.batch_size or config.sample.batch_size
  nfes = tuple(config.sample.get("cost_steps", ()) or COST_STEPS)
  example = trainer.example_batch(exp.data, exp.mesh)
  rows = []
  for sampler, fixed in samplers():
    for nfe in ([fixed] if fixed else nfes):
      if fixed and fixed not in nfes:
        continue
      c = config.copy_and_resolve_references()
      c.sample.update(sampler=sampler, steps=int(nfe))
      method = methods.build(c, example)
      # Compiled before the clock starts: the table is about sampling.
      eval_registry.sample_set(method, state, c, batch_size, batch_size,
                               jax.random.key(0))
      r = evaluator(method, state).metrics
      n = evaluator.fields.num_samples
      rows.append(dict(sampler=sampler, nfe=int(nfe), fid=r["fid"],
                       kid=r["kid_mean"], precision=r["precision"],
                       recall=r["recall"], seconds=r["sampling_seconds"],
                       ms_per_image=1e3 * r["sampling_seconds"] / n))
      logging.info("sampling cost: %s", rows[-1])
  header = ("| sampler | NFE | FID | KID | precision | recall | seconds | "
            "ms / image |\n|---|---|---|---|---|---|---|---|\n")
  table = header + "".join(
      f"| {r['sampler']} | {r['nfe']} | {r['fid']:.3f} | {r['kid']:.4f} | "
      f"{r['precision']:.2f} | {r['recall']:.2f} | {r['seconds']:.1f} | "
      f"{r['ms_per_image']:.1f} |\n" for r in rows)
  out_dir = os.path.join(workdir, "eval")
  base = os.path.join(out_dir, f"sampling_cost_step_{step}")
  card = dict(step=step, num_samples=evaluator.fields.num_samples,
              batch_size=batch_size, device=str(jax.devices()[0]),
              metrics=f"evals.{name} (in-domain encoder)", rows=rows)
  if not trainer.is_primary():  # every process computed the same table
    return card
  os.makedirs(out_dir, exist_ok=True)
  for path, text in ((base + ".json", json.dumps(card, indent=2)),
                     (base + ".md", table)):
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)
  print(f"Sampling cost at step {step} ({evaluator.fields.num_samples} "
        f"samples, {jax.devices()[0].platform}):\n{table}Written: {base}.md",
        flush=True)
  return card


def study(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes) the augmentation study of a ``configs/study.py``
  config and prints its summary table."""
  from medgen_jax import report  # pylint: disable=import-outside-toplevel
  from medgen_jax.downstream import study as study_lib  # pylint: disable=import-outside-toplevel
  out = study_lib.run(config, workdir)
  verdicts = report.family_verdicts(config, out["results"])
  print("\nStudy finished in {:.1f} min.\n".format(out["seconds"] / 60) +
        report.summary_table(out["results"]) +
        "".join(f"{v.replace('**', '')}\n" for v in verdicts) +
        ("\n" if verdicts else "") +
        f"Report: {out['report']['markdown']} (and "
        f"{out['report']['html']})", flush=True)
  return out


def inspect(config: ml_collections.ConfigDict, workdir: str
            ) -> Dict[str, Any]:
  """Builds the configured data set if needed and describes it.

  Prints counts per split and class, feature shapes and dtypes, intensity
  ranges and percentiles per contrast and mask label values; writes
  ``<workdir>/inspect/<dataset>_summary.json`` and ``<dataset>_grid.png``
  (training examples, normalised as for training, masks overlaid).
  """
  from medgen_jax.data import summary as summary_lib  # pylint: disable=import-outside-toplevel
  d = config.data
  builder = pipeline.prepare(d)
  names = builder.info.features["label"].names if (
      "label" in builder.info.features) else []
  order = [s for s in ("train", "val", "test") if s in builder.info.splits]
  order += sorted(set(builder.info.splits) - set(order))
  raw = {s: summary_lib.builder_arrays(builder, s) for s in order}
  splits = {s: summary_lib.split_summary(raw[s], d.contrasts, names)
            for s in order}
  train_split = d.train_split if d.train_split in raw else order[0]
  stats = pipeline.normalization_stats(raw[train_split], d)
  out_dir = os.path.join(workdir, "inspect")
  png = os.path.join(out_dir, f"{d.dataset}_grid.png")
  out = {"dataset": d.dataset, "name": f"{builder.name}/"
         f"{builder.builder_config.name}", "path": str(builder.data_dir),
         "splits": splits, "normalization": stats, "grid": png}
  if not trainer.is_primary():  # the same description on every process
    return out
  os.makedirs(out_dir, exist_ok=True)
  viz.save_png(summary_lib.example_grid(raw[train_split], d, stats), png)
  tmp = os.path.join(out_dir, f"{d.dataset}_summary.json.tmp")
  with open(tmp, "w") as f:
    json.dump(out, f, indent=2, sort_keys=True)
  os.replace(tmp, tmp[:-len(".tmp")])
  print(summary_lib.format_summary(out["name"], splits) +
        f"\n  built in {out['path']}\n  example grid: {png}", flush=True)
  return out


MODES = {"train": train, "sample": sample, "eval": evaluate, "study": study,
         "inspect": inspect, "sampling_cost": sampling_cost}


def default_mode(config: ml_collections.ConfigDict) -> str:
  """What ``--mode=auto`` means: the config's main job."""
  return "study" if config.get("kind") == "study" else "train"


def run(mode: str, config: ml_collections.ConfigDict, workdir: str):
  """Runs ``mode`` (``auto`` or a key of :data:`MODES`) holding the
  workdir's lock."""
  if mode == "auto":
    mode = default_mode(config)
  if mode == "study" and config.get("kind") != "study":
    raise errors.UserError(
        "--mode=study needs a study config (configs/study.py)")
  if mode != "study" and config.get("kind") == "study":
    raise errors.UserError(
        f"--mode={mode} needs a method config (e.g. configs/ddpm.py); a "
        "study config runs with --mode=study")
  if mode == "study" and jax.process_count() > 1:
    # Its stages write from whichever process runs them (docs/multihost.md).
    raise errors.UserError(
        f"--mode=study runs as one process; this is one of "
        f"{jax.process_count()}. Start it without the multi-process launcher "
        "(one process uses every local device)")
  with workdir_lock.hold(workdir, f"--mode={mode}",
                         primary=jax.process_index() == 0):
    if mode in ("train", "sample", "eval", "sampling_cost"):
      config = resolve_auto_inputs(config, workdir)
    return MODES[mode](config, workdir)
