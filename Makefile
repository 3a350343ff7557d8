# The two commands a user needs: `make demo` and `make test`. Both create .venv on first use
# and reuse it afterwards (the stamp file is rebuilt only when the pins change). For a GPU machine
# without network access: `make gpu-wheels` here, then `make gpu-check` there (README, "GPU check").
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean gpu-wheels gpu-check device-env

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py

# The linter first: an undefined name in a script no test runs (bench/, tools/) fails here, in seconds.
# The cluster tests' Debian packages next, when missing (as root on Debian/Ubuntu; elsewhere those tests skip).
test: lint
	bash tests/cluster/install_packages.sh
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# For contributors: the suite without the tests that wait for training processes (a few minutes).
test-fast: lint
	$(PY) -m pytest tests -m "not slow"

gpu-wheels: $(STAMP)
	PYTHON=$(PY) bash bench/gpu_wheels.sh

# No .venv there: the GPU machine's own Python, with the wheels of .whl/.
gpu-check:
	bash bench/gpu_check.sh

# The GPU machine's software (Python 3.12, torch 2.11, the wheels of .whl/ on PYTHONPATH, Pillow 12 and 13) on this
# CPU: the GPU check's dry run and the not-slow tests (bench/device_env.sh). Before a GPU session; not in CI (4.7 GB).
device-env: $(STAMP)
	WHEEL_PYTHON=$(PY) bash bench/device_env.sh

clean:
	rm -rf $(VENV) runs/demo shards/demo
