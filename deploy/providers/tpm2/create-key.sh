#!/usr/bin/env bash
# A new version of the broker's current key (keys.current_label) in the TPM token setup.sh made, generated
# in the TPM by tpm2_ptool: tpm2-pkcs11 cannot generate keys through PKCS #11. Prints
# `created key KEY_ID (label 'LABEL', MECHANISM)`, as `keysealer keys create` does; running brokers find
# the key at their next key refresh (within 5 s, at once on SIGHUP).
#   deploy/providers/tpm2/create-key.sh STATE_DIR BROKER_CONFIG [aes-cbc-hmac|rsa-oaep]
# aes-cbc-hmac (default): an AES-256 key and an HMAC-SHA256 key; rsa-oaep: an RSA-3072 key pair.
source "$(dirname "$0")/../lib.sh"
[ $# -eq 2 ] || [ $# -eq 3 ] || fail "usage: $0 STATE_DIR BROKER_CONFIG [aes-cbc-hmac|rsa-oaep]" 2
STATE_DIR=$(cd "$1" && pwd)
config=$2
mechanism=${3:-aes-cbc-hmac}
case $mechanism in
  aes-cbc-hmac) algorithms=(aes256 hmac:sha256) ;;
  rsa-oaep) algorithms=(rsa3072) ;;
  *) fail "tpm2_ptool makes aes-cbc-hmac or rsa-oaep keys, not $mechanism" 2 ;;
esac
[ -f "$STATE_DIR/tools.env" ] || fail "$STATE_DIR holds no token made by setup.sh (no tools.env)" 2
source "$STATE_DIR/tools.env"
token=$(sed -n 's/^token_label: //p' "$STATE_DIR/token.yaml")
label=$(python3 -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["keys"]["current_label"])' "$config")
read -r object_id key_id < <(keysealer keys new-id --mechanism "$mechanism" --with-key-id --config "$config")

# tpm2_ptool stores --id as the bytes of the text it is given and cannot take binary: each object is made
# with the id's hex as its text, then gets its binary id (the one KeySealer reads) with objmod.
# tpm2_ptool takes PINs only as arguments: the PIN is visible in ps for the moment it runs.
for algorithm in "${algorithms[@]}"; do
  tpm2_ptool addkey --label "$token" --key-label "$label" --id "$object_id" --userpin "$(pin pin)" \
    --algorithm "$algorithm" >/dev/null
done
text_id=$(printf %s "$object_id" | od -An -tx1 | tr -d ' \n')
# Store row ids of the new objects, newest first: the HMAC or public key gets its id before the key it
# completes, so a broker never sees a main key without its helper.
mapfile -t rows < <(tpm2_ptool listobjects --label "$token" | awk -v id="$text_id" '
  $1 == "-" { value = $2; gsub("\047", "", value); if (value == id) hit = 1 }
  $1 == "id:" { if (hit) print $2; hit = 0 }' | sort -rn)
objects=$((${#algorithms[@]} + $([ "$mechanism" = rsa-oaep ] && echo 1 || echo 0)))  # RSA: a pair
[ ${#rows[@]} -eq $objects ] || fail "expected $objects new objects in the store, found ${#rows[@]}"
for row in "${rows[@]}"; do
  tpm2_ptool objmod --id "$row" --key CKA_ID --value "$object_id" --type raw
done

state=$(keysealer keys list --config "$config" | awk -v key="$key_id" '$1 == key { print $NF }')
[ "$state" = current ] || fail "the new key $key_id is ${state:-not usable by KeySealer}; see keysealer doctor --config $config"
echo "created key $key_id (label '$label', $mechanism)"
