"""A real etcd for tests: Debian's etcd-server on loopback, serving TLS and requiring client certificates
from a CA the tests make, as a kubeadm control plane's etcd does.

    with running_etcd(tmp) as etcd:
        etcd.put(b"/registry/secrets/ns/a", value)   # through etcd's own v3 API, byte for byte
        etcd.revision()                               # changes with every write: a read-only scan keeps it
        etcd.flags()                                  # --etcd-endpoints/--etcd-cacert/--etcd-cert/--etcd-key
"""

import base64
import datetime
import http.client
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
READY_SECONDS = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Pki:
    """A CA and the certificates and keys it signs, written as PEM files in one directory."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._name = subject
        self._ca = (self._builder(subject, self._key.public_key())
                    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                    .sign(self._key, hashes.SHA256()))
        self.ca = directory / f"{name}.crt"
        self.ca.write_bytes(self._ca.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self._name).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    def issue(self, name: str) -> tuple[Path, Path]:
        """A certificate for 127.0.0.1 good for both server and client use (as kubeadm's etcd certs are):
        etcd's JSON gateway dials etcd's own gRPC port with the server certificate as a client one."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key())
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                            x509.DNSName("localhost")]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self._key, hashes.SHA256()))
        cert_path, key_path = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return cert_path, key_path


class Etcd:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.pki = Pki(root / "pki", "etcd-ca")
        self.server_cert, self.server_key = self.pki.issue("etcd-server")
        self.client_cert, self.client_key = self.pki.issue("apiserver-etcd-client")
        self.port, self.peer_port = free_port(), free_port()
        self.endpoint = f"https://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.root / "etcd.log").open("ab")
        self.process = subprocess.Popen([
            ETCD, "--name", "test", "--data-dir", str(self.root / "data"),
            "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", f"test=http://127.0.0.1:{self.peer_port}",
            "--cert-file", str(self.server_cert), "--key-file", str(self.server_key),
            "--client-cert-auth", "--trusted-ca-file", str(self.pki.ca),
        ], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_SECONDS
        while True:
            try:
                self.revision()
                return
            except (OSError, http.client.HTTPException, AssertionError):
                assert self.process.poll() is None, (self.root / "etcd.log").read_text(errors="replace")
                assert time.monotonic() < deadline, "etcd did not answer in time"
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def flags(self, prefix: str = "/registry") -> list[str]:
        return ["--etcd-endpoints", self.endpoint, "--etcd-cacert", str(self.pki.ca),
                "--etcd-cert", str(self.client_cert), "--etcd-key", str(self.client_key), "--prefix", prefix]

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10, context=context)
        try:
            connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            answer: dict[str, Any] = json.loads(response.read())
            assert response.status == 200, answer
            return answer
        finally:
            connection.close()

    def put(self, key: bytes, value: bytes) -> None:
        self._call("/v3/kv/put", {"key": base64.b64encode(key).decode(), "value": base64.b64encode(value).decode()})

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        """Many puts in transactions of at most 128 (etcd's default --max-txn-ops)."""
        for start in range(0, len(items), 128):
            self._call("/v3/kv/txn", {"success": [
                {"requestPut": {"key": base64.b64encode(key).decode(), "value": base64.b64encode(value).decode()}}
                for key, value in items[start:start + 128]]})

    def revision(self) -> int:
        """etcd's store revision, which every write (put, delete, txn) increments."""
        answer = self._call("/v3/kv/range", {"key": base64.b64encode(b"\0").decode(), "limit": 1})
        return int(answer["header"]["revision"])


@contextmanager
def running_etcd(root: Path) -> Iterator[Etcd]:
    etcd = Etcd(root)
    etcd.start()
    try:
        yield etcd
    finally:
        etcd.stop()
