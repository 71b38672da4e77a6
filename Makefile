# Every target bootstraps .venv on first use, so a fresh clone needs only `make demo`
# or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-transfer test test-slow test-cluster chaos lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/imagenet-jax train

# Fine-tuning from the demo's weights against scratch and a linear probe (the README's
# table); trains the demo first if runs/demo holds no run.
demo-transfer: $(STAMP)
	test -d runs/demo/checkpoints || $(BIN)/imagenet-jax train
	$(BIN)/python scripts/demo_transfer.py

# Two pytest workers, a test file each at a time (its fixtures and compiled steps stay
# with it): many tests wait on subprocesses, sockets and timeouts, which the other
# worker's tests fill.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m slow

# launch/slurm.sbatch under a real SLURM started on this machine (tests/cluster/): needs root
# and Debian's slurmctld slurmd slurm-client munge (.ci/run installs them). The cluster stops
# with the session; `slurm_cluster.py clean` then removes any a killed session left behind.
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q -m cluster --durations=5 tests/cluster; status=$$?; \
	  $(BIN)/python tests/cluster/slurm_cluster.py clean; exit $$status

# SIGKILL the demo recipe at random steps, restart it, compare with an uninterrupted run.
chaos: $(STAMP)
	$(BIN)/python tests/chaos.py --kills=5

lint: $(STAMP)
	$(BIN)/ruff check imagenet_jax tests configs benchmarks

clean:
	rm -rf $(VENV) runs
