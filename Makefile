# Developer checks. `make check` is what CI runs after `bash setup.sh`.
PY ?= .venv/bin/python

.PHONY: check lint format types test test-serial wheel-smoke

check: lint types test wheel-smoke

## ruff lint + format check (the whole tree), and the import contracts of
## pyproject.toml's [tool.importlinter] (layers app > flower > wire > data > core, no cycles)
lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -c "import sys; from importlinter.cli import lint_imports_command; sys.argv[0] = 'lint-imports'; sys.exit(lint_imports_command())" --no-cache

## apply ruff's fixes and formatting
format:
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

## mypy --strict on the library (configuration: [tool.mypy] in pyproject.toml)
types:
	$(PY) -m mypy

## the test suite: the deployment tests (real processes, mostly waiting) beside the rest
## (pytest's exit code 5, "no tests collected", is a failure)
test:
	PY=$(PY) bash .ci/test.sh

## the same tests in one plain pytest process
test-serial:
	@$(PY) -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

## build the wheel, install it into a fresh venv, import it and run a 1-round simulation
wheel-smoke:
	bash .ci/wheel_smoke.sh
