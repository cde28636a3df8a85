"""The generated KMS v2 stubs: fresh, and wire-identical to the apiserver's k8s.io/kms/apis/v2/api.proto
(package, service, methods, and every field's name, number and type, per /work/shared/kms-v2-facts.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor

from keysealer.frontend.kmsv2 import api_pb2, api_pb2_grpc

REPO = Path(__file__).resolve().parents[1]

STRING, BYTES = FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES
MAP_STRING_BYTES = ("map", STRING, BYTES)

# message -> {field name: (number, type)}; a plain type is a singular scalar.
EXPECTED_MESSAGES: dict[str, dict[str, tuple[int, Any]]] = {
    "StatusRequest": {},
    "StatusResponse": {"version": (1, STRING), "healthz": (2, STRING), "key_id": (3, STRING)},
    "EncryptRequest": {"plaintext": (1, BYTES), "uid": (2, STRING)},
    "EncryptResponse": {"ciphertext": (1, BYTES), "key_id": (2, STRING), "annotations": (3, MAP_STRING_BYTES)},
    "DecryptRequest": {
        "ciphertext": (1, BYTES), "uid": (2, STRING), "key_id": (3, STRING), "annotations": (4, MAP_STRING_BYTES),
    },
    "DecryptResponse": {"plaintext": (1, BYTES)},
}
EXPECTED_METHODS = {
    "Status": ("v2.StatusRequest", "v2.StatusResponse"),
    "Decrypt": ("v2.DecryptRequest", "v2.DecryptResponse"),
    "Encrypt": ("v2.EncryptRequest", "v2.EncryptResponse"),
}


def field_shape(field: FieldDescriptor) -> Any:
    """A field's type as in EXPECTED_MESSAGES: a scalar type, or ("map", key type, value type)."""
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        assert field.is_repeated
        entry = field.message_type.fields_by_name
        return ("map", entry["key"].type, entry["value"].type)
    assert not field.is_repeated, f"{field.full_name} is repeated"
    assert not field.has_presence, f"{field.full_name} is optional"
    return field.type


def test_generated_stubs_are_fresh() -> None:
    result = subprocess.run([sys.executable, str(REPO / "proto" / "generate.py"), "--check"], capture_output=True,
                            text=True, cwd=REPO, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "stale" not in result.stderr


def test_package_is_v2() -> None:
    assert api_pb2.DESCRIPTOR.package == "v2"
    source = descriptor_pb2.FileDescriptorProto.FromString(api_pb2.DESCRIPTOR.serialized_pb)
    assert source.package == "v2"
    assert source.syntax == "proto3"  # no presence bits: an empty string or bytes is sent as absent


def test_service_and_methods() -> None:
    assert list(api_pb2.DESCRIPTOR.services_by_name) == ["KeyManagementService"]
    service = api_pb2.DESCRIPTOR.services_by_name["KeyManagementService"]
    assert service.full_name == "v2.KeyManagementService"
    methods = {m.name: (m.input_type.full_name, m.output_type.full_name) for m in service.methods}
    assert methods == EXPECTED_METHODS
    for method in service.methods:
        assert not method.client_streaming
        assert not method.server_streaming


def test_messages_are_exactly_the_kms_v2_ones() -> None:
    assert set(api_pb2.DESCRIPTOR.message_types_by_name) == set(EXPECTED_MESSAGES)
    for name, expected in EXPECTED_MESSAGES.items():
        message = api_pb2.DESCRIPTOR.message_types_by_name[name]
        assert message.full_name == f"v2.{name}"
        fields = {f.name: (f.number, field_shape(f)) for f in message.fields}
        assert fields == expected, name
        assert not message.oneofs, name


def test_map_entries_are_plain_maps() -> None:
    for name in ("EncryptResponse", "DecryptRequest"):
        entry = api_pb2.DESCRIPTOR.message_types_by_name[name].fields_by_name["annotations"].message_type
        assert entry.name == "AnnotationsEntry"
        assert [(f.name, f.number) for f in entry.fields] == [("key", 1), ("value", 2)]


def test_wire_bytes_known_answers() -> None:
    # Field tags as the Go side writes them: (number << 3) | wire type 2 for string, bytes and map entries.
    status = api_pb2.StatusResponse(version="v2", healthz="ok", key_id="k")
    assert status.SerializeToString() == b"\x0a\x02v2\x12\x02ok\x1a\x01k"
    encrypt = api_pb2.EncryptRequest(plaintext=b"\x01\x02", uid="u")
    assert encrypt.SerializeToString() == b"\x0a\x02\x01\x02\x12\x01u"
    decrypt = api_pb2.DecryptRequest(ciphertext=b"c", uid="u", key_id="k", annotations={"a.b": b"1"})
    assert decrypt.SerializeToString() == b"\x0a\x01c\x12\x01u\x1a\x01k\x22\x08\x0a\x03a.b\x12\x011"
    response = api_pb2.EncryptResponse(ciphertext=b"c", key_id="k", annotations={"a.b": b"1"})
    assert response.SerializeToString() == b"\x0a\x01c\x12\x01k\x1a\x08\x0a\x03a.b\x12\x011"
    assert api_pb2.DecryptResponse(plaintext=b"p").SerializeToString() == b"\x0a\x01p"
    assert api_pb2.StatusRequest().SerializeToString() == b""


class _RecordingChannel:
    def __init__(self) -> None:
        self.paths: list[str] = []

    def unary_unary(self, path: str, **_: Any) -> str:
        self.paths.append(path)
        return path


class _RecordingServer:
    def __init__(self) -> None:
        self.registered: dict[str, list[str]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.registered[service] = sorted(handlers)


def test_grpc_method_paths() -> None:
    channel = _RecordingChannel()
    api_pb2_grpc.KeyManagementServiceStub(channel)
    assert sorted(channel.paths) == [
        "/v2.KeyManagementService/Decrypt",
        "/v2.KeyManagementService/Encrypt",
        "/v2.KeyManagementService/Status",
    ]
    server = _RecordingServer()
    api_pb2_grpc.add_KeyManagementServiceServicer_to_server(api_pb2_grpc.KeyManagementServiceServicer(), server)
    assert server.registered == {"v2.KeyManagementService": ["Decrypt", "Encrypt", "Status"]}
