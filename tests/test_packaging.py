"""The project files agree with each other: environment.yml vs pyproject, README vs Makefile."""

import re
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
# conda-forge names that differ from the PyPI names
CONDA_NAMES = {"pytorch": "torch", "opencv": "opencv-python-headless"}


def _split(requirement: str) -> tuple[str, str]:
    name, spec = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", requirement).groups()
    return name.lower().replace("_", "-"), spec.replace(" ", "")


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = dict(_split(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    listed, pip_section = {}, None
    for item in env["dependencies"]:
        if isinstance(item, dict):
            pip_section = item["pip"]
            continue
        name, spec = _split(item)
        if name not in ("python", "pip"):
            listed[CONDA_NAMES.get(name, name)] = spec
    assert listed == wanted
    assert pip_section == ["-e ."], "the package itself comes through the pip section"
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python.replace("python", "") == project["requires-python"]


def test_readme_shows_the_make_targets_that_exist():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test", "notebooks", "lab"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_notebooks_are_numbered_and_use_the_python3_kernel():
    import json
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    for nb in notebooks:
        assert re.match(r"^\d\d_[a-z0-9_]+\.ipynb$", nb.name), nb.name
        meta = json.loads(nb.read_text())["metadata"]
        assert meta["kernelspec"]["name"] == "python3"


def test_plots_never_train_and_modules_import_no_circle():
    """``viz`` draws what it is handed: importing it loads no training code; and no
    subpackage imports one that imports it back (any import, deferred ones in functions
    too)."""
    import ast
    import subprocess
    import sys

    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, ooc_moe.viz; "
         "print(' '.join(m for m in sys.modules if m.startswith('ooc_moe.train')))"],
        capture_output=True, text=True, timeout=300, check=True).stdout.split()
    assert loaded == [], f"importing ooc_moe.viz loads {loaded}"
    package = ROOT / "ooc_moe"

    def name_of(path: Path) -> str:
        parts = path.relative_to(ROOT).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def subpackage(module: str) -> str:        # ooc_moe.viz.agent -> ooc_moe.viz
        return ".".join(module.split(".")[:2])

    edges = {}
    for path in package.rglob("*.py"):
        module = name_of(path)
        base = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                target = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                target = f"{target}.{node.module}" if node.module else target
                if subpackage(target) != subpackage(module):
                    edges.setdefault(subpackage(module), set()).add(subpackage(target))
    circles = [(a, b) for a, targets in edges.items() for b in targets
               if a in edges.get(b, set())]
    assert not circles, f"subpackages importing each other: {circles}"
