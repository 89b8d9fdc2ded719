# Two entry points for a fresh machine (see README):
#   make demo   - the main job
#   make test   - the test suite
# Both create .venv, install the project into it, and install the Debian
# tools the project drives (when missing and when run as root).

PY       ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
# Debian package:command pairs the labs and tests use.
DEB_TOOLS := iproute2:ip ethtool:ethtool tcpdump:tcpdump tshark:tshark iperf3:iperf3 curl:curl \
             prometheus:prometheus etcd-server:etcd
# Example packages installed beside the project: a service kind from another
# package (entry point affinity_mesh.services), used by the tests.
EXAMPLE_PKGS := examples/amesh-quota

.PHONY: demo test bench golden soak mutate deps venv clean

demo: venv deps
	$(BIN)/amesh demo

test: venv deps
	$(BIN)/pytest $(PYTEST_ARGS)
	$(BIN)/pytest examples/lab-tests   # an outside-style suite: only the pytest plugin's fixtures

bench: venv deps
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python -m benchmarks

# Many seeds of the whole-mesh simulator (not in `make test`: long). A
# failing seed prints the one command that replays it.
SEEDS ?= 1000
STEPS ?= 4
CONTROLLERS ?= 1
soak: venv
	$(BIN)/amesh simulate --seed 0 --seeds $(SEEDS) --steps $(STEPS) --controllers $(CONTROLLERS)

# Mutation testing of the safety logic with mutmut (not in CI: long; see the
# README's "Mutation testing"). MUTANTS narrows the run to some mutants, e.g.
# MUTANTS='dataplane.core.header.*'; results are kept in mutants/ and a second
# run only tests what changed.
MUTATE_CHILDREN ?= 2
MUTANTS ?=
mutate: venv
	$(BIN)/pip install -q -e '.[test,mutate]'
	$(BIN)/mutmut run --max-children $(MUTATE_CHILDREN) $(MUTANTS)
	$(BIN)/python -m tests.mutation_score

golden: venv
	$(BIN)/python -m tests.golden.generate

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(EXAMPLE_PKGS:=/pyproject.toml)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	for pkg in $(EXAMPLE_PKGS); do $(BIN)/pip install -q -e $$pkg || exit 1; done
	touch $@

deps:
	@missing=""; for pair in $(DEB_TOOLS); do \
	  command -v $${pair#*:} >/dev/null 2>&1 || missing="$$missing $${pair%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages:$$missing (run as root or install them)"; exit 1; fi; \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
