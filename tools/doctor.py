"""`keysealer doctor --config BROKER_CONFIG`: checks a broker's setup, file by file and then the token step
by step as a worker opens it, and prints one verdict a line with the fix for each failure.

It runs in the CLI's own process, which is thrown away afterwards: never in the frontend, which must not
load PKCS #11. Exit 0: every check passed (warnings allowed); 1: a check failed; 2: bad usage or config.
"""

import collections
import os
from pathlib import Path

from keysealer.frontend.config import load_frontend_config
from keysealer.hsm_broker.config import load_broker_config
from keysealer.hsm_broker.pin import pin_path
from keysealer.shared.process import EXIT_FAILURE, EXIT_OK
from keysealer.tools.doctor_files import (
    account_uid,
    broker_socket_dir,
    config_file,
    listen_dir,
    public_keys,
    same_socket,
    secret_file,
)
from keysealer.tools.doctor_findings import Check, Verdict, render, run_checks
from keysealer.tools.doctor_token import TokenCheckup


def run_doctor(config_path: Path, frontend_config_path: Path | None) -> int:
    config = load_broker_config(config_path)  # a bad config ends here: one line, exit 2
    frontend = load_frontend_config(frontend_config_path) if frontend_config_path is not None else None
    # The broker reads its secrets as `user`, or as whoever starts it: run the doctor as that user.
    broker_uid = account_uid(config.user) if config.user else os.geteuid()
    checks = [
        Check("pin file", lambda: secret_file(pin_path(config.token.pin_file), "PIN", broker_uid)),
        Check("broker config", lambda: config_file(config_path)),
        Check("broker key", lambda: secret_file(config.ipc.server_key, "CURVE secret key", broker_uid)),
        Check("client keys", lambda: public_keys(config.ipc.client_keys, "a frontend's public key")),
        Check("ipc socket dir", lambda: broker_socket_dir(config.ipc.socket, config.ipc.group)),
    ]
    if frontend is not None and frontend_config_path is not None:
        frontend_uid = account_uid(frontend.user) if frontend.user else None  # unknown: owner not checked
        checks += [
            Check("frontend config", lambda: config_file(frontend_config_path)),
            Check("frontend key", lambda: secret_file(frontend.broker.client_key, "CURVE secret key", frontend_uid)),
            Check("broker pub key", lambda: public_keys([frontend.broker.server_key], "the broker's public key")),
            Check("kms socket dir", lambda: listen_dir(frontend.listen.socket)),
            Check("ipc socket", lambda: same_socket(config.ipc.socket, frontend.broker.socket)),
        ]
    token = TokenCheckup(config, config_path)
    verdicts: collections.Counter[Verdict] = collections.Counter()
    try:
        for finding in run_checks([*checks, *token.checks()]):
            verdicts[finding.outcome.verdict] += 1
            print(render(finding), flush=True)
    finally:
        token.close()
    print(f"{verdicts[Verdict.PASS]} passed, {verdicts[Verdict.WARN]} warnings, {verdicts[Verdict.FAIL]} failed, "
          f"{verdicts[Verdict.SKIP]} skipped")
    return EXIT_FAILURE if verdicts[Verdict.FAIL] else EXIT_OK
