#!/usr/bin/env bash
# The whole test suite from a fresh Debian/Ubuntu machine: install, lint, type-check, test.
# Extra arguments go to pytest (e.g. tests/run.sh -k lifecycle).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/bootstrap.sh --test
export PATH="$PWD/.venv/bin:$PATH"

ruff check .
# mypy cannot follow the editable install's folder-to-package mapping: give it the same tree as links.
typecheck=$(mktemp -d)
trap 'rm -rf "$typecheck"' EXIT
mkdir "$typecheck/keysealer"
cp shared/_root/__init__.py "$typecheck/keysealer/"
for part in shared frontend hsm_broker tools; do ln -s "$PWD/$part" "$typecheck/keysealer/$part"; done
(cd "$typecheck" && MYPYPATH="$typecheck" mypy --config-file "$OLDPWD/pyproject.toml" -p keysealer)

python -m pytest "$@"
