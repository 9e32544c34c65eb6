"""The notebooks' Colab cell, run as on a fresh Colab runtime, and its consistency with ooc_moe.colab.

The install test stands in for Colab with a `google.colab` module of our own on PYTHONPATH,
points the cell at a `git+file://` clone of this repository (its committed state) instead of
GitHub, and runs it in a fresh virtual environment. Offline and fast: the environment sees
this one's packages (torch, numpy, pip, setuptools, ...) through a `.pth` line, so pip installs
only ooc-moe, from the clone, without an index and without build isolation.
"""
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from ooc_moe import colab

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def cells(notebook: Path) -> list[dict]:
    return json.loads(notebook.read_text())["cells"]


def first_code_cell(notebook: Path) -> str:
    return "".join(next(c for c in cells(notebook) if c["cell_type"] == "code")["source"])


def test_every_notebook_is_covered():
    assert [p.name for p in NOTEBOOKS] == list(colab.FULL_MODE_COST)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_cells_match_the_module(notebook):
    fix = "run `python -m ooc_moe.colab` to rewrite the notebooks from ooc_moe.colab"
    assert first_code_cell(notebook) == colab.setup_cell(notebook.name), fix
    title = "".join(cells(notebook)[0]["source"])
    assert colab.badge(notebook.name) in title.split("\n")[:4], fix
    assert any("QUICK = quick_mode(QUICK)" in "".join(c["source"]) for c in cells(notebook)), \
        f"{notebook.name}: no cell sets QUICK = quick_mode(QUICK)"


def test_readme_has_every_badge():
    readme = (ROOT / "README.md").read_text()
    for notebook in NOTEBOOKS:
        assert colab.colab_url(notebook.name) in readme, f"README: no Colab link to {notebook.name}"


@pytest.mark.parametrize("env, colab_loaded, cuda, expected", [
    ({}, True, True, True),                           # Colab GPU runtime: quick unless asked
    ({"OOC_MOE_QUICK": "0"}, True, True, False),
    ({}, False, True, False),                         # a GPU machine of one's own: full
    ({}, False, False, True),                         # no GPU: quick
    ({"OOC_MOE_QUICK": "1"}, False, True, True),
])
def test_quick_mode(monkeypatch, env, colab_loaded, cuda, expected):
    monkeypatch.delenv("OOC_MOE_QUICK", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if colab_loaded:
        monkeypatch.setitem(sys.modules, "google.colab", object())
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: cuda)
    assert colab.quick_mode() is expected
    assert colab.quick_mode(not expected) is (not expected)   # the cell's explicit switch wins


def test_results_dir(tmp_path):
    assert colab.results_dir(start=ROOT / "notebooks") == ROOT / "results"
    with pytest.raises(FileNotFoundError, match="not part of the installed package|clone"):
        colab.results_dir("no-such-experiment", start=ROOT)


def git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, timeout=300)


def test_install_cell_in_a_fresh_venv(tmp_path):
    repo = tmp_path / "repo"                    # the committed state, as GitHub would serve it
    git("clone", "-q", "--no-local", str(ROOT), str(repo), cwd=tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)],
                   check=True, capture_output=True, timeout=600)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, timeout=120).stdout.strip()
    # this environment's packages (pip and setuptools too: --without-pip keeps venv's old ones
    # out), after the new one's own, so ooc_moe comes from the install
    (Path(purelib) / "outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    stub = tmp_path / "stub"                    # the stand-in for Colab's own module
    (stub / "google" / "colab").mkdir(parents=True)
    (stub / "google" / "colab" / "__init__.py").write_text('"""Not Colab: a test stand-in."""\n')
    cell = first_code_cell(ROOT / "notebooks" / "05_sequential_atari.ipynb")
    script = tmp_path / "kernel.py"
    script.write_text(textwrap.dedent("""\
        import google.colab                     # a Colab kernel has it loaded from the start
        exec(compile(open("{cell}").read(), "setup_cell", "exec"))
        import ooc_moe
        from ooc_moe.colab import quick_mode, results_dir
        print("package", ooc_moe.__file__)
        print("quick", quick_mode(QUICK))
        print("results", results_dir())
        """).format(cell=tmp_path / "cell.py"))
    (tmp_path / "cell.py").write_text(cell)
    work = tmp_path / "content"                 # Colab's working directory
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "OOC_MOE_", "VIRTUAL_ENV"))}
    env.update(PYTHONPATH=str(stub), PYTHONNOUSERSITE="1",
               OOC_MOE_REPO=f"git+file://{repo}", OOC_MOE_CLONE=str(work / "ooc-moe"),
               PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run([python, str(script)], cwd=work, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert Path(lines["package"]).is_relative_to(venv), out.stdout    # installed, not editable
    assert lines["quick"] == "True"                                    # Colab: quick by default
    assert Path(lines["results"]) == work / "ooc-moe" / "results"     # found from the clone
