#!/usr/bin/env bash
# SoftHSMv2: a software token whose store (token files) lives in STATE_DIR. No daemon.
#   deploy/providers/softhsm/setup.sh STATE_DIR
# Keys: keysealer keys create --config BROKER_CONFIG (aes-gcm by default; every mechanism works).
source "$(dirname "$0")/../lib.sh"
begin_setup "$@"

mkdir -p -m 0700 "$STATE_DIR/tokens"
cat > "$STATE_DIR/softhsm2.conf" <<CONF
directories.tokendir = $STATE_DIR/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
export SOFTHSM2_CONF=$STATE_DIR/softhsm2.conf
new_pin pin
new_pin so-pin
# softhsm2-util takes PINs only as arguments: they are visible in ps for the moment it runs.
softhsm2-util --init-token --free --label "$TOKEN_LABEL" --pin "$(pin pin)" --so-pin "$(pin so-pin)" >/dev/null
write_token_yaml "$(first_file /usr/lib/softhsm/libsofthsm2.so /usr/lib/*-linux-gnu/softhsm/libsofthsm2.so \
  /usr/lib64/pkcs11/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so)" "SOFTHSM2_CONF=$SOFTHSM2_CONF"
