# The two commands of the README: `make demo` and `make test`; `make lab` opens the notebooks.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first and pinned: the CPU build on this kind of machine's disk; an unpinned torch
# would pull a multi-GB CUDA build. Override e.g. TORCH_SPEC="torch" on a GPU machine.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test notebooks lab bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# forgetting in minutes: three synthetic games in sequence, dense and MoE cohort, 3 seeds (CPU)
demo: $(VENV)/.installed
	$(PY) -m ooc_moe demo

# the whole suite: unit, property and integration tests, and every notebook (quick mode), on
# every core (pytest-xdist; the browser cases share one worker and one JupyterLab)
test: $(VENV)/.installed
	OOC_MOE_QUICK=1 $(PY) -m pytest -n auto --dist loadgroup --nbmake --nbmake-timeout=600 --durations=25

# the notebooks as committed: run in quick mode and saved with their outputs, so a reader sees
# the plots without running anything (`make test` runs them again, without saving)
NOTEBOOKS ?= $(wildcard notebooks/[0-9][0-9]_*.ipynb)
notebooks: $(VENV)/.installed
	OOC_MOE_QUICK=1 $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=900 --ExecutePreprocessor.record_timing=False $(NOTEBOOKS)

bench: $(VENV)/.installed
	$(PY) -m ooc_moe bench all

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
