#!/usr/bin/env bash
# Makes root's podman usable on a machine like CI's (idempotent; run as root):
#   - runc, not crun: crun refuses this machine's hybrid cgroup hierarchy ("cgroups in hybrid mode not
#     supported");
#   - no default ulimits: podman sets RLIMIT_NPROC etc. by default, and a kernel that withholds
#     CAP_SYS_RESOURCE refuses ("setrlimit RLIMIT_NPROC: operation not permitted").
# Written as a containers.conf drop-in of its own, so it replaces nothing of the machine's configuration.
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "podman-setup.sh: run as root" >&2; exit 2; }
dropin=/etc/containers/containers.conf.d/50-keysealer.conf
want='# Written by KeySealer deploy/container/podman-setup.sh
[containers]
default_ulimits = []

[engine]
runtime = "runc"'
if [ "$(cat "$dropin" 2>/dev/null)" != "$want" ]; then
  install -d -m 0755 "$(dirname "$dropin")"
  printf '%s\n' "$want" > "$dropin"
fi
