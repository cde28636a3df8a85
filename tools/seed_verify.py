"""`keysealer keys usage --verify`: decrypt stored seeds through a running plugin, as the apiserver does.

Each seed goes to the plugin's KMS v2 socket in the Decrypt the apiserver would send for it: its
ciphertext (encryptedDEKSource), key_id and annotations. The plaintext is dropped unread.
"""

from collections.abc import Iterable
from pathlib import Path

import grpc

from keysealer.frontend.kmsv2 import api_pb2, api_pb2_grpc
from keysealer.shared.errors import FatalError, UsageError
from keysealer.shared.stored_values import EncryptedSeed
from keysealer.tools.status_cli import fetch_status

UID = "keysealer-keys-usage-verify"  # shows in the plugin's logs as the caller


def failed_seeds(socket: Path, seeds: Iterable[EncryptedSeed], timeout: float) -> dict[EncryptedSeed, str]:
    """The seeds the plugin could not decrypt, each with the plugin's answer."""
    try:
        fetch_status(socket, timeout)
    except FatalError as exc:
        raise UsageError(f"cannot verify: {exc}") from None
    failures: dict[EncryptedSeed, str] = {}
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        stub = api_pb2_grpc.KeyManagementServiceStub(channel)
        for seed in seeds:
            request = api_pb2.DecryptRequest(ciphertext=seed.ciphertext, uid=UID, key_id=seed.key_id,
                                             annotations=dict(seed.annotations))
            try:
                response = stub.Decrypt(request, timeout=timeout)
                if not response.plaintext:
                    failures[seed] = "the plugin returned an empty plaintext"
            except grpc.RpcError as exc:
                failures[seed] = f"{exc.code().name}: {exc.details()}"
    return failures
