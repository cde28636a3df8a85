# Shared by the provider setup scripts (deploy/providers/NAME/setup.sh STATE_DIR). Each script:
#   - makes STATE_DIR (0700) and keeps everything of its token there: token store, PINs, daemon sockets;
#   - starts any daemon the token needs in the background, its pid appended to STATE_DIR/pids
#     (deploy/providers/stop.sh STATE_DIR stops them);
#   - initialises a token labelled $TOKEN_LABEL (default keysealer) with a random user PIN in STATE_DIR/pin;
#   - writes STATE_DIR/token.yaml: the `token:` section of the broker config for this token.
# Exit codes: 0 done, 2 bad usage, 77 a package is missing (the message names it).
set -euo pipefail

TOKEN_LABEL=${TOKEN_LABEL:-keysealer}
PROVIDERS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

fail() { echo "$(basename "$(dirname "$0")") setup: $1" >&2; exit "${2:-1}"; }

# Usage check and STATE_DIR creation; sets STATE_DIR to an absolute path.
begin_setup() {
  [ $# -eq 1 ] || fail "usage: $0 STATE_DIR" 2
  mkdir -p -m 0700 "$1"
  STATE_DIR=$(cd "$1" && pwd)
  [ ! -e "$STATE_DIR/token.yaml" ] || fail "$STATE_DIR already holds a token (token.yaml); use a new directory" 2
  local provider
  provider=$(basename "$(dirname "$0")")
  require_packages "$PROVIDERS_DIR/$provider/packages.txt"
}

# Exit 77 naming every Debian package of the list that is not installed.
require_packages() {
  local missing=() package
  while read -r package; do
    [ -n "$package" ] || continue
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done < <(grep -v '^\s*#' "$1")
  [ ${#missing[@]} -eq 0 ] || fail "not installed: ${missing[*]} (apt-get install ${missing[*]})" 77
}

# A random PIN of LENGTH characters (default 32; base64, 6 bits each) in STATE_DIR/NAME, readable by its
# owner only; prints nothing. LENGTH is for tokens that cap PINs (openCryptoki 3.8: 8).
new_pin() {
  local value
  value=$(head -c 24 /dev/urandom | base64 -w0)
  (umask 077 && echo "${value:0:${2:-32}}" > "$STATE_DIR/$1")
}

pin() { tr -d '\n' < "$STATE_DIR/$1"; }

# The first file of the list that exists (module paths differ between distributions and architectures).
first_file() {
  local path
  for path in "$@"; do
    [ -f "$path" ] && { echo "$path"; return; }
  done
  fail "none of these exists: $*"
}

# Start a daemon in its own session, logging to STATE_DIR/NAME.log; its pid goes to STATE_DIR/pids.
start_daemon() {
  local name=$1
  shift
  setsid "$@" >> "$STATE_DIR/$name.log" 2>&1 < /dev/null &
  echo $! >> "$STATE_DIR/pids"
}

# Wait until a path exists (a daemon's socket), or fail naming the daemon's log.
wait_for() { wait_until "$1 did not appear" "$2" test -e "$1"; }

# Wait until COMMAND succeeds (a daemon answers), or fail with WHAT and the daemon's log.
wait_until() {
  local what=$1 log=$2 tries=100
  shift 2
  until "$@" >/dev/null 2>&1; do
    tries=$((tries - 1))
    [ $tries -gt 0 ] || fail "$what; see $log"
    sleep 0.1
  done
}

# token.yaml: MODULE, then module_env as NAME=VALUE arguments.
write_token_yaml() {
  local module=$1 pair
  shift
  {
    echo "# The broker config's token: section for this token (made by $0)."
    echo "module: $module"
    echo "token_label: $TOKEN_LABEL"
    echo "pin_file: $STATE_DIR/pin"
    if [ $# -gt 0 ]; then
      echo "module_env:"
      for pair in "$@"; do echo "  ${pair%%=*}: '${pair#*=}'"; done
    fi
  } > "$STATE_DIR/token.yaml"
  echo "token $TOKEN_LABEL ready; broker config token section: $STATE_DIR/token.yaml"
}
