"""Per-op time breakdown of a compiled XLA program, from a profiler trace.

XLA:CPU records one trace event per executed HLO instruction (thunk), named
after the instruction and tagged with an ``hlo_op`` stat. This module runs a
compiled function under ``jax.profiler``, sums those events per instruction,
and sorts instructions into categories read from the optimized HLO text:
the instruction's opcode (or the opcodes inside a fusion), its shapes and its
``op_name`` metadata (the flax module path plus ``transpose(...)`` for the
backward pass)::

  rows, _, _ = profiling.profile(step_fn, compiled.as_text(), repeats=2)
  print(profiling.format_table(rows))

An instruction's time is its share of the wall time: while ``k``
instructions run at once (XLA runs independent thunks concurrently), each
is charged ``1/k`` of it, so the rows add up to the traced time of the
program and are directly comparable with another framework's per-op wall
times. An op that XLA runs asynchronously on its intra-op pool (Eigen
convolutions, large dots) runs from its dispatch to the ``end:`` event its
last worker records. Loops and calls are not charged: the instructions of
their bodies are traced.
"""

import bisect
import collections
import copy
import dataclasses
import glob
import os
import re
import shutil
import tempfile
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import jax

CATEGORIES = (
    "conv forward",
    "conv input-grad",
    "conv kernel-grad",
    "group norm fwd",
    "group norm bwd",
    "attention",
    "dense (embedding)",
    "elementwise/fusions",
    "optimizer update",
    "copies/transposes/slices",
    "other",
)

# Opcodes that only move data; a fusion made only of these is a copy.
_DATA_MOVEMENT = frozenset((
    "parameter", "copy", "transpose", "bitcast", "slice", "pad", "reshape",
    "concatenate", "broadcast", "dynamic-slice", "dynamic-update-slice",
    "constant", "tuple", "get-tuple-element", "reverse"))
# Control flow and bookkeeping instructions whose time is that of their body.
_CONTAINERS = frozenset(("while", "call", "conditional"))

_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+"
    r"(?P<opcode>[a-z][\w\-]*)\((?P<rest>.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+)\s.*\{\s*$")
_MODULE = re.compile(r"^HloModule\s+(?P<name>[\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class HloOp:
  """One instruction of the optimized HLO.

  Attributes:
    name: instruction name (the trace event's ``hlo_op``).
    opcode: e.g. ``fusion``, ``dot``, ``convolution``.
    shape: the result shape text, e.g. ``f32[32,32,32,64]{3,2,1,0}``.
    op_name: ``metadata.op_name`` (jax/flax scope path), possibly ``""``.
    inner: opcodes inside the called (fused) computation, for fusions.
    conv_window: window size of a convolution (its own or a fused one).
    conv_out_spatial: spatial sizes of that convolution's result.
  """

  name: str
  opcode: str
  shape: str
  op_name: str
  inner: Tuple[str, ...] = ()
  conv_window: Tuple[int, ...] = ()
  conv_out_spatial: Tuple[int, ...] = ()


def _dims(shape: str) -> Tuple[int, ...]:
  m = re.search(r"\[([\d,]*)\]", shape)
  if not m or not m.group(1):
    return ()
  return tuple(int(d) for d in m.group(1).split(","))


def _conv_geometry(shape: str, rest: str) -> Tuple[Tuple[int, ...],
                                                   Tuple[int, ...]]:
  """Window and output spatial sizes of a ``b01f``-style convolution."""
  window = re.search(r"window=\{size=([\dx]+)", rest)
  labels = re.search(r"dim_labels=\w+_\w+->(\w+)", rest)
  win = tuple(int(s) for s in window.group(1).split("x")) if window else ()
  dims = _dims(shape)
  out = ()
  if labels and len(labels.group(1)) == len(dims):
    out = tuple(d for d, c in zip(dims, labels.group(1)) if c.isdigit())
  return win, out


def _qualified(module: Optional[str], name: str) -> str:
  """``module/name``: instruction names are unique only within a module."""
  return f"{module}/{name}" if module else name


def parse_hlo(text: str) -> Dict[str, HloOp]:
  """All instructions of the HLO modules in ``text``, by ``module/name``
  (by ``name`` alone in a text without an ``HloModule`` line).

  Fusions and other callers get the opcodes (and any convolution geometry)
  of the computations they call, so a fused convolution is still seen as
  one.
  """
  comps: Dict[Tuple[Optional[str], str],
              List[Tuple[str, str, str, str]]] = {}
  module, current = None, None
  for line in text.splitlines():
    header = _MODULE.match(line)
    if header:
      module, current = header.group("name"), None
      continue
    c = _COMP.match(line)
    if c and "=" not in line.split("{")[0]:
      current = (module, c.group("name"))
      comps[current] = []
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      comps[current].append((m.group("name"), m.group("opcode"),
                             m.group("shape"), m.group("rest")))
  ops = {}
  for (mod, _), instrs in comps.items():
    for name, opcode, shape, rest in instrs:
      meta = re.search(r'op_name="([^"]*)"', rest)
      inner: List[str] = []
      win, out = (), ()
      if opcode == "convolution":
        win, out = _conv_geometry(shape, rest)
      called = re.search(r"calls=%([\w.\-]+)", rest)
      if called and (mod, called.group(1)) in comps:
        for _, o, sh, r in comps[(mod, called.group(1))]:
          inner.append(o)
          if o == "convolution":
            win, out = _conv_geometry(sh, r)
      ops[_qualified(mod, name)] = HloOp(
          name, opcode, shape, meta.group(1) if meta else "", tuple(inner),
          win, out)
  return ops


def in_model(op_name: str) -> bool:
  """Whether an instruction is the model and its loss, by its ``op_name``.

  That is what a training step differentiates: JAX names the ops inside
  ``jax.grad``/``value_and_grad`` ``jvp(...)`` (forward) and
  ``transpose(jvp(...))`` (backward), whatever the method's networks and
  loss functions are called. A method's separate gradient program
  (``grad_step``, see :mod:`medgen_jax.methods.base`) counts whole: its other
  ops draw the step's randomness and accumulate microbatch gradients, which
  is no part of the optimizer update; in a one-program ``train_step`` (off
  CPUs) they are charged to the update.
  """
  return "jvp(" in op_name or op_name.startswith("jit(grad_step)/")


def categorize(op: HloOp) -> str:
  """The breakdown category of one instruction (one of ``CATEGORIES``)."""
  kinds = set(op.inner) if op.inner else {op.opcode}
  backward = "transpose(" in op.op_name
  model = in_model(op.op_name)
  if "convolution" in kinds:
    if not backward and op.op_name:
      return "conv forward"
    # A kernel gradient's "window" is the whole output-gradient image and its
    # result is kernel-sized; forward and input-gradient convs are the
    # opposite way round.
    if (op.conv_window and op.conv_out_spatial and
        _prod(op.conv_window) > _prod(op.conv_out_spatial)):
      return "conv kernel-grad"
    return "conv input-grad" if backward else "conv forward"
  if "dot" in kinds:
    if "AttentionBlock" in op.op_name:
      return "attention"
    if re.search(r"/Conv_\d+/", op.op_name):
      # XLA runs 1x1 convolutions as matrix products; the "explicit"
      # lowering writes a 1x1 kernel gradient as this einsum.
      if not backward:
        return "conv forward"
      return ("conv kernel-grad" if "ni,nc->ic" in op.op_name else
              "conv input-grad")
    return "dense (embedding)" if model else "optimizer update"
  if op.opcode in _CONTAINERS:
    return "other"
  if kinds <= _DATA_MOVEMENT:
    return "copies/transposes/slices"
  if "GroupNorm" in op.op_name or "group_norm" in op.op_name:
    return "group norm bwd" if backward else "group norm fwd"
  if "AttentionBlock" in op.op_name:
    return "attention"
  if not model and not op.op_name.startswith("state."):
    return "optimizer update"
  return "elementwise/fusions"


def _prod(xs: Iterable[int]) -> int:
  out = 1
  for x in xs:
    out *= x
  return out


def trace_op_intervals(fn: Callable[[], object],
                       repeats: int = 1) -> List[Tuple[int, int, str]]:
  """``(start_ns, end_ns, "module/instruction")`` of every instruction
  executed while running ``fn`` ``repeats`` times under ``jax.profiler``."""
  log_dir = tempfile.mkdtemp(prefix="medgen_profile_")
  try:
    jax.profiler.start_trace(log_dir)
    try:
      for _ in range(repeats):
        fn()
    finally:
      jax.profiler.stop_trace()
    files = glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"),
                      recursive=True)
    if not files:
      raise RuntimeError(f"the profiler wrote no trace under {log_dir}")
    data = jax.profiler.ProfileData.from_file(files[0])
  finally:
    shutil.rmtree(log_dir, ignore_errors=True)
  starts: Dict[Tuple[Optional[str], str], List[Tuple[int, int]]] = (
      collections.defaultdict(list))
  ends: Dict[str, List[int]] = collections.defaultdict(list)
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name.startswith("end: "):
          ends[event.name[5:]].append(event.start_ns)
          continue
        stats = dict(event.stats)
        op = stats.get("hlo_op")
        if op is not None:
          module = stats.get("hlo_module")
          starts[(module and str(module), str(op))].append(
              (event.start_ns, event.duration_ns))
  intervals = []
  for (module, op), events in starts.items():
    # "end:" events name the instruction only; programs of one trace run
    # one after the other, so the first end after a start is its own.
    name = _qualified(module, op)
    done = sorted(ends.get(op, ()))
    for start, duration in sorted(events):
      # An asynchronous thunk's event covers only its dispatch; it runs
      # until the first "end:" event after its start.
      i = bisect.bisect_left(done, start)
      if i < len(done) and done[i] - start > duration:
        intervals.append((start, done.pop(i), name))
      else:
        intervals.append((start, start + duration, name))
  return intervals


def wall_shares(intervals: Iterable[Tuple[int, int, str]]) -> Dict[str, int]:
  """Nanoseconds charged to each name: every instant is split evenly among
  the intervals covering it, so the values add up to the union's length."""
  events = []
  for start, end, name in intervals:
    events += [(start, 1, name), (end, -1, name)]
  events.sort(key=lambda e: (e[0], e[1]))
  running: collections.Counter = collections.Counter()
  shares: Dict[str, float] = collections.defaultdict(float)
  last = events[0][0] if events else 0
  for t, kind, name in events:
    k = sum(running.values())
    if k and t > last:
      for other, n in running.items():
        shares[other] += (t - last) * n / k
    last = t
    running[name] += kind
    if not running[name]:
      del running[name]
  return {name: int(round(v)) for name, v in shares.items()}


def trace_op_seconds(fn: Callable[[], object], repeats: int = 1,
                     ops: Optional[Dict[str, HloOp]] = None
                     ) -> Dict[str, float]:
  """Wall seconds per call charged to each HLO instruction while running
  ``fn`` (see the module docstring).

  Args:
    fn: runs the compiled program once and blocks until it is done.
    repeats: calls traced; the result is the mean per call.
    ops: the program's parsed HLO; its loops and calls are left out, so
      their time goes to the instructions of their bodies.

  Returns:
    ``{hlo instruction name: seconds per call}``.
  """
  intervals = trace_op_intervals(fn, repeats)
  if ops is not None:
    intervals = [i for i in intervals
                 if i[2] not in ops or ops[i[2]].opcode not in _CONTAINERS]
  return {name: ns * 1e-9 / repeats
          for name, ns in wall_shares(intervals).items()}


def _charged(name: str, ops: Dict[str, HloOp]) -> bool:
  """An instruction of this program that is not a loop or call (whose time
  is that of their bodies' instructions)."""
  return name in ops and ops[name].opcode not in _CONTAINERS


@dataclasses.dataclass(frozen=True)
class Row:
  category: str
  seconds: float
  share: float
  count: int


def breakdown(op_seconds: Dict[str, float],
              ops: Dict[str, HloOp]) -> List[Row]:
  """Per-category seconds, share of the total and instruction count.

  Instructions missing from ``ops`` (e.g. of another program traced at the
  same time) are ignored, and so are loops and calls: their time is that of
  the instructions of their bodies, which are traced too.
  """
  secs: Dict[str, float] = collections.defaultdict(float)
  counts: Dict[str, int] = collections.defaultdict(int)
  for name, s in op_seconds.items():
    if _charged(name, ops):
      cat = categorize(ops[name])
      secs[cat] += s
      counts[cat] += 1
  total = sum(secs.values()) or 1.0
  return [Row(c, secs[c], secs[c] / total, counts[c])
          for c in CATEGORIES if c in secs]


def top_ops(op_seconds: Dict[str, float], ops: Dict[str, HloOp],
            n: int = 10) -> List[Tuple[str, str, float]]:
  """The ``n`` slowest instructions (loops and calls excluded):
  ``(name, category, seconds)``."""
  named = [(k, categorize(ops[k]), v) for k, v in op_seconds.items()
           if _charged(k, ops)]
  return sorted(named, key=lambda r: -r[2])[:n]


def profile(fn: Callable[[], object], hlo_text: str,
            repeats: int = 1) -> Tuple[List[Row], Dict[str, float],
                                       Dict[str, HloOp]]:
  """Traces ``repeats`` calls of ``fn``, which runs the program ``hlo_text``.

  ``fn`` must block until the program is done; it may carry state from call
  to call (e.g. a training step whose old state is donated).

  Returns:
    The category rows, seconds per instruction, and the parsed HLO.
  """
  ops = parse_hlo(hlo_text)
  secs = trace_op_seconds(fn, repeats, ops)
  return breakdown(secs, ops), secs, ops


def format_table(rows: Sequence[Row], wall_s: float = 0.0) -> str:
  """A text table: category, ms, % and instruction count."""
  lines = [f"  {'category':<26}{'ms':>10}{'%':>7}{'ops':>6}"]
  for r in rows:
    lines.append(f"  {r.category:<26}{r.seconds * 1e3:10.1f}"
                 f"{r.share * 100:7.1f}{r.count:6d}")
  total = sum(r.seconds for r in rows)
  lines.append(f"  {'total (traced)':<26}{total * 1e3:10.1f}"
               f"{100.0:7.1f}{sum(r.count for r in rows):6d}")
  if wall_s:
    lines.append(f"  {'wall time of the step':<26}{wall_s * 1e3:10.1f}")
  return "\n".join(lines)


def flops_of(program) -> float:
  """XLA's cost-analysis FLOP estimate of a lowered or compiled program (0
  if absent)."""
  cost = program.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def step_flops(method, state, batch, rng) -> float:
  """XLA's FLOP estimate of one ``method.train_step``, lowered unsplit.

  Cost analysis counts a loop body once, so a step that scans over ``n``
  microbatches would report ``1/n`` of its work; the unsplit step does the
  same arithmetic. ``state`` may be abstract (shapes only).
  """
  method = copy.copy(method)
  if hasattr(method, "microbatches"):
    method.microbatches = 1
  return flops_of(jax.jit(method.train_step).lower(state, batch, rng))


# Dense peak TFLOP/s per device by (device_kind substring, dtype). With JAX's
# default matmul precision, float32 convolutions and dots run on TF32 tensor
# cores on A100/H100/H200 and as one bf16 pass on TPUs, so those are the
# float32 peaks (--peak_tflops overrides, e.g. under "highest" precision).
PEAK_TFLOPS = {
    ("H100", "bfloat16"): 989.0, ("H100", "float32"): 495.0,
    ("H200", "bfloat16"): 989.0, ("H200", "float32"): 495.0,
    ("A100", "bfloat16"): 312.0, ("A100", "float32"): 156.0,
    ("TPU v4", "bfloat16"): 275.0, ("TPU v4", "float32"): 275.0,
    ("TPU v5 lite", "bfloat16"): 197.0, ("TPU v5 lite", "float32"): 197.0,
    ("TPU v5p", "bfloat16"): 459.0, ("TPU v5p", "float32"): 459.0,
}


def peak_tflops(device_kind: str, dtype: str) -> float:
  for (kind, dt), value in PEAK_TFLOPS.items():
    if kind in device_kind and dt == dtype:
      return value
  return 0.0
