"""etcd values byte for byte as kube-apiserver writes them, for the key usage tests and benchmark.

The KMS v2 EncryptedObject is encoded by protoc's own Python code from tests/proto/kms_encrypted_object.proto
(the apiserver's message restated), not by the parser under test.
"""

import importlib
import os
import sys
from pathlib import Path
from typing import Any

from grpc_tools import protoc

HKDF_SEED, AES_GCM_KEY = 1, 0  # EncryptedDEKSourceType
PROTO_DIR = Path(__file__).parent / "proto"


class ApiserverValues:
    def __init__(self, build_dir: Path) -> None:
        code = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={build_dir}",
                            str(PROTO_DIR / "kms_encrypted_object.proto")])
        assert code == 0, "protoc failed"
        sys.path.insert(0, str(build_dir))
        try:
            self._pb = importlib.import_module("kms_encrypted_object_pb2")
        finally:
            sys.path.remove(str(build_dir))

    @property
    def message_class(self) -> Any:
        """protoc's EncryptedObject class: the reference encoder and parser."""
        return self._pb.EncryptedObject

    def encrypted_object(self, seed: Any, source_type: int = HKDF_SEED, key_id: str | None = None,
                         source: bytes | None = None, data_size: int = 40) -> bytes:
        """The protobuf after the prefix; `seed` is what the plugin's Encrypt returned."""
        message = self.message_class(
            encryptedData=os.urandom(data_size), keyID=seed.key_id if key_id is None else key_id,
            encryptedDEKSource=seed.ciphertext if source is None else source,
            annotations=dict(seed.annotations), encryptedDEKSourceType=source_type)
        return bytes(message.SerializeToString())

    def kms_v2(self, provider: str, seed: Any, **fields: Any) -> bytes:
        return f"k8s:enc:kms:v2:{provider}:".encode() + self.encrypted_object(seed, **fields)
