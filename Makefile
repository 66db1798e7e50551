# The two commands a newcomer needs (see README.md), plus the unit tier for the developer loop. All set up first;
# set-up is idempotent.
.PHONY: setup demo test test-fast test-contention lint

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/varcon train

lint: setup
	.venv/bin/ruff check pipeline tune tests bench

test: lint
	bash scripts/check_job_submit.sh
	.venv/bin/python -m pytest

test-fast: lint
	.venv/bin/python -m pytest -m "not cluster"

test-contention: lint
	bash scripts/test_under_contention.sh
