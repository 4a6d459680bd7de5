# Two commands matter: `make demo` and `make test`. Both create the venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastpost-installed

.PHONY: venv test demo assets clean

venv: $(STAMP)

# torch first, pinned: on these machines 2.13.0 is a cached CPU build; an unpinned torch would pull CUDA wheels.
$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

# writes outputs/demo/{loss_curve,before_after}.png among the rest
demo: $(STAMP)
	$(PY) -m fastpost.cli demo --workdir outputs/demo

# copy the images of the last `make demo` into assets/ and redraw assets/architecture.png (commit the result)
assets: $(STAMP)
	$(PY) scripts/refresh_assets.py --workdir outputs/demo

clean:
	rm -rf $(VENV) outputs .pytest_cache
