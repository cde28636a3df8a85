#!/usr/bin/env bash
# Installs what KeySealer needs on a Debian/Ubuntu machine: the Debian packages listed in
# deploy/packages/ and a Python virtual environment in .venv with KeySealer installed (editable).
#   deploy/bootstrap.sh          runtime packages only
#   deploy/bootstrap.sh --test   also what the test suite needs (deploy/packages/*.txt, '.[test]')
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

missing=()
for package in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "bootstrap: KeySealer needs Python 3.11 or newer ($python is older)" >&2; exit 2; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
extra=""
[ "$mode" = "--test" ] && extra="[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
echo "bootstrap: ready (.venv/bin/keysealer)"
