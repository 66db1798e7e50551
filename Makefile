# The two commands a newcomer needs (see README.md). Both set up first; set-up is idempotent.
.PHONY: setup demo test

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/varcon train

test: setup
	bash scripts/check_job_submit.sh
	.venv/bin/python -m pytest
