"""Every notebook in experiments/notebooks runs top to bottom, as stored.

Each notebook runs in its own fresh kernel with its working directory,
temporary files and data sets under pytest's temporary folders, so nothing
is written into the repository. Two kernels run side by side: most of a
miniature notebook's time is single-threaded Python (imports, tracing), so
the two cores nearly halve the wall time.
"""

import asyncio
import importlib.util
import os
import re
import subprocess
import sys
import time

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "experiments", "notebooks")
# Notebooks run in order within a chain and chains side by side. Notebooks
# that build the same data set share a chain: concurrent builds of one data
# set would race (quickstart and translation both use the 16-px phantom).
CHAINS = (("quickstart", "translation"), ("augmentation_study", "own_data"))
CELL_TIMEOUT_S = 300
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def stored_notebooks():
  return sorted(f[:-len(".ipynb")] for f in os.listdir(NOTEBOOKS)
                if f.endswith(".ipynb"))


def read(name):
  return nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)


def failed_cell(nb, error: CellExecutionError) -> str:
  """Which cell failed, with its source and traceback (no colour codes)."""
  index = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code"
                and any(o.output_type == "error" for o in c.get("outputs", []))),
               None)
  return f"cell {index} failed. " + ANSI.sub("", str(error))


async def _execute(name, work):
  """Runs notebook ``name`` in a new kernel whose working directory is
  ``work/name``; returns (seconds, None or the failure)."""
  nb = read(name)
  cwd = os.path.join(work, name)
  os.makedirs(cwd)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": cwd}})
  start = time.time()
  try:
    await client.async_execute()
    problem = None
  except CellExecutionError as e:
    problem = failed_cell(nb, e)
  except Exception as e:  # pylint: disable=broad-except
    # A dead kernel or a cell timeout fails this notebook only.
    problem = f"{type(e).__name__}: {e}"
  finally:
    nbformat.write(nb, os.path.join(work, f"{name}.executed.ipynb"))
  return time.time() - start, problem


async def _run_chains(chains, work):
  results = {}

  async def chain(names):
    for name in names:
      results[name] = await _execute(name, work)

  await asyncio.gather(*(chain(c) for c in chains))
  return results


@pytest.fixture(scope="module")
def executed(data_dir, tmp_path_factory):
  """{name: (seconds, failure or None)} of every stored notebook; kernels
  get the repository on PYTHONPATH (so the install cell does nothing), the
  session's data dir and a temporary TMPDIR."""
  work = str(tmp_path_factory.mktemp("notebooks"))
  tmp = str(tmp_path_factory.mktemp("notebook_tmp"))
  path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
  with pytest.MonkeyPatch.context() as env:
    for key, value in (("PYTHONPATH", path), ("MEDGEN_DATA_DIR", data_dir),
                       ("TMPDIR", tmp)):
      env.setenv(key, value)
    return asyncio.run(_run_chains(CHAINS, work))


def test_every_notebook_is_in_a_chain_and_stored_without_outputs():
  assert sorted(n for c in CHAINS for n in c) == stored_notebooks()
  install = None
  for name in stored_notebooks():
    nb = read(name)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3", name
    code = [c for c in nb.cells if c.cell_type == "code"]
    for c in code:
      assert not c.outputs and c.execution_count is None, (
          f"{name}.ipynb is stored with outputs: clear them before saving")
    # The same install cell opens every notebook.
    install = install or code[0].source
    assert code[0].source == install, name


@pytest.mark.parametrize("name", [n for c in CHAINS for n in c])
def test_notebook_runs_top_to_bottom(executed, name, request):
  seconds, problem = executed[name]
  # The fixture runs them all: each test carries its own notebook's time.
  request.node.user_properties.append(("seconds", round(seconds, 1)))
  assert problem is None, f"{name}.ipynb ({seconds:.0f} s): {problem}"


def _install_cell():
  return next(c.source for c in read("quickstart").cells
              if c.cell_type == "code")


def _run_install_cell(monkeypatch, cwd):
  """Runs the install cell as if medgen_jax were not installed, in ``cwd``;
  returns the pip commands it ran (recorded, not run)."""
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
      None if name == "medgen_jax" else real(name, *a)))
  calls = []
  monkeypatch.setattr(subprocess, "check_call", calls.append)
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.chdir(cwd)
  exec(compile(_install_cell(), "install cell", "exec"), {})  # pylint: disable=exec-used
  return calls


def test_install_cell_installs_the_checkout_it_sits_in(monkeypatch):
  calls = _run_install_cell(monkeypatch, NOTEBOOKS)
  pip = [sys.executable, "-m", "pip", "install", "-q"]
  assert calls == [pip + ["-r", os.path.join(ROOT, "requirements.txt")],
                   pip + ["-e", ROOT]]
  assert sys.path[0] == ROOT


def test_install_cell_outside_a_checkout_says_to_clone(monkeypatch,
                                                       tmp_path):
  with pytest.raises(RuntimeError, match=r"not inside a checkout .* Clone "
                     r"the repository first"):
    _run_install_cell(monkeypatch, str(tmp_path))
