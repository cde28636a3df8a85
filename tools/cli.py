"""`keysealer`: the operator's command. Each subcommand imports only what it needs, lazily, so that
`keysealer status` never loads PKCS #11 and `keysealer keys` never loads gRPC."""

import argparse
from pathlib import Path

from keysealer.shared.errors import UsageError
from keysealer.shared.etcd_reader import DEFAULT_PAGE_SIZE, EtcdOptions  # standard library only
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
    _add_etcd_flags(retire, "refuse the key while objects stored there need it (--force: retire anyway)")
    retire.add_argument("--unchecked", action="store_true",
                        help="allow --destroy without --etcd-endpoints, i.e. without checking stored objects")
    usage = keys.add_parser("usage", help="which stored objects need which key: count them in etcd")
    _add_etcd_flags(usage, "where the apiserver stores its objects", required=True)
    usage.add_argument("--config", type=Path, help="broker YAML config: also show each key's state in the token")
    usage.add_argument("--json", action="store_true", help="print one JSON document (for scripts)")
    usage.add_argument("--verify", action="store_true",
                       help="decrypt every distinct stored seed through the plugin at --socket (exit 1 on a failure)")
    usage.add_argument("--socket", type=Path, help="the plugin's KMS socket, for --verify")
    usage.add_argument("--provider", help="with --verify: only the seeds of this KMS v2 provider name")
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


def _add_etcd_flags(parser: argparse.ArgumentParser, what: str, required: bool = False) -> None:
    parser.add_argument("--etcd-endpoints", required=required, help=f"etcd client URLs, comma-separated: {what}")
    parser.add_argument("--etcd-cacert", type=Path, help="CA bundle of etcd's server certificate")
    parser.add_argument("--etcd-cert", type=Path, help="client certificate (the apiserver's etcd client one)")
    parser.add_argument("--etcd-key", type=Path, help="client certificate's key")
    parser.add_argument("--prefix", default="/registry", help="the apiserver's --etcd-prefix (default /registry)")
    parser.add_argument("--etcd-page-size", type=int, default=DEFAULT_PAGE_SIZE,
                        help=f"objects per etcd read (default {DEFAULT_PAGE_SIZE}; lower it for very large values)")


def _etcd_options(args: argparse.Namespace) -> EtcdOptions | None:
    if not args.etcd_endpoints:
        return None
    if args.etcd_page_size < 1:
        raise UsageError("--etcd-page-size must be at least 1")
    endpoints = tuple(url.strip() for url in args.etcd_endpoints.split(",") if url.strip())
    if not endpoints:
        raise UsageError("--etcd-endpoints names no URL")
    return EtcdOptions(endpoints, args.etcd_cacert, args.etcd_cert, args.etcd_key, page_size=args.etcd_page_size)


def _run() -> int:
    args = _parser().parse_args()
    if args.command == "dev":
        from keysealer.tools.dev import run_dev

        return run_dev(args.state_dir)
    if args.command == "ipc-keygen":
        from keysealer.shared.ipc_keys import generate

        public, secret = generate(args.dir, args.name)
        print(f"public key (share it): {public}\nsecret key (0600, keep it): {secret}")
        return EXIT_OK
    if args.command == "status":
        from keysealer.tools.status_cli import print_status

        return print_status(args.socket, args.timeout, args.liveness)
    if args.command == "doctor":
        from keysealer.tools.doctor import run_doctor

        return run_doctor(args.config, args.frontend_config)
    if args.command == "keys" and args.keys_command == "usage":
        from keysealer.tools.key_usage import usage_command

        etcd = _etcd_options(args)
        if etcd is None or (args.verify and args.socket is None):
            raise UsageError("keys usage needs --etcd-endpoints, and --verify needs --socket")
        return usage_command(etcd, args.prefix, config=args.config, json_output=args.json,
                             verify_socket=args.socket if args.verify else None, provider=args.provider)
    from keysealer.tools import keys_cli

    if args.keys_command == "create":
        return keys_cli.create_key(args.config, args.label, args.if_missing, args.mechanism)
    if args.keys_command == "list":
        return keys_cli.list_keys(args.config)
    if args.keys_command == "rotate":
        return keys_cli.rotate_key(args.config, args.mechanism)
    if args.keys_command == "new-id":
        return keys_cli.print_new_id(args.mechanism, args.with_key_id, args.config)
    if args.keys_command == "retire":
        stored = keys_cli.StoredUseCheck(_etcd_options(args), args.prefix, args.unchecked)
        return keys_cli.retire_key(args.config, args.key_id, args.force, args.destroy, args.yes, stored=stored)
    return keys_cli.init_token(args.config, args.so_pin_file)


def main() -> None:
    run_main(PROGRAM, _run)


if __name__ == "__main__":
    main()
