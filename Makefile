# The two commands a newcomer needs (see README.md), plus the unit tier for the developer loop. All set up first;
# set-up is idempotent.
.PHONY: setup demo test test-fast test-contention lint resolve-check

# The unit tier runs on pytest-xdist workers, one per core up to 4 (each holds torch and its own fork server;
# TEST_WORKERS=0 runs it in one process); the cluster tier shares one Ray cluster per session, so it runs in one
# process.
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
UNIT_TIER = .venv/bin/python -m pytest -m "not cluster" -n $(TEST_WORKERS) --dist worksteal

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/varcon train

lint: setup
	.venv/bin/ruff check pipeline tune tests bench

test: lint
	$(UNIT_TIER); unit=$$?; \
	.venv/bin/python -m pytest -m cluster; cluster=$$?; \
	exit $$(( unit || cluster ))  # both tiers run whatever the first gave

test-fast: lint
	$(UNIT_TIER)

test-contention: lint
	bash scripts/test_under_contention.sh

# Will the cluster's nodes install? Every runtime pin resolved for their Python (scripts/node_setup.sh) from the
# registry, FFCV from source (scripts/check_node_resolve.py); needs the package registry.
NODE_PYTHON ?= 3.11
resolve-check: setup
	.venv/bin/python scripts/check_node_resolve.py --python-version $(NODE_PYTHON)
