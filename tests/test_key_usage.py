"""`keysealer keys usage` and the retire check, against a real etcd (TLS, client certificates) holding values
written byte for byte as kube-apiserver writes them, with seeds encrypted by the real plugin.

The module shares one etcd and one plugin; the test that destroys a key runs last (file order).
"""

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from apiserver_values import AES_GCM_KEY, ApiserverValues
from etcd_fixture import Etcd, Pki, free_port, running_etcd
from harness import Plugin, created_key_id, running_plugin, short_tmp_dir

from keysealer.frontend.kmsv2 import api_pb2

PROVIDER = "keysealer"


@dataclass
class Store:
    etcd: Etcd
    plugin: Plugin
    keys: dict[str, str]  # role -> key_id: a, b, c (current), d (to be destroyed)
    revision: int


def usage(store: Store, *args: str, etcd_flags: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["keysealer", "keys", "usage", *(store.etcd.flags() if etcd_flags is None else etcd_flags),
                           *args], capture_output=True, text=True, timeout=120, check=False)


def usage_json(store: Store, *args: str) -> dict[str, Any]:
    result = usage(store, "--json", *args)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def rotate(plugin: Plugin) -> str:
    key_id = created_key_id(plugin.keys("rotate").stdout)
    assert plugin.broker is not None
    os.kill(plugin.broker.pid, signal.SIGHUP)
    plugin.wait_for_status_key(key_id)
    return key_id


def fill(etcd: Etcd, plugin: Plugin, values: ApiserverValues) -> dict[str, str]:
    """Objects under several providers, keys and seeds, plaintext and malformed values (expected counts in
    test_counts_every_object_exactly)."""
    prefix = f"k8s:enc:kms:v2:{PROVIDER}:".encode()
    kms_object = values.encrypted_object

    def put(key: str, value: bytes) -> None:
        etcd.put(key.encode(), value)

    keys = {"a": plugin.status().key_id}
    seed1, seed2 = plugin.encrypt(os.urandom(32)), plugin.encrypt(os.urandom(32))
    for name in ("a1", "a2", "a3"):
        put(f"/registry/secrets/default/{name}", prefix + kms_object(seed1))
    for name in ("c1", "c2"):
        put(f"/registry/configmaps/default/{name}", prefix + kms_object(seed1))
    put("/registry/secrets/kube-system/a4", prefix + kms_object(seed2))
    # An unknown field (number 9, varint): Go's protobuf skips it, so the apiserver reads this object.
    put("/registry/secrets/default/a5-unknown-field", prefix + kms_object(seed1) + b"\x48\x01")

    keys["b"] = rotate(plugin)
    seed3 = plugin.encrypt(os.urandom(32))
    for name in ("b1", "b2", "b3"):
        put(f"/registry/secrets/default/{name}", prefix + kms_object(seed3))
    put("/registry/example.com/widgets/default/w1", prefix + kms_object(seed3))

    keys["d"] = rotate(plugin)
    put("/registry/secrets/default/d1", prefix + kms_object(plugin.encrypt(os.urandom(32))))
    keys["c"] = rotate(plugin)
    seed_c = plugin.encrypt(os.urandom(32))
    put("/registry/secrets/default/c-current", prefix + kms_object(seed_c))

    # Another KMS v2 plugin's objects, one seed from an apiserver before seeds (AES_GCM_KEY).
    vault = api_pb2.EncryptResponse(ciphertext=os.urandom(64), key_id="vault-key-1",
                                    annotations={"version.vault.example.com": b"1"})
    vault_old = api_pb2.EncryptResponse(ciphertext=os.urandom(64), key_id="vault-key-1")
    for name in ("v1", "v2"):
        put(f"/registry/secrets/default/{name}", b"k8s:enc:kms:v2:vault:" + kms_object(vault))
    put("/registry/configmaps/default/v3", b"k8s:enc:kms:v2:vault:" + kms_object(vault_old, AES_GCM_KEY))

    for name, other in (("o1", b"k8s:enc:aescbc:v1:key1:"), ("o2", b"k8s:enc:aesgcm:v1:key1:"),
                        ("o3", b"k8s:enc:secretbox:v1:key1:"), ("o4", b"k8s:enc:kms:v1:old-kms:")):
        put(f"/registry/secrets/default/{name}", other + os.urandom(48))

    put("/registry/configmaps/default/p1", b"k8s\x00\n\x0f\n\x02v1\x12\tConfigMap")
    put("/registry/secrets/default/p2", b"k8s\x00\n\x0c\n\x02v1\x12\x06Secret")
    put("/registry/namespaces/default", b'{"kind":"Namespace","apiVersion":"v1"}')

    valid = prefix + kms_object(seed1)
    bad = {
        "truncated": valid[:len(prefix) + 42 + 38 + 10],  # cut inside encryptedDEKSource
        "oversized-key-id": prefix + kms_object(seed1, key_id="k" * 1025),
        "empty-seed": prefix + kms_object(seed1, source=b""),
        "garbage-after-prefix": prefix + b"\xff\xff\xff\xffnot a protobuf",
        "no-provider-name-end": b"k8s:enc:kms:v2:" + b"x" * 300,
        "unknown-source-type": prefix + kms_object(seed1, source_type=7),
        "binary-junk": b"\x00\x01\x02binary",
    }
    for name, value in bad.items():
        put(f"/registry/secrets/default/bad-{name}", value)
    # Outside the prefix: never counted.
    put("/registry-other/secrets/x", valid)
    put("/other/y", valid)
    return keys


@pytest.fixture(scope="module")
def store() -> Iterator[Store]:
    root = short_tmp_dir()
    values = ApiserverValues(root)
    with running_etcd(root / "etcd") as etcd, running_plugin(root / "plugin") as plugin:
        keys = fill(etcd, plugin, values)
        yield Store(etcd, plugin, keys, etcd.revision())
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def unchanged(store: Store) -> Iterator[Store]:
    """Nothing the test runs may write to etcd: its revision stays where filling left it."""
    yield store
    assert store.etcd.revision() == store.revision, "something wrote to etcd"


def test_counts_every_object_exactly(unchanged: Store) -> None:
    store, k = unchanged, unchanged.keys
    document = usage_json(store, "--config", str(store.plugin.layout.broker_config))
    assert document["objects"] == 30
    providers = {p["name"]: {key["key_id"]: key for key in p["keys"]} for p in document["providers"]}
    assert providers == {
        PROVIDER: {
            k["a"]: {"key_id": k["a"], "state": "decrypt-only", "objects": 7, "seeds": 2,
                     "resources": {"configmaps": 2, "secrets": 5}},
            k["b"]: {"key_id": k["b"], "state": "decrypt-only", "objects": 4, "seeds": 1,
                     "resources": {"secrets": 3, "widgets.example.com": 1}},
            k["d"]: {"key_id": k["d"], "state": "decrypt-only", "objects": 1, "seeds": 1, "resources": {"secrets": 1}},
            k["c"]: {"key_id": k["c"], "state": "current", "objects": 1, "seeds": 1, "resources": {"secrets": 1}},
        },
        "vault": {"vault-key-1": {"key_id": "vault-key-1", "state": "not-held", "objects": 3, "seeds": 2,
                                  "resources": {"configmaps": 1, "secrets": 2}}},
    }
    assert (document["plaintext"], document["plaintext_resources"]) == (
        3, {"configmaps": 1, "namespaces": 1, "secrets": 1})
    assert (document["other_providers"], document["other_providers_resources"]) == (4, {"secrets": 4})
    assert document["unparsable"] == 7
    assert all(key.startswith("/registry/secrets/default/bad-") for key in document["unparsable_keys"])


def test_pages_of_any_size_and_a_dead_endpoint_give_the_same_counts(unchanged: Store) -> None:
    whole = usage_json(unchanged, "--etcd-page-size", "1000")
    assert usage_json(unchanged, "--etcd-page-size", "4") == whole
    assert usage_json(unchanged, "--etcd-page-size", "1") == whole
    flags = unchanged.etcd.flags()
    flags[1] = f"https://127.0.0.1:{free_port()},{flags[1]}"  # the first member is down: the next one answers
    result = usage(unchanged, "--json", etcd_flags=flags)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == whole


def test_without_config_states_are_unknown_and_text_names_each_key(unchanged: Store) -> None:
    document = usage_json(unchanged)
    assert {key["state"] for p in document["providers"] for key in p["keys"]} == {"unknown"}
    text = usage(unchanged, "--config", str(unchanged.plugin.layout.broker_config))
    assert text.returncode == 0, text.stderr
    assert f"{unchanged.keys['b']}  decrypt-only: 4 objects, 1 seeds (secrets 3, widgets.example.com 1)" in text.stdout
    assert "plaintext: 3 (configmaps 1, namespaces 1, secrets 1)" in text.stdout
    assert "unparsable: 7 (secrets 7)" in text.stdout


def test_verify_decrypts_every_seed_through_the_plugin(unchanged: Store) -> None:
    socket = str(unchanged.plugin.layout.kms_socket)
    document = usage_json(unchanged, "--verify", "--socket", socket, "--provider", PROVIDER)
    assert document["verify"] == {"seeds": 5, "failed": []}
    # Without --provider the other plugin's seeds are sent too: this plugin refuses their key_id.
    result = usage(unchanged, "--json", "--verify", "--socket", socket)
    assert result.returncode == 1
    failed = json.loads(result.stdout)["verify"]["failed"]
    assert sorted((f["provider"], f["key_id"], f["objects"]) for f in failed) == [
        ("vault", "vault-key-1", 1), ("vault", "vault-key-1", 2)]
    assert all(f["error"].startswith("INVALID_ARGUMENT") for f in failed)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keysealer: error: "), result.stderr
    return lines[0]


def test_bad_input_is_one_line_and_exit_2(unchanged: Store, tmp_path: Path) -> None:
    etcd = unchanged.etcd
    stranger = Pki(tmp_path / "stranger", "stranger-ca")
    stranger_cert, stranger_key = stranger.issue("intruder")
    flags = etcd.flags()

    def with_flag(name: str, value: str, *more: str) -> list[str]:
        changed, pairs = list(flags), [name, value, *more]
        for flag, new in zip(pairs[::2], pairs[1::2], strict=True):
            changed[changed.index(flag) + 1] = new
        return changed

    unreachable = one_line_error(usage(unchanged, etcd_flags=with_flag("--etcd-endpoints",
                                                                       f"https://127.0.0.1:{free_port()}")))
    assert "Connection refused" in unreachable
    assert "TLS" in one_line_error(usage(unchanged, etcd_flags=with_flag("--etcd-cacert", str(stranger.ca))))
    one_line_error(usage(unchanged, etcd_flags=with_flag("--etcd-cert", str(stranger_cert),
                                                         "--etcd-key", str(stranger_key))))
    no_client_cert = flags[:flags.index("--etcd-cert")] + flags[flags.index("--prefix"):]
    one_line_error(usage(unchanged, etcd_flags=no_client_cert))
    assert "cannot load" in one_line_error(usage(unchanged, etcd_flags=with_flag("--etcd-cert", "/nonexistent.crt")))
    fifo = tmp_path / "ca.fifo"
    os.mkfifo(fifo)  # would block ssl's own reader forever
    assert "not a regular file" in one_line_error(usage(unchanged, etcd_flags=with_flag("--etcd-cacert", str(fifo))))
    assert "not a regular file" in one_line_error(usage(unchanged, etcd_flags=with_flag("--etcd-cert", "/dev/zero")))
    assert "nothing is stored under /nothing-here/" in one_line_error(
        usage(unchanged, etcd_flags=with_flag("--prefix", "/nothing-here")))
    assert "names no URL" in one_line_error(usage(unchanged, etcd_flags=with_flag("--etcd-endpoints", ",")))
    assert "http(s)://" in one_line_error(usage(unchanged, etcd_flags=with_flag("--etcd-endpoints", "ftp://x")))
    assert "--socket" in one_line_error(usage(unchanged, "--verify"))
    assert "cannot verify" in one_line_error(usage(unchanged, "--verify", "--socket", str(tmp_path / "none.sock")))


def states(plugin: Plugin) -> dict[str, str]:
    return {line.split()[0]: line.split()[-1] for line in plugin.keys("list").stdout.splitlines()[1:]}


def test_retire_refuses_keys_in_use_and_verify_reports_a_destroyed_one(unchanged: Store) -> None:
    store, k, plugin = unchanged, unchanged.keys, unchanged.plugin
    before = states(plugin)
    refused = plugin.keys("retire", k["b"], *store.etcd.flags(), check=False)
    line = one_line_error(refused)
    assert "4 stored objects still need" in line and "secrets 3, widgets.example.com 1" in line
    line = one_line_error(plugin.keys("retire", k["d"], "--destroy", "--yes", check=False))
    assert "--unchecked" in line
    line = one_line_error(plugin.keys("retire", k["d"], "--destroy", "--yes", *store.etcd.flags(), check=False))
    assert "1 stored objects still need" in line
    assert states(plugin) == before  # nothing changed in the token

    spare = created_key_id(plugin.keys("create", "--label", "spare").stdout)
    retired = plugin.keys("retire", spare, *store.etcd.flags())
    assert "no object under /registry in etcd needs" in retired.stderr and states(plugin)[spare] == "retired"
    unchecked = plugin.keys("retire", spare, "--destroy", "--yes", "--unchecked")
    assert "could not check" in unchecked.stderr and spare not in states(plugin)

    forced = plugin.keys("retire", k["d"], "--destroy", "--yes", "--force", *store.etcd.flags())
    assert "1 stored objects still need" in forced.stderr and k["d"] not in states(plugin)
    assert plugin.broker is not None
    os.kill(plugin.broker.pid, signal.SIGHUP)
    result = usage(store, "--json", "--verify", "--socket", str(plugin.layout.kms_socket), "--provider", PROVIDER)
    assert result.returncode == 1, result.stderr
    verify = json.loads(result.stdout)["verify"]
    assert verify["seeds"] == 5
    assert [(f["key_id"], f["objects"], f["keys"]) for f in verify["failed"]] == [
        (k["d"], 1, ["/registry/secrets/default/d1"])]
    text = usage(store, "--verify", "--socket", str(plugin.layout.kms_socket), "--provider", PROVIDER)
    assert text.returncode == 1 and f"FAILED provider {PROVIDER} key {k['d']}" in text.stdout
    assert "4 of 5 seeds decrypt" in text.stdout
