#!/usr/bin/env bash
# A remote token through p11-kit: `p11-kit server` exports a SoftHSM token on a Unix socket, and the broker
# loads p11-kit's client module, which forwards every PKCS #11 call to that socket. The same shape serves a
# token on another host when the socket is forwarded (ssh -L, socat), as with a network key store.
#   deploy/providers/p11-kit-remote/setup.sh STATE_DIR
# Keys: keysealer keys create --config BROKER_CONFIG --mechanism rsa-oaep-sha1 (p11-kit 0.24's client does
# not forward AES-GCM or CBC parameters; RSA-OAEP with SHA-1 it does).
source "$(dirname "$0")/../lib.sh"
begin_setup "$@"

TOKEN_LABEL=$TOKEN_LABEL "$PROVIDERS_DIR/softhsm/setup.sh" "$STATE_DIR/exported" >/dev/null
cp -p "$STATE_DIR/exported/pin" "$STATE_DIR/pin"  # the client logs in with the exported token's PIN
socket=$STATE_DIR/p11kit.sock
SOFTHSM2_CONF=$STATE_DIR/exported/softhsm2.conf start_daemon p11-kit-server p11-kit server -f -n "$socket" \
  --provider "$(sed -n 's/^module: //p' "$STATE_DIR/exported/token.yaml")" "pkcs11:token=$TOKEN_LABEL"
wait_for "$socket" "$STATE_DIR/p11-kit-server.log"
write_token_yaml "$(first_file /usr/lib/*-linux-gnu/pkcs11/p11-kit-client.so /usr/lib64/pkcs11/p11-kit-client.so \
  /usr/lib/pkcs11/p11-kit-client.so)" "P11_KIT_SERVER_ADDRESS=unix:path=$socket"
