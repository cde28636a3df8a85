"""The KMS gRPC services: validate, admit, forward to the broker. v2 always; v1beta1 when configured, for
clusters moving from KMS v1 to v2 (the same keys and ciphertexts serve both)."""

from importlib.metadata import version

from keysealer.frontend import validation
from keysealer.frontend.broker_client import BrokerClient
from keysealer.frontend.call_gate import CallGate, CallRecord, Context
from keysealer.frontend.health import HealthMonitor
from keysealer.frontend.kmsv1 import api_pb2 as v1
from keysealer.frontend.kmsv1 import api_pb2_grpc as v1_grpc
from keysealer.frontend.kmsv2 import api_pb2 as v2
from keysealer.frontend.kmsv2 import api_pb2_grpc as v2_grpc
from keysealer.shared.errors import ErrorCode, KeySealerError

API_VERSION = "v2"
V1_API_VERSION = "v1beta1"
RUNTIME_NAME = "KeySealer"


class Forwarder:
    """The two operations both API versions forward to the broker."""

    def __init__(self, client: BrokerClient, health: HealthMonitor) -> None:
        self._client = client
        self._health = health

    async def wrap(self, plaintext: bytes, uid: str, timeout: float) -> tuple[bytes, str]:
        validation.check_encrypt(plaintext, uid)
        result = await self._client.wrap(plaintext, timeout)
        return result.ciphertext, result.key_id

    async def unwrap(self, ciphertext: bytes, key_id: str, timeout: float) -> bytes:
        """`ciphertext` and `key_id` were validated by the caller, against their API's rules."""
        known = await self._health.keys.accepts(key_id)
        # An id missing from the broker's key set may still be a key made moments ago on another node: the
        # workers list the token's keys every 5 s, but look in the token again (at most once a second)
        # when asked for a key they lack. So the broker decides, and its "unknown" becomes our refusal.
        try:
            return (await self._client.unwrap(ciphertext, key_id, timeout)).plaintext
        except KeySealerError as exc:
            if exc.code is ErrorCode.UNKNOWN_KEY and not known:
                raise KeySealerError(ErrorCode.UNKNOWN_KEY, "key_id is not a key this plugin holds") from None
            raise


class KmsService(v2_grpc.KeyManagementServiceServicer):
    def __init__(self, forwarder: Forwarder, health: HealthMonitor, gate: CallGate) -> None:
        self._forwarder = forwarder
        self._health = health
        self._gate = gate

    async def Status(self, request: v2.StatusRequest, context: Context) -> v2.StatusResponse:
        health = self._health.current()
        return v2.StatusResponse(version=API_VERSION, healthz=health.reason, key_id=health.key_id)

    async def Encrypt(self, request: v2.EncryptRequest, context: Context) -> v2.EncryptResponse:
        return await self._gate.run(context, CallRecord("Encrypt", request.uid), self._encrypt, request)

    async def Decrypt(self, request: v2.DecryptRequest, context: Context) -> v2.DecryptResponse:
        record = CallRecord("Decrypt", request.uid, request.key_id)
        return await self._gate.run(context, record, self._decrypt, request)

    async def _encrypt(self, request: v2.EncryptRequest, timeout: float, record: CallRecord) -> v2.EncryptResponse:
        ciphertext, record.key_id = await self._forwarder.wrap(request.plaintext, request.uid, timeout)
        return v2.EncryptResponse(ciphertext=ciphertext, key_id=record.key_id, annotations=validation.ANNOTATIONS)

    async def _decrypt(self, request: v2.DecryptRequest, timeout: float, _record: CallRecord) -> v2.DecryptResponse:
        validation.check_decrypt(request.ciphertext, request.uid, request.key_id, request.annotations)
        plaintext = await self._forwarder.unwrap(request.ciphertext, request.key_id, timeout)
        return v2.DecryptResponse(plaintext=plaintext)


class KmsV1Service(v1_grpc.KeyManagementServiceServicer):
    """KMS v1 has no key_id: the key is the one the ciphertext's key reference names."""

    def __init__(self, forwarder: Forwarder, gate: CallGate) -> None:
        self._forwarder = forwarder
        self._gate = gate

    async def Version(self, request: v1.VersionRequest, context: Context) -> v1.VersionResponse:
        return v1.VersionResponse(version=V1_API_VERSION, runtime_name=RUNTIME_NAME,
                                  runtime_version=version("keysealer"))

    async def Encrypt(self, request: v1.EncryptRequest, context: Context) -> v1.EncryptResponse:
        return await self._gate.run(context, CallRecord("v1beta1.Encrypt", ""), self._encrypt, request)

    async def Decrypt(self, request: v1.DecryptRequest, context: Context) -> v1.DecryptResponse:
        return await self._gate.run(context, CallRecord("v1beta1.Decrypt", ""), self._decrypt, request)

    async def _encrypt(self, request: v1.EncryptRequest, timeout: float, record: CallRecord) -> v1.EncryptResponse:
        validation.check_v1_version(request.version)
        ciphertext, record.key_id = await self._forwarder.wrap(request.plain, "", timeout)
        return v1.EncryptResponse(cipher=ciphertext)

    async def _decrypt(self, request: v1.DecryptRequest, timeout: float, record: CallRecord) -> v1.DecryptResponse:
        validation.check_v1_version(request.version)
        key_id = record.key_id = validation.key_id_of(request.cipher)
        return v1.DecryptResponse(plain=await self._forwarder.unwrap(request.cipher, key_id, timeout))
