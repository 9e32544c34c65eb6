"""Running the notebooks anywhere: on Google Colab from a fresh runtime, or from a checkout.

A notebook's first cell has to work *before* the package is installed (a fresh Colab
runtime has neither the package nor `results/`), so it cannot import this module: it carries
its own few lines that clone the repository, install it (not editable, so no restart is
needed) and change into the clone's `notebooks/` directory, where `../results` is. This module
is where those lines come from: `setup_cell(notebook)` writes them from `REPO_URL`, `badge`
writes each notebook's "Open in Colab" link, and `python -m ooc_moe.colab` rewrites both in
every notebook. `tests/test_colab_install.py` checks that the notebooks hold exactly what this
module writes, and runs the cell against a local clone in a fresh virtual environment.

Once the package is imported, `quick_mode` decides the notebooks' `QUICK` switch and
`results_dir` finds the committed results relative to the repository root.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

# The repository the notebooks clone on Colab and the badges open. No public address has been
# confirmed for this project, so this is the one place to change it (then run
# `python -m ooc_moe.colab` to rewrite the notebooks); OOC_MOE_REPO overrides it at run time.
REPO_URL = "https://github.com/ooc-moe/ooc-moe"
BRANCH = "main"
CLONE_DIR = "/content/ooc-moe"      # Colab's working directory is /content; OOC_MOE_CLONE overrides

# What the full mode (QUICK = False) asks of each notebook, for the sentence beside the switch.
# Qualitative on purpose: no full-mode run has been timed on a T4 or an A100 yet.
FULL_MODE_COST = {
    "01_tiered_store.ipynb": "larger experts and a 2,000-step run: meant for a GPU (a T4 or an "
                             "A100 both do; not timed)",
    "02_moe_layers.ipynb": "more training steps per run: still small on a T4 or an A100 "
                           "(not timed)",
    "03_env_detector.ipynb": "more frames and training steps: still small on a T4 or an A100 "
                             "(not timed)",
    "04_agent.ipynb": "1,000,000 PPO steps of Pong with the default agent: likely hours on a "
                      "T4 or an A100 (not timed yet)",
    "05_sequential_atari.ipynb": "the synthetic preset live: four kinds x five seeds, about a "
                                 "quarter of an hour on 2 CPU cores (results/synthetic "
                                 "records each run's seconds); a GPU does not speed up models this small",
}


def in_colab() -> bool:
    """True inside Google Colab (its `google.colab` module is loaded in every Colab kernel)."""
    return "google.colab" in sys.modules


def quick_mode(choice: bool | None = None) -> bool:
    """The notebooks' QUICK switch: small sizes that finish in minutes on any machine.

    In order: an explicit `choice` (the `QUICK = ...` line of a notebook's first cell);
    `OOC_MOE_QUICK` (`1` forces quick mode, `0` the full mode); on Colab, quick (a free GPU
    runtime must not start hours of training unasked); without a GPU, quick; else full.
    """
    if choice is not None:
        return bool(choice)
    env = os.environ.get("OOC_MOE_QUICK")
    if env in ("0", "1"):
        return env == "1"
    if in_colab():
        return True
    import torch

    return not torch.cuda.is_available()


def repo_root(start: Path | str | None = None) -> Path:
    """The checkout that holds `start` (default: the working directory), or this package's."""
    candidates = [Path(start or Path.cwd()).resolve(), Path(__file__).resolve().parent]
    for candidate in candidates:
        for path in (candidate, *candidate.parents):
            if (path / "pyproject.toml").is_file() and (path / "ooc_moe").is_dir():
                return path
    raise FileNotFoundError(
        f"no ooc-moe checkout above {candidates[0]}: the committed results are not part of the "
        f"installed package; run the notebook from a clone ({REPO_URL}), e.g. on Colab through "
        f"its first cell")


def results_dir(name: str = "", start: Path | str | None = None) -> Path:
    """`results/<name>` of the checkout (see `repo_root`); a clear error when it is missing."""
    path = repo_root(start) / "results" / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} does not exist: the committed results live in the repository, not in the "
            f"installed package; run the notebook from a clone ({REPO_URL}) or its first cell "
            f"on Colab")
    return path


def colab_url(notebook: str, repo_url: str = REPO_URL, branch: str = BRANCH) -> str:
    """Colab's address for `notebooks/<notebook>` of a GitHub repository."""
    owner_name = repo_url.removesuffix(".git").split("github.com/", 1)[1]
    return f"https://colab.research.google.com/github/{owner_name}/blob/{branch}/notebooks/{notebook}"


def badge(notebook: str) -> str:
    """The markdown "Open in Colab" badge for one notebook."""
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"({colab_url(notebook)})")


def setup_cell(notebook: str) -> str:
    """The source of `notebook`'s first code cell (it must not import ooc_moe)."""
    cost = textwrap.fill(f"QUICK = False: the full mode, {FULL_MODE_COST[notebook]}.", 92,
                         initial_indent="# ", subsequent_indent="#   ")
    return f'''\
import os
import subprocess
import sys

# QUICK = None: quick mode on Colab, without a GPU, or with OOC_MOE_QUICK=1 (minutes).
{cost}
QUICK = None

if "google.colab" in sys.modules:  # a fresh Colab runtime: clone, install (not editable), cd
    REPO = os.environ.get("OOC_MOE_REPO", "{REPO_URL}")
    REPO = REPO.removeprefix("git+")  # a pip-style git+file:// or git+https:// URL also works
    CLONE = os.environ.get("OOC_MOE_CLONE", "{CLONE_DIR}")
    if not os.path.isdir(CLONE):
        subprocess.run(["git", "clone", "-q", "--depth", "1", REPO, CLONE], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", CLONE], check=True)
    os.chdir(os.path.join(CLONE, "notebooks"))  # so that ../results is the clone's'''


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def write_notebooks(directory: Path | str | None = None) -> list[Path]:
    """Rewrite each notebook's first code cell and its title cell's badge; return those changed."""
    directory = Path(directory or repo_root() / "notebooks")
    changed = []
    for notebook in FULL_MODE_COST:
        path = directory / notebook
        nb = json.loads(path.read_text())
        title, setup = nb["cells"][0], next(c for c in nb["cells"] if c["cell_type"] == "code")
        heading, *rest = [l for l in _source(title).split("\n") if "colab-badge.svg" not in l]
        while rest and not rest[0].strip():
            rest.pop(0)
        new_title = "\n".join([heading, "", badge(notebook), "", *rest])
        new_setup = setup_cell(notebook)
        if (_source(title), _source(setup)) == (new_title, new_setup):
            continue
        title["source"] = new_title.splitlines(keepends=True)
        setup["source"] = new_setup.splitlines(keepends=True)
        setup["outputs"], setup["execution_count"] = [], None
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        changed.append(path)
    return changed


if __name__ == "__main__":
    for path in write_notebooks(sys.argv[1] if len(sys.argv) > 1 else None):
        print(f"rewrote {path}")
