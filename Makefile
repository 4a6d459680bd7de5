# Two commands matter: `make demo` and `make test`. Both create the venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastpost-installed

.PHONY: venv test test-browser demo assets clean

venv: $(STAMP)

# torch first, pinned: on these machines 2.13.0 is a cached CPU build; an unpinned torch would pull CUDA wheels.
$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,serve,browser]"
	touch $(STAMP)

# two pytest workers (pytest-xdist), one per core: a test file stays in one worker, so its module fixtures are
# built once; measured 489 s -> 259 s for the suite on 2 cores
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -rs -n 2 --dist loadfile tests

# the page of `fastpost serve` in headless Chromium (selenium comes with the venv); `make test` runs it too when
# chromium is installed and says why it skipped it otherwise. Only this target rewrites docs/assets/serve.png
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-browser: $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		$(SUDO) apt-get install -y chromium chromium-driver || \
		{ $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium chromium-driver; }
	FASTPOST_SCREENSHOT=docs OMP_NUM_THREADS=1 $(PY) -m pytest -q -rs tests/test_serve.py

# writes outputs/demo/{loss_curve,before_after}.png among the rest
demo: $(STAMP)
	$(PY) -m fastpost.cli demo --workdir outputs/demo

# copy the images of the last `make demo` into assets/ and redraw assets/architecture.png (commit the result)
assets: $(STAMP)
	$(PY) scripts/refresh_assets.py --workdir outputs/demo

clean:
	rm -rf $(VENV) outputs .pytest_cache
