#!/usr/bin/env bash
# Installs what KeySealer needs on a Debian/Ubuntu machine: the Debian packages listed in
# deploy/packages/ and a Python virtual environment in .venv with KeySealer installed (editable).
#   deploy/bootstrap.sh          runtime packages only
#   deploy/bootstrap.sh --test   also what the test suite needs (deploy/packages/*.txt, '.[test]') and,
#                                as far as they install, the tokens of deploy/providers/*/packages.txt
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-run}
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

lists=(deploy/packages/runtime.txt)
[ "$mode" = "--test" ] && lists=(deploy/packages/*.txt)
mapfile -t wanted < <(grep -hv '^\s*\(#\|$\)' "${lists[@]}" | sort -u)

python=${PYTHON:-python3}
command -v "$python" >/dev/null || wanted+=(python3)
"$python" -c 'import ensurepip, venv' 2>/dev/null || wanted+=(python3-venv)

updated=""
# Installs the packages named that are missing; returns apt-get's status.
install_missing() {
  local missing=() package
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  echo "bootstrap: installing ${missing[*]}"
  [ -n "$updated" ] || { $sudo apt-get update -qq && updated=1; }
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
install_missing "${wanted[@]}"

if [ "$mode" = "--test" ]; then
  # A provider that cannot be installed here is not fatal: its tests skip, saying which package is missing.
  for list in deploy/providers/*/packages.txt; do
    mapfile -t provider < <(grep -v '^\s*\(#\|$\)' "$list")
    install_missing "${provider[@]}" \
      || echo "bootstrap: provider $(basename "$(dirname "$list")") did not install; its tests will be skipped" >&2
  done
fi

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "bootstrap: KeySealer needs Python 3.11 or newer ($python is older)" >&2; exit 2; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
extra=""
[ "$mode" = "--test" ] && extra="[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
echo "bootstrap: ready (.venv/bin/keysealer)"
