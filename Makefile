# forest_perception: `make demo` and `make test` do all the set-up on a fresh Debian 12 machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEBIAN_PACKAGES := libusb-1.0-0 libgl1 libegl1 libegl-mesa0 libgl1-mesa-dri python3-venv
DEMO_OUT ?= demo_output
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Keep every cache and log of a run inside the tree.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: all demo test test-fast lint bench experiments experiments-quick sysdeps venv lock clean distclean

all: test

sysdeps:
	@missing=""; \
	for p in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ "$$missing" = " python3-venv" ] && $(PYTHON) -c "import ensurepip, venv" 2>/dev/null; then missing=""; fi; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(STAMP): requirements.txt constraints.txt setup.py
	@$(MAKE) --no-print-directory sysdeps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements.txt -c constraints.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

venv: $(STAMP)

# Re-pin every transitive dependency after changing requirements.txt.
lock: $(STAMP)
	$(PIP) freeze --exclude-editable | grep -v '^forest.perception' > constraints.txt

# lint first (seconds), then every test: unit/ (pure cores), ros/ (nodes on loopback), e2e/ (slow, whole chains)
test: $(STAMP)
	$(VENV)/bin/ruff check .
	ROS_LOG_DIR=$(CURDIR)/.venv/ros_log $(PY) -m pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(PY) -m forest_perception.demo --out $(DEMO_OUT)

bench: $(STAMP)
	@set -e; for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script; done

# reproduce the seed papers' claims on the forest depth task (experiments/results/README.md): two jobs side by
# side, about 2 hours on 2 cores, estimated from its parts (quick: under 5 min)
experiments: $(STAMP)
	$(PY) -m experiments.run_all

experiments-quick: $(STAMP)
	$(PY) -m experiments.run_all --quick

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache build install log *.egg-info

distclean: clean
	rm -rf $(VENV)
