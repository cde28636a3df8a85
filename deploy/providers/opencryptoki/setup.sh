#!/usr/bin/env bash
# openCryptoki's software token (Debian 12: opencryptoki 3.8.1, Cryptoki 2.20): the broker loads
# libopencryptoki.so, which reaches the soft token through the slot daemon pkcsslotd.
#   deploy/providers/opencryptoki/setup.sh STATE_DIR          (as root)
# Keys: keysealer keys create --config BROKER_CONFIG --mechanism aes-cbc-hmac (3.8 has no AES-GCM and no
# AES key wrap; rsa-oaep works too, slower).
#
# Unlike the other providers, most of this token's state is global and cannot move to STATE_DIR: 3.8 has
# the paths compiled in and reads no environment variable for them (only OPENCRYPTOKI_TRACE_LEVEL).
#   /etc/opencryptoki/opencryptoki.conf   slots; Debian's puts the soft token in slot 3
#   /var/lib/opencryptoki/swtok           the token: NVTOK.DAT, MK_SO, MK_USER, TOK_OBJ/
#   /run/lock/opencryptoki                lock files; /run/pkcsslotd.{pid,socket}; a SysV shm segment
#   /dev/shm/var.lib.opencryptoki.swtok   the token state every process using it shares
# So: one soft token per machine, one STATE_DIR at a time. STATE_DIR holds the PINs, token.yaml and, if
# this script started it, pkcsslotd's pid (deploy/providers/stop.sh then stops it); a pkcsslotd already
# running (a systemd service) is reused and left running.
#
# A token that is already initialised is refused: re-initialising it destroys its keys, and with them
# every secret sealed under them (and pkcsconf -I would need the SO PIN of whoever initialised it). With
# OPENCRYPTOKI_WIPE_TOKEN=LABEL, a token labelled LABEL is wiped (its files deleted) and made afresh: the
# test suite does so with its own label, so it never destroys a token it did not make.
source "$(dirname "$0")/../lib.sh"
begin_setup "$@"

readonly DEFAULT_SO_PIN=87654321  # the SO PIN of every fresh soft token
readonly PIN_LENGTH=8             # 3.8's soft token takes PINs of 4 to 8 characters
readonly TOKEN_DIR=/var/lib/opencryptoki/swtok
readonly TOKEN_SHM=/dev/shm/var.lib.opencryptoki.swtok
readonly SLOTD_PID=/run/pkcsslotd.pid SLOTD_SOCKET=/run/pkcsslotd.socket

# Prints the pid of a pkcsslotd that is up (alive, not a zombie, its socket there); fails if there is none.
running_slotd() {
  local pid name state
  pid=$(cat "$SLOTD_PID" 2>/dev/null) && read -r _ name state _ 2>/dev/null < "/proc/$pid/stat" &&
    [ "$name" = "(pkcsslotd)" ] && [ "$state" != Z ] && [ -S "$SLOTD_SOCKET" ] && echo "$pid"
}

# pkcsslotd has no foreground mode in 3.8: it daemonizes (its own session) and writes its pid file.
start_slotd() {
  local pid
  if pid=$(running_slotd); then
    echo "opencryptoki setup: reusing the running pkcsslotd (pid $pid); stop.sh leaves it running" >&2
    return
  fi
  systemd-tmpfiles --create opencryptoki.conf
  rm -f "$SLOTD_PID" "$SLOTD_SOCKET"  # left by a daemon that was killed
  /usr/sbin/pkcsslotd < /dev/null >> "$STATE_DIR/pkcsslotd.log" 2>&1
  wait_until "pkcsslotd did not come up" "$STATE_DIR/pkcsslotd.log" running_slotd
  running_slotd >> "$STATE_DIR/pids"
}

# pkcsconf on the soft token's slot. It exits 0 after some failures (CKR_PIN_LEN_RANGE): its output says.
# It takes PINs only as arguments (visible in ps for the moment it runs); -I reads the label from stdin.
ock() {
  local out
  out=$(pkcsconf -c "$slot" "$@" 2>&1 <<< "$TOKEN_LABEL") || fail "pkcsconf $1 failed: $out"
  case $out in *Error* | *Incorrect*) fail "pkcsconf $1 failed: $out" ;; esac
}

# Deletes the token's files (C_InitToken would need the SO PIN of a setup whose STATE_DIR is gone); the
# next process to open the token finds it fresh. Only while no process has the token open.
wipe_token() {
  local users
  users=$(grep -l "$TOKEN_SHM" /proc/[0-9]*/maps 2>/dev/null || true)
  [ -z "$users" ] || fail "not wiping the soft token: processes have it open: $(echo "$users" | cut -d/ -f3 | xargs)"
  rm -f "$TOKEN_DIR/NVTOK.DAT" "$TOKEN_DIR/MK_SO" "$TOKEN_DIR/MK_USER" "$TOKEN_DIR"/TOK_OBJ/* "$TOKEN_SHM"
}

start_slotd
tokens=$(pkcsconf -t 2>&1) || fail "pkcsconf -t failed: $tokens"
slot=$(awk '/^Token #/ { n = substr($2, 2) } /Model: IBM SoftTok/ { print n; exit }' <<< "$tokens")
[ -n "$slot" ] || fail "no soft token (libpkcs11_sw.so) among the slots of /etc/opencryptoki/opencryptoki.conf"
token_info=$(sed -n "/^Token #$slot Info/,/^Token #/p" <<< "$tokens")
if [[ $token_info == *TOKEN_INITIALIZED* ]]; then
  label=$(sed -n 's/^\s*Label: \(.*[^ ]\) *$/\1/p' <<< "$token_info")
  [ -n "${OPENCRYPTOKI_WIPE_TOKEN:-}" ] && [ "$OPENCRYPTOKI_WIPE_TOKEN" = "$label" ] || fail "the soft token \
(slot $slot) is already initialised, labelled '$label': re-initialising it destroys its keys. To destroy \
them and start afresh: OPENCRYPTOKI_WIPE_TOKEN='$label' $0 STATE_DIR"
  wipe_token
fi

new_pin so-pin "$PIN_LENGTH"
new_pin pin "$PIN_LENGTH"
ock -I -S "$DEFAULT_SO_PIN"
ock -P -S "$DEFAULT_SO_PIN" -n "$(pin so-pin)"
ock -u -S "$(pin so-pin)" -n "$(pin pin)"
write_token_yaml "$(first_file /usr/lib/*-linux-gnu/pkcs11/libopencryptoki.so /usr/lib64/opencryptoki/libopencryptoki.so \
  /usr/lib/opencryptoki/libopencryptoki.so)"
