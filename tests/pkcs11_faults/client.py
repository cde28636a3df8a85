"""A PKCS #11 client in a child process, driven line by line from a test: PyKCS11 on one module, fresh per
child, so each test gets its own C_Initialize, its own module environment (PKCS11_FAULTS_*, SOFTHSM2_CONF,
P11_KIT_SERVER_ADDRESS are read when the module loads) and its own sessions.

    with TokenClient(module, env={...}) as token:
        sid = token.open_login("label", "1234")
        key = token.aes_key(sid)
        iv, sealed = token.encrypt(sid, key, b"secret")
        token.result("decrypt", sid, key, sealed, iv)    # "OK" or the CKR name, for tables

Run as a script (`python client.py MODULE`) it is the child: it reads JSON requests [op, args...] on stdin
and answers {"ok": value, "s": seconds} or {"err": "CKR_...", "code": n, "s": seconds} on stdout.
Bytes travel as hex. Handles (sessions, keys) are small integers local to the child.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GCM_TAG_BITS = 128
REPLY_TIMEOUT_SECONDS = 30.0


class TokenError(Exception):
    """The module answered a CKR code other than CKR_OK."""

    def __init__(self, name: str, code: int) -> None:
        super().__init__(name)
        self.name = name
        self.code = code


class TokenClient:
    """Parent side: one child process with the module loaded."""

    def __init__(self, module: Path | str, env: dict[str, str] | None = None,
                 timeout: float = REPLY_TIMEOUT_SECONDS) -> None:
        self.timeout = timeout
        self.last_seconds = 0.0
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the child; close() closes it
        self._process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(module)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            env={**os.environ, **(env or {})})
        self._buffer = b""
        try:
            self.call("ping")  # the module is loaded and initialised
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self._process.pid

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def _reply(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._process.stdout], [], [], max(0.0, left))
            if not ready:
                raise TimeoutError(f"PKCS #11 client gave no answer in {self.timeout}s\n{self.stderr()}")
            chunk = os.read(self._process.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"PKCS #11 client exited ({self._process.wait()}):\n{self.stderr()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)
        return reply

    def call(self, op: str, *args: Any) -> Any:
        """Run op in the child; its value, or TokenError(CKR name)."""
        assert self._process.stdin is not None
        wire = [a.hex() if isinstance(a, bytes | bytearray) else a for a in args]
        self._process.stdin.write((json.dumps([op, *wire]) + "\n").encode())
        self._process.stdin.flush()
        reply = self._reply()
        self.last_seconds = float(reply.get("s", 0.0))
        if "exc" in reply:
            raise RuntimeError(f"{op} failed in the client: {reply['exc']}")
        if "err" in reply:
            raise TokenError(reply["err"], int(reply["code"]))
        return reply["ok"]

    def result(self, op: str, *args: Any) -> str:
        """'OK' or the CKR name op ended with: for tables and asserts."""
        try:
            self.call(op, *args)
        except TokenError as exc:
            return exc.name
        return "OK"

    # -- typed helpers ------------------------------------------------------------------------------------

    def slots(self) -> list[tuple[int, str]]:
        return [(int(s), str(label)) for s, label in self.call("slots")]

    def slot_of(self, label: str) -> int:
        for slot, found in self.slots():
            if found == label:
                return slot
        raise LookupError(f"no token labelled {label!r}: {self.slots()}")

    def open_login(self, label: str, pin: str, rw: bool = False) -> int:
        sid = int(self.call("open", self.slot_of(label), rw))
        try:
            self.call("login", sid, pin)
        except TokenError as exc:  # login state is per token and application: another session has it
            if exc.name != "CKR_USER_ALREADY_LOGGED_IN":
                raise
        return sid

    def aes_key(self, sid: int) -> int:
        """A new AES-256 session key (not on the token), sensitive, for encrypt/decrypt."""
        return int(self.call("aes_key", sid))

    def encrypt(self, sid: int, key: int, plaintext: bytes, aad: bytes = b"") -> tuple[bytes, bytes]:
        """AES-GCM with a fresh IV: (iv, ciphertext with tag)."""
        iv, sealed = self.call("encrypt", sid, key, plaintext, aad)
        return bytes.fromhex(iv), bytes.fromhex(sealed)

    def decrypt(self, sid: int, key: int, sealed: bytes, iv: bytes, aad: bytes = b"") -> bytes:
        return bytes.fromhex(self.call("decrypt", sid, key, sealed, iv, aad))

    def close(self) -> None:
        if self._process.poll() is None:
            with contextlib.suppress(OSError, RuntimeError, TimeoutError):
                self.call("exit")
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._stderr.close()

    def __enter__(self) -> TokenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -------------------------------------------------------------------------------------------------------
# Child side (PyKCS11 is imported only here)


def serve(module: str) -> None:
    import PyKCS11

    lib = PyKCS11.PyKCS11Lib()
    load_error: PyKCS11.PyKCS11Error | None = None
    try:
        lib.load(module)
    except PyKCS11.PyKCS11Error as exc:  # answered to every request: the test sees the module's refusal
        load_error = exc
    sessions: dict[int, Any] = {}
    keys: dict[int, Any] = {}

    def check(rv: int) -> None:
        if rv != PyKCS11.CKR_OK:
            raise PyKCS11.PyKCS11Error(rv)

    def gcm(iv: str, aad: str) -> Any:
        return PyKCS11.AES_GCM_Mechanism(bytes.fromhex(iv), bytes.fromhex(aad), GCM_TAG_BITS)

    def op_open(slot: int, rw: bool = False) -> int:
        flags = PyKCS11.CKF_SERIAL_SESSION | (PyKCS11.CKF_RW_SESSION if rw else 0)
        sid = len(sessions) + 1
        sessions[sid] = lib.openSession(slot, flags)
        return sid

    def op_aes_key(sid: int) -> int:
        template = [(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY), (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
                    (PyKCS11.CKA_VALUE_LEN, 32), (PyKCS11.CKA_TOKEN, False), (PyKCS11.CKA_SENSITIVE, True),
                    (PyKCS11.CKA_EXTRACTABLE, False), (PyKCS11.CKA_ENCRYPT, True), (PyKCS11.CKA_DECRYPT, True)]
        kid = len(keys) + 1
        keys[kid] = sessions[sid].generateKey(template, mecha=PyKCS11.MechanismAESGENERATEKEY)
        return kid

    def op_encrypt(sid: int, kid: int, plaintext: str, aad: str = "") -> list[str]:
        iv = os.urandom(12).hex()
        sealed = sessions[sid].encrypt(keys[kid], bytes.fromhex(plaintext), gcm(iv, aad))
        return [iv, bytes(sealed).hex()]

    def op_decrypt(sid: int, kid: int, sealed: str, iv: str, aad: str = "") -> str:
        return bytes(sessions[sid].decrypt(keys[kid], bytes.fromhex(sealed), gcm(iv, aad))).hex()

    def op_session_info(sid: int) -> dict[str, Any]:
        info = sessions[sid].getSessionInfo()
        return {"state": info.state, "flags": info.flags, "device_error": info.ulDeviceError}

    def op_probe(slot: int, pin: str) -> dict[str, dict[str, Any]]:
        """Which mechanisms the module lists, and whether a real call with each works."""
        listed = set(lib.getMechanismList(slot))
        session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
        try:
            session.login(pin)
        except PyKCS11.PyKCS11Error as exc:
            if exc.value != PyKCS11.CKR_USER_ALREADY_LOGGED_IN:
                raise
        found: dict[str, dict[str, Any]] = {}

        def attempt(name: str, call: Callable[[], Any]) -> Any:
            try:
                value = call()
                found[name] = {"listed": name in listed, "call": "OK"}
                return value
            except PyKCS11.PyKCS11Error as exc:
                found[name] = {"listed": name in listed, "call": PyKCS11.CKR.get(exc.value, hex(exc.value))}
                return None

        aes = attempt("CKM_AES_KEY_GEN", lambda: session.generateKey(
            [(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY), (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
             (PyKCS11.CKA_VALUE_LEN, 32), (PyKCS11.CKA_TOKEN, False), (PyKCS11.CKA_ENCRYPT, True),
             (PyKCS11.CKA_DECRYPT, True), (PyKCS11.CKA_WRAP, True), (PyKCS11.CKA_EXTRACTABLE, True)],
            mecha=PyKCS11.MechanismAESGENERATEKEY))
        if aes is not None:
            def gcm_round_trip() -> None:
                mechanism = PyKCS11.AES_GCM_Mechanism(os.urandom(12), b"aad", GCM_TAG_BITS)
                sealed = session.encrypt(aes, b"x" * 32, mechanism)
                assert bytes(session.decrypt(aes, sealed, mechanism)) == b"x" * 32

            attempt("CKM_AES_GCM", gcm_round_trip)
            attempt("CKM_AES_CBC_PAD", lambda: session.encrypt(
                aes, b"x" * 20, PyKCS11.Mechanism(PyKCS11.CKM_AES_CBC_PAD, os.urandom(16))))
            attempt("CKM_AES_ECB", lambda: session.encrypt(aes, b"x" * 32, PyKCS11.Mechanism(PyKCS11.CKM_AES_ECB)))
            attempt("CKM_AES_KEY_WRAP", lambda: session.wrapKey(
                aes, aes, PyKCS11.Mechanism(PyKCS11.CKM_AES_KEY_WRAP)))
        pair = attempt("CKM_RSA_PKCS_KEY_PAIR_GEN", lambda: session.generateKeyPair(
            [(PyKCS11.CKA_TOKEN, False), (PyKCS11.CKA_ENCRYPT, True), (PyKCS11.CKA_MODULUS_BITS, 1024),
             (PyKCS11.CKA_PUBLIC_EXPONENT, (1, 0, 1))],
            [(PyKCS11.CKA_TOKEN, False), (PyKCS11.CKA_DECRYPT, True), (PyKCS11.CKA_SENSITIVE, True)],
            mecha=PyKCS11.MechanismRSAGENERATEKEYPAIR))
        if pair is not None:
            public, private = pair
            for label, digest, mgf in (("CKM_RSA_PKCS_OAEP", PyKCS11.CKM_SHA_1, PyKCS11.CKG_MGF1_SHA1),
                                       ("CKM_RSA_PKCS_OAEP/SHA256", PyKCS11.CKM_SHA256, PyKCS11.CKG_MGF1_SHA256)):
                def oaep(digest: int = digest, mgf: int = mgf) -> None:
                    mechanism = PyKCS11.RSAOAEPMechanism(digest, mgf)
                    sealed = session.encrypt(public, b"y" * 32, mechanism)
                    assert bytes(session.decrypt(private, sealed, mechanism)) == b"y" * 32

                attempt(label, oaep)
            attempt("CKM_SHA256_RSA_PKCS", lambda: session.sign(
                private, b"z", PyKCS11.Mechanism(PyKCS11.CKM_SHA256_RSA_PKCS)))
            attempt("CKM_SHA256_RSA_PKCS_PSS", lambda: session.sign(private, b"z", PyKCS11.RSA_PSS_Mechanism(
                PyKCS11.CKM_SHA256_RSA_PKCS_PSS, PyKCS11.CKM_SHA256, PyKCS11.CKG_MGF1_SHA256, 32)))
        session.closeSession()
        for name, row in found.items():
            row["listed"] = name.split("/")[0] in listed
        found["_listed"] = {"names": sorted(str(m) for m in listed)}
        return found

    def low(name: str) -> Callable[..., int]:
        function: Callable[..., int] = getattr(lib.lib, name)
        return function

    operations: dict[str, Callable[..., Any]] = {
        "ping": lambda: True,
        "slots": lambda: [[int(s), lib.getTokenInfo(s).label.rstrip(" \x00")]
                          for s in lib.getSlotList(tokenPresent=True)],
        "mechanisms": lambda slot: sorted(str(m) for m in lib.getMechanismList(slot)),
        "token_flags": lambda slot: lib.getTokenInfo(slot).flags,
        "open": op_open,
        "login": lambda sid, pin: sessions[sid].login(pin),
        "logout": lambda sid: sessions[sid].logout(),
        "session_info": op_session_info,
        "close": lambda sid: sessions[sid].closeSession(),
        "close_all": lib.closeAllSessions,
        "aes_key": op_aes_key,
        "encrypt": op_encrypt,
        "decrypt": op_decrypt,
        # Start an operation and leave it active (no C_Encrypt/C_Decrypt after it).
        "encrypt_init": lambda sid, kid: sessions[sid].encryptInit(gcm(os.urandom(12).hex(), ""), keys[kid]),
        "decrypt_init": lambda sid, kid: sessions[sid].decryptInit(gcm(os.urandom(12).hex(), ""), keys[kid]),
        "random": lambda sid, n: bytes(sessions[sid].generateRandom(n)).hex(),
        "finalize": lambda: check(low("C_Finalize")()),
        "initialize": lambda: check(low("C_Initialize")()),
        "probe": op_probe,
        # PyKCS11Lib.unload()/load(): C_Finalize and dlclose, then dlopen and C_Initialize (the broker's way).
        "unload": lib.unload,
        "load": lambda: lib.load(module) and None,
    }
    for line in sys.stdin:
        op, *args = json.loads(line)
        began = time.perf_counter()
        reply: dict[str, Any]
        if op == "exit":
            print(json.dumps({"ok": True}), flush=True)
            break
        try:
            if load_error is not None:
                raise load_error
            value = operations[op](*args)
            reply = {"ok": value if isinstance(value, bool | int | str | list | dict) or value is None
                     else repr(value)}
        except PyKCS11.PyKCS11Error as exc:
            reply = {"err": PyKCS11.CKR.get(exc.value, f"CKR_0x{exc.value:08X}"), "code": exc.value}
        except Exception as exc:  # reported to the parent, which raises it
            reply = {"exc": f"{type(exc).__name__}: {exc}"}
        reply["s"] = time.perf_counter() - began
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1])
