# The two set-up commands of the README: `make demo` and `make test`.
# A job's own local Ray listens on 127.0.0.1 only (freeal_stream/actors/runtime.py); tests that start Ray
# themselves need this too, or Ray 2.60 writes a token under ~/.ray. Joining a cluster needs token auth.
export RAY_AUTH_MODE := disabled
export OMP_WAIT_POLICY := PASSIVE
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo lint test
install: .venv/.installed
.venv/.installed: pyproject.toml constraints.txt scripts/install.sh
	bash scripts/install.sh
	touch $@

demo: install
	.venv/bin/freeal-stream run jobs/demo.yaml
	.venv/bin/freeal-stream export jobs/demo.yaml .freeal/demo/labels.csv

# Lint, the format check and the type check run before the tests (CI runs `make test`).
lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

test: install lint
	.venv/bin/python -m pytest -q
