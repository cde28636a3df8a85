"""`keysealer`: the operator's command. Each subcommand imports only what it needs, lazily, so that
`keysealer status` never loads PKCS #11 and `keysealer keys` never loads gRPC."""

import argparse
from pathlib import Path

from keysealer.shared.process import EXIT_OK, ArgumentParser, run_main

PROGRAM = "keysealer"
DEFAULT_STATE_DIR = Path(".keysealer")


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROGRAM, description="KeySealer: a KMS v2 plugin backed by PKCS #11.")
    commands = parser.add_subparsers(dest="command", required=True)

    dev = commands.add_parser("dev", help="run broker and frontend on a SoftHSM token created on first use")
    dev.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                     help="where the token, PIN, configs and sockets live (default: ./.keysealer)")

    status = commands.add_parser("status", help="call Status on a plugin socket and print it")
    status.add_argument("--socket", type=Path, required=True, help="the frontend's KMS socket")
    status.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3, as the apiserver)")
    status.add_argument("--liveness", action="store_true",
                        help="exit 0 whenever the plugin answers, healthy or not (for liveness probes)")

    keygen = commands.add_parser("ipc-keygen", help="write a CURVE keypair for the frontend/broker IPC link")
    keygen.add_argument("--dir", type=Path, required=True, help="directory for NAME.key and NAME.key_secret")
    keygen.add_argument("--name", required=True, help="file name stem, e.g. frontend or broker")

    doctor = commands.add_parser("doctor", help="check a broker's token, PIN, keys and files; print a fix for "
                                 "each failure")
    doctor.add_argument("--config", type=Path, required=True, help="broker YAML config")
    doctor.add_argument("--frontend-config", type=Path, help="frontend YAML config, to check its files too")

    keys = commands.add_parser("keys", help="manage the keys in the token").add_subparsers(
        dest="keys_command", required=True)
    create = keys.add_parser("create", help="generate a new key in the token")
    create.add_argument("--config", type=Path, required=True, help="broker YAML config")
    create.add_argument("--label", help="label of the new key (default: keys.current_label)")
    create.add_argument("--if-missing", action="store_true", help="do nothing if a key has this label")
    mechanism_help = "how the key seals seeds (default: aes-gcm; rotate keeps the current key's)"
    mechanisms = ["aes-gcm", "aes-cbc-hmac", "aes-kwp", "rsa-oaep", "rsa-oaep-sha1"]
    create.add_argument("--mechanism", choices=mechanisms, help=mechanism_help)
    rotate = keys.add_parser("rotate", help="create a new version of the current key and make it current")
    rotate.add_argument("--config", type=Path, required=True, help="broker YAML config")
    rotate.add_argument("--mechanism", choices=mechanisms, help=mechanism_help)
    retire = keys.add_parser("retire", help="make an old key unusable for decryption (--destroy: delete it)")
    retire.add_argument("key_id", help="the key_id to retire, as `keys list` shows it")
    retire.add_argument("--config", type=Path, required=True, help="broker YAML config")
    retire.add_argument("--force", action="store_true", help="retire even the current key")
    retire.add_argument("--destroy", action="store_true", help="also delete the key from the token")
    retire.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    listing = keys.add_parser("list", help="list KeySealer keys: key_id, label, creation time, state")
    listing.add_argument("--config", type=Path, required=True, help="broker YAML config")
    new_id = keys.add_parser("new-id", help="print a fresh CKA_ID (hex) for a key made by the token's own tool")
    new_id.add_argument("--mechanism", choices=mechanisms, required=True,
                        help="how the key will seal seeds (recorded in the id)")
    new_id.add_argument("--with-key-id", action="store_true",
                        help="also print the key_id the key will have, after the CKA_ID and a space")
    new_id.add_argument("--config", type=Path,
                        help="broker YAML config: the id then sorts after the current key's newest version")
    init = keys.add_parser("init-token", help="initialise a software token with the configured label")
    init.add_argument("--config", type=Path, required=True, help="broker YAML config")
    init.add_argument("--so-pin-file", type=Path, required=True, help="file holding the new SO PIN (0600)")
    return parser


def _run() -> int:
    args = _parser().parse_args()
    if args.command == "dev":
        from keysealer.shared.dev import run_dev

        return run_dev(args.state_dir)
    if args.command == "ipc-keygen":
        from keysealer.shared.ipc_keys import generate

        public, secret = generate(args.dir, args.name)
        print(f"public key (share it): {public}\nsecret key (0600, keep it): {secret}")
        return EXIT_OK
    if args.command == "status":
        from keysealer.frontend.status_cli import print_status

        return print_status(args.socket, args.timeout, args.liveness)
    if args.command == "doctor":
        from keysealer.hsm_broker.doctor import run_doctor

        return run_doctor(args.config, args.frontend_config)
    from keysealer.hsm_broker import keys_cli

    if args.keys_command == "create":
        return keys_cli.create_key(args.config, args.label, args.if_missing, args.mechanism)
    if args.keys_command == "list":
        return keys_cli.list_keys(args.config)
    if args.keys_command == "rotate":
        return keys_cli.rotate_key(args.config, args.mechanism)
    if args.keys_command == "new-id":
        return keys_cli.print_new_id(args.mechanism, args.with_key_id, args.config)
    if args.keys_command == "retire":
        return keys_cli.retire_key(args.config, args.key_id, args.force, args.destroy, args.yes)
    return keys_cli.init_token(args.config, args.so_pin_file)


def main() -> None:
    run_main(PROGRAM, _run)


if __name__ == "__main__":
    main()
