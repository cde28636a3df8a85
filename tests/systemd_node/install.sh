#!/bin/bash
# Steps 2-5 of docs/confinement.md's "Installation, step by step" (docs/install.md's systemd section points
# there), run as root on the booted systemd node by tests/test_deployment_shapes.py. The configs are
# docs/configuration.md's examples, which the test puts in /etc/keysealer first.
set -euo pipefail
# 2. Users, groups, directories
systemd-sysusers /src/deploy/systemd/keysealer.conf
install -m 0644 /src/deploy/systemd/keysealer.conf /usr/lib/sysusers.d/keysealer.conf
install -m 0644 /src/deploy/systemd/keysealer-tmpfiles.conf /usr/lib/tmpfiles.d/keysealer.conf
systemd-tmpfiles --create /usr/lib/tmpfiles.d/keysealer.conf
# 3. Configuration, PIN, IPC keys
printf '%s\n' 'directories.tokendir = /var/lib/keysealer/tokens' 'objectstore.backend = file' \
  'log.level = ERROR' 'slots.removable = false' > /etc/keysealer/softhsm2.conf
(umask 077 && openssl rand -hex 16 > /etc/keysealer/pin)
systemd-tmpfiles --create /usr/lib/tmpfiles.d/keysealer.conf
install -d -m 0755 /etc/keysealer/ipc
/opt/keysealer/bin/keysealer ipc-keygen --dir /etc/keysealer/ipc --name broker
/opt/keysealer/bin/keysealer ipc-keygen --dir /etc/keysealer/ipc --name frontend
chown keysealer-hsm:keysealer-hsm /etc/keysealer/ipc/broker.key_secret
chown keysealer-kms:keysealer-kms /etc/keysealer/ipc/frontend.key_secret
# 4. Token and key, as the broker's user
install -m 0400 -o keysealer-hsm -g keysealer-hsm <(openssl rand -hex 16) /run/keysealer-so-pin
runuser -u keysealer-hsm -- /opt/keysealer/bin/keysealer keys init-token --config /etc/keysealer/broker.yaml --so-pin-file /run/keysealer-so-pin
runuser -u keysealer-hsm -- /opt/keysealer/bin/keysealer keys create --config /etc/keysealer/broker.yaml
# 5. The units, unchanged
install -m 0644 /src/deploy/systemd/keysealer-broker.service /src/deploy/systemd/keysealer-frontend.service /etc/systemd/system/
systemctl daemon-reload
systemctl enable --now keysealer-broker keysealer-frontend
