#!/usr/bin/env bash
# Builds the KeySealer images with podman, no registry needed:
#   localhost/keysealer:VERSION          the runtime image (deploy/container/Containerfile)
#   localhost/keysealer-softhsm:VERSION  the same plus Debian's SoftHSM (Containerfile.softhsm)
# and prints their names, one a line. VERSION is pyproject.toml's.
#
#   deploy/container/build.sh [--base IMAGE] [--prefix PREFIX]
#     --base IMAGE     the base of both images, already in podman's storage (e.g. a pinned
#                      docker.io/library/python:3.11-slim-bookworm@sha256:... you pulled). Without it, a
#                      Debian bookworm base is made once from the machine's Debian mirror with
#                      debootstrap (needs root) and kept as PREFIXkeysealer-base:bookworm.
#     --prefix PREFIX  image names start with PREFIX instead of localhost/ (the tests use their own).
# Environment: DEBIAN_MIRROR (default: the first deb.debian.org-style URI of the machine's apt sources).
set -euo pipefail
cd "$(dirname "$0")/../.."

fail() { echo "build.sh: $*" >&2; exit 2; }

base="" prefix="localhost/"
while [ $# -gt 0 ]; do
  case "$1" in
    --base) [ $# -ge 2 ] || fail "--base needs an image name"; base=$2; shift 2 ;;
    --prefix) [ $# -ge 2 ] || fail "--prefix needs a value"; prefix=$2; shift 2 ;;
    *) fail "unknown argument '$1' (usage: build.sh [--base IMAGE] [--prefix PREFIX])" ;;
  esac
done

command -v podman >/dev/null || fail "podman is not installed (Debian: apt-get install podman runc)"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
[ -n "$version" ] || fail "no version in pyproject.toml"

# A Debian bookworm base: minbase + python3 (no pip, no compiler), with the machine's CA bundle so that
# pip in the build stage trusts what the machine trusts.
make_debian_base() {
  local image=$1 mirror root
  command -v debootstrap >/dev/null || fail "debootstrap is not installed (apt-get install debootstrap), or pass --base"
  [ "$(id -u)" -eq 0 ] || fail "making the Debian base needs root (debootstrap), or pass --base"
  mirror=${DEBIAN_MIRROR:-$( (grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ \
                                2>/dev/null || true) | head -1 | tr -d ' ')}
  mirror=${mirror:-http://deb.debian.org/debian}
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  echo "build.sh: making $image with debootstrap from $mirror" >&2
  debootstrap --variant=minbase --include=python3,libseccomp2 bookworm "$root" "$mirror" >/dev/null \
    || fail "debootstrap from $mirror failed"
  install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | podman import --quiet - "$image" >/dev/null
  rm -rf "$root"
  trap - EXIT
}

if [ -n "$base" ]; then
  podman image exists "$base" || fail "base image '$base' is not in podman's storage (podman pull it, or omit --base)"
else
  base="${prefix}keysealer-base:bookworm"
  podman image exists "$base" || make_debian_base "$base"
fi

runtime="${prefix}keysealer:${version}"
softhsm="${prefix}keysealer-softhsm:${version}"
# --network host: the only network the build uses is the package registries (Debian mirror, PyPI).
# --layers=false: no cached intermediate images are left behind (a full build takes about half a minute).
podman build --quiet --layers=false --network host --build-arg "PYTHON_IMAGE=$base" \
  -f deploy/container/Containerfile -t "$runtime" . >/dev/null
podman build --quiet --layers=false --network host --build-arg "KEYSEALER_IMAGE=$runtime" \
  -f deploy/container/Containerfile.softhsm -t "$softhsm" . >/dev/null
echo "$runtime"
echo "$softhsm"
