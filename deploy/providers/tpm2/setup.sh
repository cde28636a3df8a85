#!/usr/bin/env bash
# TPM 2.0 through tpm2-pkcs11: a software TPM (swtpm, state in STATE_DIR/tpm) on loopback TCP, behind the
# access broker tpm2-abrmd on a private D-Bus bus (STATE_DIR/dbus.sock); the tpm2-pkcs11 store (an SQLite
# file holding the token's objects, their key material sealed by the TPM) in STATE_DIR/store.
#   deploy/providers/tpm2/setup.sh STATE_DIR
# Keys: deploy/providers/tpm2/create-key.sh STATE_DIR BROKER_CONFIG (aes-cbc-hmac: a TPM has no AES-GCM,
# and tpm2-pkcs11 cannot generate keys through PKCS #11).
# Why tpm2-abrmd: a TPM holds only a few loaded objects at a time; several workers talking to it directly
# run out of them, the broker swaps them per connection. And the module reaches it over D-Bus, a Unix
# socket: the broker's sandbox (AF_UNIX only) stays as it is.
source "$(dirname "$0")/../lib.sh"
begin_setup "$@"

BUS_NAME=io.keysealer.Tabrmd  # not the system broker's name: a client on the wrong bus fails, never mixes
bus_socket=$STATE_DIR/dbus.sock

# True once the swtpm of PID answers on its control PORT, or has exited (its port was taken).
swtpm_settled() { ! kill -0 "$1" 2>/dev/null || swtpm_ioctl --tcp "127.0.0.1:$2" -c; }

# swtpm serves TPM commands on a port and its control channel on the next one (as the swtpm TCTI expects),
# both on loopback. A taken port makes it exit at once: then try another pair. Sets TPM_PORT.
start_swtpm() {
  local attempt pid
  mkdir -p -m 0700 "$STATE_DIR/tpm"
  for attempt in 1 2 3 4 5 6 7 8; do
    TPM_PORT=$((20000 + 2 * (RANDOM % 20000)))
    start_daemon swtpm swtpm socket --tpm2 --tpmstate "dir=$STATE_DIR/tpm,mode=0600" \
      --server "type=tcp,port=$TPM_PORT,bindaddr=127.0.0.1" \
      --ctrl "type=tcp,port=$((TPM_PORT + 1)),bindaddr=127.0.0.1" --flags not-need-init,startup-clear
    pid=$(tail -n 1 "$STATE_DIR/pids")
    wait_until "swtpm did not answer on port $((TPM_PORT + 1))" "$STATE_DIR/swtpm.log" \
      swtpm_settled "$pid" $((TPM_PORT + 1))
    ! kill -0 "$pid" 2>/dev/null || return 0
  done
  fail "swtpm found no free loopback port pair in $attempt attempts; see $STATE_DIR/swtpm.log"
}

start_private_bus() {
  cat > "$STATE_DIR/dbus.conf" <<CONF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <!-- Only this user may connect (no <allow user>), and only tpm2-abrmd's name may be owned. -->
  <type>session</type>
  <listen>unix:path=$bus_socket</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
    <allow own="$BUS_NAME"/>
  </policy>
</busconfig>
CONF
  start_daemon dbus-daemon dbus-daemon --config-file="$STATE_DIR/dbus.conf" --nofork --nopidfile
  wait_for "$bus_socket" "$STATE_DIR/dbus-daemon.log"
}

start_swtpm
start_private_bus
export DBUS_SESSION_BUS_ADDRESS=unix:path=$bus_socket
export TPM2TOOLS_TCTI=tabrmd:bus_name=$BUS_NAME,bus_type=session
export TPM2_PKCS11_STORE=$STATE_DIR/store
abrmd=(tpm2-abrmd --session "--dbus-name=$BUS_NAME" "--tcti=swtpm:host=127.0.0.1,port=$TPM_PORT")
[ "$(id -u)" -ne 0 ] || abrmd+=(--allow-root)  # it refuses root otherwise; as root only on test machines
start_daemon tpm2-abrmd "${abrmd[@]}"
wait_until "tpm2-abrmd did not answer on $BUS_NAME" "$STATE_DIR/tpm2-abrmd.log" \
  timeout 5 tpm2_getcap properties-fixed

# The environment tpm2_ptool (and the tpm2-tools it runs) needs: create-key.sh reads it.
cat > "$STATE_DIR/tools.env" <<ENV
export DBUS_SESSION_BUS_ADDRESS='$DBUS_SESSION_BUS_ADDRESS' TPM2TOOLS_TCTI='$TPM2TOOLS_TCTI' TPM2_PKCS11_STORE='$TPM2_PKCS11_STORE'
ENV
mkdir -p -m 0700 "$TPM2_PKCS11_STORE"
# A primary key in the TPM's owner hierarchy, made persistent, parent of every key of the token.
primary=$(tpm2_ptool init | sed -n 's/^id: //p')
new_pin pin
new_pin so-pin
# tpm2_ptool takes PINs only as arguments: they are visible in ps for the moment it runs.
tpm2_ptool addtoken --pid "$primary" --label "$TOKEN_LABEL" --userpin "$(pin pin)" --sopin "$(pin so-pin)" >/dev/null
write_token_yaml "$(first_file /usr/lib/*-linux-gnu/pkcs11/libtpm2_pkcs11.so /usr/lib64/pkcs11/libtpm2_pkcs11.so \
  /usr/lib/pkcs11/libtpm2_pkcs11.so)" "TPM2_PKCS11_STORE=$TPM2_PKCS11_STORE" "TPM2_PKCS11_TCTI=$TPM2TOOLS_TCTI" \
  "DBUS_SESSION_BUS_ADDRESS=$DBUS_SESSION_BUS_ADDRESS" "TPM2_PKCS11_LOG_LEVEL=0"
# tpm2-pkcs11 reads the store only in C_Initialize: the broker restarts it when the store changed (new keys).
echo "reinitialize_when_changed: $TPM2_PKCS11_STORE/tpm2_pkcs11.sqlite3" >> "$STATE_DIR/token.yaml"
