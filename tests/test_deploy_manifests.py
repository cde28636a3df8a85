"""The deployment files under deploy/ keep their security settings and agree with each other.

Static checks (tests/test_deployment_shapes.py runs the pod and the images for real): every YAML file parses;
the static pod keeps its hardening (distinct non-root uids, read-only root, no privilege escalation, no
capabilities, seccomp, priority, probes, resources, in-memory IPC volume, read-only PIN); each secret is
mounted only into the container that owns it; the pod, the configs, kubeadm's patch and the
EncryptionConfiguration name the same socket paths; the seccomp profile has the OCI shape and refuses what the
broker's own sandbox refuses; the Containerfile installs hashed wheels and ends non-root with no compiler.
"""

import json
import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from keysealer.frontend.config import load_frontend_config
from keysealer.hsm_broker.config import load_broker_config
from keysealer.shared.sandbox import DENIED_SYSCALLS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KUBEADM = DEPLOY / "kubeadm"
CONTAINER = DEPLOY / "container"
POD_FILE = KUBERNETES / "keysealer.yaml"
BROKER_CONFIG = KUBERNETES / "broker.yaml"
FRONTEND_CONFIG = KUBERNETES / "frontend.yaml"
ENCRYPTION_CONFIG = KUBEADM / "encryption-config.yaml"
TMPFILES = KUBERNETES / "keysealer-tmpfiles.conf"
CONTAINERS = ("broker", "frontend")
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def load_one(path: Path) -> Any:
    docs = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


@pytest.fixture(scope="module")
def pod() -> dict[str, Any]:
    doc = load_one(POD_FILE)
    assert doc["kind"] == "Pod"
    return doc


@pytest.fixture(scope="module")
def broker_config() -> dict[str, Any]:
    return load_one(BROKER_CONFIG)


@pytest.fixture(scope="module")
def frontend_config() -> dict[str, Any]:
    return load_one(FRONTEND_CONFIG)


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [c for c in pod["spec"]["containers"] if c["name"] == name]
    assert len(matches) == 1, f"no single container named {name}"
    return matches[0]


def volumes(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod["spec"]["volumes"]}


def mount_for(pod: dict[str, Any], name: str, path: str) -> dict[str, Any] | None:
    """The volumeMount of container `name` that holds `path` (the deepest one), or None."""
    best = None
    for mount in container(pod, name).get("volumeMounts", []):
        mount_path = PurePosixPath(mount["mountPath"])
        target = PurePosixPath(path)
        if (target == mount_path or mount_path in target.parents) and (
                best is None or len(mount_path.parts) > len(PurePosixPath(best["mountPath"]).parts)):
            best = mount
    return best


def host_path_of(pod: dict[str, Any], name: str, path: str) -> str | None:
    """Where `path` seen in container `name` lives on the node (None: not a hostPath)."""
    mount = mount_for(pod, name, path)
    assert mount is not None, f"{path} is not on any volume of the {name} container"
    volume = volumes(pod)[mount["name"]]
    if "hostPath" not in volume:
        return None
    relative = PurePosixPath(path).relative_to(mount["mountPath"])
    return str(PurePosixPath(volume["hostPath"]["path"]) / relative)


def visible_host_paths(pod: dict[str, Any], name: str) -> list[str]:
    return [volumes(pod)[m["name"]]["hostPath"]["path"] for m in container(pod, name).get("volumeMounts", [])
            if "hostPath" in volumes(pod)[m["name"]]]


def config_path_in_pod(pod: dict[str, Any], name: str) -> str:
    command = container(pod, name)["command"]
    assert command[0] == f"keysealer-{name}"
    return str(command[command.index("--config") + 1])


def covers(directory: str, path: str) -> bool:
    return PurePosixPath(path) == PurePosixPath(directory) or PurePosixPath(directory) in PurePosixPath(path).parents


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (the forms used here: 50m, 64Mi, 1Gi, 2) as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    text = str(value)
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


# ---- every YAML file -------------------------------------------------------------------------------------

def test_deploy_has_the_expected_yaml_files() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in YAML_FILES}
    expected = {"kubernetes/keysealer.yaml", "kubernetes/broker.yaml", "kubernetes/frontend.yaml",
                "kubeadm/encryption-config.yaml", "kubeadm/clusterconfiguration-v1beta3.yaml",
                "kubeadm/clusterconfiguration-v1beta4.yaml", "kubeadm/patches/kube-apiserver0+json.yaml"}
    assert expected <= names, f"missing: {sorted(expected - names)}"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path: Path) -> None:
    docs = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
    assert docs, f"{path}: no YAML document"
    for doc in docs:
        assert isinstance(doc, dict | list), f"{path}: a document is a {type(doc).__name__}"


# ---- the static pod ----------------------------------------------------------------------------------------

def test_pod_is_a_critical_kube_system_static_pod(pod: dict[str, Any]) -> None:
    assert pod["apiVersion"] == "v1"
    assert pod["metadata"]["namespace"] == "kube-system"
    spec = pod["spec"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec.get("priority") == 2000001000
    # No pod network before kube-apiserver exists: the plugin must not depend on CNI.
    assert spec.get("hostNetwork") is True
    assert spec.get("automountServiceAccountToken") is False
    assert sorted(c["name"] for c in spec["containers"]) == sorted(CONTAINERS)
    for flag in ("hostPID", "hostIPC"):
        assert not spec.get(flag), flag


def test_containers_run_as_distinct_non_root_uids(pod: dict[str, Any]) -> None:
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    uids = []
    for name in CONTAINERS:
        context = container(pod, name)["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert isinstance(context["runAsUser"], int) and context["runAsUser"] > 0, name
        assert isinstance(context["runAsGroup"], int) and context["runAsGroup"] > 0, name
        uids.append(context["runAsUser"])
    assert len(set(uids)) == len(uids), f"broker and frontend share a uid: {uids}"


@pytest.mark.parametrize("name", CONTAINERS)
def test_container_is_locked_down(pod: dict[str, Any], name: str) -> None:
    context = container(pod, name)["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context.get("privileged", False) is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert not context["capabilities"].get("add")


def test_seccomp_profiles(pod: dict[str, Any]) -> None:
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    frontend = container(pod, "frontend")["securityContext"].get("seccompProfile", {"type": "RuntimeDefault"})
    assert frontend == {"type": "RuntimeDefault"}
    broker = container(pod, "broker")["securityContext"]["seccompProfile"]
    assert broker["type"] == "Localhost"
    # Relative to the kubelet's seccomp directory; shipped in deploy/kubernetes/seccomp/.
    match = re.fullmatch(r"profiles/([a-z0-9-]+\.json)", broker["localhostProfile"])
    assert match, broker["localhostProfile"]
    assert (KUBERNETES / "seccomp" / match.group(1)).is_file()


@pytest.mark.parametrize("name", CONTAINERS)
def test_resources_have_requests_and_a_memory_limit(pod: dict[str, Any], name: str) -> None:
    resources = container(pod, name)["resources"]
    requests, limits = resources["requests"], resources["limits"]
    assert quantity(requests["cpu"]) > 0 and quantity(requests["memory"]) > 0
    assert quantity(limits["memory"]) >= quantity(requests["memory"])
    # Measured: about 30 MiB (broker, 2 workers) and 40 MiB (frontend) under load; keep headroom.
    assert quantity(limits["memory"]) >= 128 * 2**20
    if "cpu" in limits:
        assert quantity(limits["cpu"]) >= quantity(requests["cpu"])


def test_readiness_probe_runs_keysealer_status_on_the_kms_socket(pod: dict[str, Any],
                                                                 frontend_config: dict[str, Any]) -> None:
    probe = container(pod, "frontend")["readinessProbe"]
    command = probe["exec"]["command"]
    assert all(isinstance(part, str) for part in command), command
    assert command[:2] == ["keysealer", "status"]
    assert command[command.index("--socket") + 1] == frontend_config["listen"]["socket"]
    timeout = float(command[command.index("--timeout") + 1]) if "--timeout" in command else 3.0
    assert probe["timeoutSeconds"] > timeout


def test_liveness_probe_does_not_depend_on_the_token(pod: dict[str, Any], frontend_config: dict[str, Any]) -> None:
    frontend = container(pod, "frontend")
    probe = frontend["livenessProbe"]
    command = probe["exec"]["command"]
    assert command != frontend["readinessProbe"]["exec"]["command"], \
        "`keysealer status` exits 1 when the token is down: as liveness it would restart a healthy plugin"
    assert all(isinstance(part, str) for part in command), f"not a list of strings (YAML quoting?): {command}"
    script = " ".join(command)
    assert "keysealer status" in script and frontend_config["listen"]["socket"] in script
    # Passes when Status answers at all, whatever healthz says.
    assert command[-1] == "--liveness"
    assert probe["timeoutSeconds"] >= 5 and probe["failureThreshold"] >= 3
    broker = container(pod, "broker")
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        words = " ".join(str(part) for part in broker.get(kind, {}).get("exec", {}).get("command", []))
        assert "status" not in words, f"broker {kind} depends on the token: {words}"


def test_ipc_volume_is_in_memory_and_shared_by_both(pod: dict[str, Any], broker_config: dict[str, Any],
                                                    frontend_config: dict[str, Any]) -> None:
    socket = broker_config["ipc"]["socket"]
    assert frontend_config["broker"]["socket"] == socket
    mounts = {name: mount_for(pod, name, socket) for name in CONTAINERS}
    assert mounts["broker"] is not None and mounts["frontend"] is not None
    assert mounts["broker"]["name"] == mounts["frontend"]["name"]
    assert mounts["broker"]["mountPath"] == mounts["frontend"]["mountPath"]
    volume = volumes(pod)[mounts["broker"]["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    # The broker chmods the socket's directory: it must be one it creates, not the volume's root.
    assert PurePosixPath(socket).parent != PurePosixPath(mounts["broker"]["mountPath"])


def test_pin_is_a_read_only_host_file_of_the_broker_only(pod: dict[str, Any], broker_config: dict[str, Any]) -> None:
    pin = broker_config["token"]["pin_file"]
    mount = mount_for(pod, "broker", pin)
    assert mount is not None and mount["readOnly"] is True
    volume = volumes(pod)[mount["name"]]
    assert volume["hostPath"]["type"] == "File"
    assert mount["mountPath"] == pin
    pin_on_node = host_path_of(pod, "broker", pin)
    assert pin_on_node is not None
    assert not any(covers(path, pin_on_node) for path in visible_host_paths(pod, "frontend"))
    assert all(m["name"] != mount["name"] for m in container(pod, "frontend")["volumeMounts"])


def test_each_curve_secret_is_mounted_only_into_its_own_container(pod: dict[str, Any], broker_config: dict[str, Any],
                                                                  frontend_config: dict[str, Any]) -> None:
    owned = {"broker": [broker_config["ipc"]["server_key"], broker_config["token"]["pin_file"],
                        broker_config["token"]["module_env"]["SOFTHSM2_CONF"]],
             "frontend": [frontend_config["broker"]["client_key"]]}
    assert owned["broker"][0].endswith(".key_secret") and owned["frontend"][0].endswith(".key_secret")
    for name, paths in owned.items():
        other = next(c for c in CONTAINERS if c != name)
        for path in paths:
            on_node = host_path_of(pod, name, path)
            assert on_node is not None, f"{path}: expected a hostPath file"
            leaked = [p for p in visible_host_paths(pod, other) if covers(p, on_node)]
            assert not leaked, f"{on_node} is also visible to the {other} container through {leaked}"
    token_dir = "/var/lib/keysealer/tokens"
    assert host_path_of(pod, "broker", token_dir) == token_dir
    assert not any(covers(p, token_dir) for p in visible_host_paths(pod, "frontend"))


def test_config_paths_are_on_volumes_and_the_same_as_on_the_node(pod: dict[str, Any], broker_config: dict[str, Any],
                                                                 frontend_config: dict[str, Any]) -> None:
    """Each hostPath is mounted at its own path, so `keysealer keys ...` on the node uses the same config."""
    paths = {
        "broker": [broker_config["token"]["pin_file"], broker_config["ipc"]["server_key"],
                   *broker_config["ipc"]["client_keys"], broker_config["token"]["module_env"]["SOFTHSM2_CONF"],
                   config_path_in_pod(pod, "broker")],
        "frontend": [frontend_config["broker"]["client_key"], frontend_config["broker"]["server_key"],
                     frontend_config["listen"]["socket"], config_path_in_pod(pod, "frontend")],
    }
    for name, wanted in paths.items():
        for path in wanted:
            on_node = host_path_of(pod, name, path)
            assert on_node == path, f"{name}: {path} is {on_node} on the node"
    for mount_name in ("broker", "frontend"):
        for mount in container(pod, mount_name)["volumeMounts"]:
            volume = volumes(pod)[mount["name"]]
            if "hostPath" in volume:
                assert mount["mountPath"] == volume["hostPath"]["path"], mount


def test_kms_socket_directory_is_a_host_directory_mounted_by_the_frontend(pod: dict[str, Any],
                                                                         frontend_config: dict[str, Any]) -> None:
    socket_dir = str(PurePosixPath(frontend_config["listen"]["socket"]).parent)
    mount = mount_for(pod, "frontend", frontend_config["listen"]["socket"])
    assert mount is not None and mount["mountPath"] == socket_dir and not mount.get("readOnly")
    volume = volumes(pod)[mount["name"]]
    # "Directory", not "DirectoryOrCreate": a directory the kubelet creates is root's, and uid 10001
    # could not bind there.
    assert volume["hostPath"] == {"path": socket_dir, "type": "Directory"}
    assert mount_for(pod, "broker", frontend_config["listen"]["socket"]) is None


def test_configs_set_no_user_and_load_with_the_product_loaders(pod: dict[str, Any], broker_config: dict[str, Any],
                                                               frontend_config: dict[str, Any]) -> None:
    # The containers start as their non-root uids: nothing to drop, so `user` stays unset.
    assert "user" not in broker_config and "user" not in frontend_config
    # The broker's peer-uid check must admit the frontend's uid, named in the image's /etc/passwd.
    assert broker_config["ipc"]["frontend_user"] == "keysealer-kms"
    image = (CONTAINER / "Containerfile").read_text(encoding="utf-8")
    frontend_uid = container(pod, "frontend")["securityContext"]["runAsUser"]
    broker_uid = container(pod, "broker")["securityContext"]["runAsUser"]
    assert f"--uid {frontend_uid} " in image and re.search(rf"--uid {frontend_uid} .*keysealer-kms\b", image, re.S)
    assert f"--uid {broker_uid} " in image
    module = Path(broker_config["token"]["module"])
    if not module.is_file():
        pytest.skip(f"{module} is not installed here (the broker loader checks that it exists)")
    broker = load_broker_config(BROKER_CONFIG)
    frontend = load_frontend_config(FRONTEND_CONFIG)
    assert broker.user is None and frontend.user is None
    assert broker.ipc.group is None  # the shared primary group 10000 gives the frontend the socket


def test_tmpfiles_creates_the_host_directories_with_the_container_owners(pod: dict[str, Any],
                                                                        broker_config: dict[str, Any]) -> None:
    lines = [line.split() for line in TMPFILES.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    # The first line for a path (a later "Z" only re-applies the owner recursively).
    entries: dict[str, list[str]] = {}
    for fields in lines:
        entries.setdefault(fields[1], fields)
    uid = {name: str(container(pod, name)["securityContext"]["runAsUser"]) for name in CONTAINERS}
    gid = str(container(pod, "broker")["securityContext"]["runAsGroup"])
    for name in CONTAINERS:
        for mount in container(pod, name)["volumeMounts"]:
            host = volumes(pod)[mount["name"]].get("hostPath")
            if not host or host["type"] != "Directory":
                continue
            fields = entries.get(host["path"])
            assert fields is not None, f"{host['path']} is not created by {TMPFILES.name}"
            # Written by the container: its uid's. Only read: root's (root prepares files there and trusts
            # no directory another user could change), readable through the containers' group.
            owner = "root" if mount.get("readOnly") else uid[name]
            assert fields[0] == "d" and fields[3] == owner, fields
            assert fields[4] == gid, fields
            assert int(fields[2], 8) & 0o007 == 0, f"{host['path']}: mode {fields[2]} lets others in"
            if owner != "root":
                assert int(fields[2], 8) & 0o070 == 0, f"{host['path']}: mode {fields[2]} lets the group in"
    pin = entries[broker_config["token"]["pin_file"]]
    assert pin[0] == "z" and pin[2] == "0400" and pin[3] == uid["broker"] and pin[4] == gid


# ---- seccomp profile ----------------------------------------------------------------------------------------

SECCOMP_FILES = sorted((KUBERNETES / "seccomp").glob("*.json"))
ACTIONS = {"SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD",
           "SCMP_ACT_TRAP", "SCMP_ACT_TRACE", "SCMP_ACT_LOG"}
OPERATORS = {"SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT",
             "SCMP_CMP_MASKED_EQ"}


def test_there_is_a_seccomp_profile() -> None:
    assert [p.name for p in SECCOMP_FILES] == ["keysealer-broker.json"]


@pytest.mark.parametrize("path", SECCOMP_FILES, ids=lambda p: p.name)
def test_seccomp_profile_shape(path: Path) -> None:
    profile = json.loads(path.read_text(encoding="utf-8"))
    assert set(profile) <= {"defaultAction", "defaultErrnoRet", "architectures", "syscalls"}
    # An allowlist: whatever is not listed fails with EPERM.
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == 1
    assert profile["architectures"] and all(re.fullmatch(r"SCMP_ARCH_[A-Z0-9_]+", a) for a in profile["architectures"])
    assert isinstance(profile["syscalls"], list) and profile["syscalls"]
    for rule in profile["syscalls"]:
        assert set(rule) <= {"names", "action", "args", "errnoRet", "comment"}, rule
        assert rule["action"] in ACTIONS
        assert rule["names"] and all(re.fullmatch(r"[a-z0-9_]+", n) for n in rule["names"]), rule["names"]
        assert len(set(rule["names"])) == len(rule["names"])
        for arg in rule.get("args", []):
            assert set(arg) <= {"index", "value", "valueTwo", "op"} and arg["op"] in OPERATORS
            assert 0 <= arg["index"] <= 5 and isinstance(arg["value"], int)
        if "errnoRet" in rule:
            assert rule["action"] == "SCMP_ACT_ERRNO" and isinstance(rule["errnoRet"], int)


def allowed(profile: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Syscall name -> the argument conditions under which it is allowed ([] = always)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for rule in profile["syscalls"]:
        if rule["action"] == "SCMP_ACT_ALLOW":
            for name in rule["names"]:
                found.setdefault(name, []).extend(rule.get("args", []) or [{}])
    return found


def test_broker_profile_allows_what_the_broker_needs_and_nothing_its_sandbox_refuses() -> None:
    profile = json.loads((KUBERNETES / "seccomp" / "keysealer-broker.json").read_text(encoding="utf-8"))
    allow = allowed(profile)
    # execve: the runtime starts the container with it (the broker's own filter then refuses it).
    # seccomp, prctl: the broker's lockdown. sched_setscheduler: libzmq aborts without it. mlock:
    # SoftHSM's secure memory. wait4, kill: the supervisor's workers.
    for name in ("execve", "seccomp", "prctl", "sched_setscheduler", "mlock", "wait4", "kill", "futex", "mmap",
                 "openat", "read", "write", "close", "bind", "listen", "accept4", "connect", "getsockopt",
                 "epoll_wait", "epoll_pwait", "eventfd2", "clone", "exit_group", "rt_sigreturn"):
        assert allow.get(name) is not None, f"{name} is not allowed"
    assert not set(allow) & (set(DENIED_SYSCALLS) - {"execve"}), "allows a call the broker's sandbox refuses"
    for name in ("socketpair", "setuid", "setresuid", "setgroups", "capset", "chown", "fchown", "fchownat"):
        assert name not in allow, name
    # Unix sockets only: socket() is allowed for AF_UNIX (1) and nothing else.
    assert allow["socket"] == [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]
    # No namespaces through clone; clone3 (flags out of the filter's reach) gets ENOSYS.
    assert allow["clone"] == [{"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]
    assert "clone3" not in allow
    assert any(r["names"] == ["clone3"] and r["action"] == "SCMP_ACT_ERRNO" and r["errnoRet"] == 38
               for r in profile["syscalls"])


# ---- kube-apiserver side ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encryption_config() -> dict[str, Any]:
    return load_one(ENCRYPTION_CONFIG)


def kms_providers(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [p["kms"] for entry in config["resources"] for p in entry["providers"] if "kms" in p]


def test_encryption_configuration_is_kms_v2(encryption_config: dict[str, Any], frontend_config: dict[str, Any]) -> None:
    assert encryption_config["apiVersion"] == "apiserver.config.k8s.io/v1"
    assert encryption_config["kind"] == "EncryptionConfiguration"
    assert any("secrets" in entry["resources"] for entry in encryption_config["resources"])
    providers = kms_providers(encryption_config)
    assert len(providers) == 1
    kms = providers[0]
    assert kms["apiVersion"] == "v2"
    assert "cachesize" not in kms, "KMS v2 takes no cachesize"
    assert ":" not in kms["name"] and re.fullmatch(r"[a-z0-9][a-z0-9-]*", kms["name"])
    assert kms["endpoint"] == "unix://" + frontend_config["listen"]["socket"]
    # Above the frontend's own deadline, so the apiserver gets KeySealer's answer, not its timeout.
    assert float(kms["timeout"].rstrip("s")) > frontend_config["limits"]["call_timeout_seconds"]
    first = encryption_config["resources"][0]["providers"][0]
    assert "kms" in first, "KeySealer must be the first provider, the one new writes use"


def kubeadm_extra_args(config: dict[str, Any]) -> dict[str, str]:
    args = config["apiServer"]["extraArgs"]
    if config["apiVersion"] == "kubeadm.k8s.io/v1beta3":
        assert isinstance(args, dict)
        return args
    assert isinstance(args, list)
    return {arg["name"]: arg["value"] for arg in args}


@pytest.mark.parametrize("version", ["v1beta3", "v1beta4"])
def test_kubeadm_patch_mounts_the_config_and_the_plugin_socket(version: str, pod: dict[str, Any],
                                                             encryption_config: dict[str, Any]) -> None:
    config = load_one(KUBEADM / f"clusterconfiguration-{version}.yaml")
    assert config["apiVersion"] == f"kubeadm.k8s.io/{version}"
    assert config["kind"] == "ClusterConfiguration"
    config_path = kubeadm_extra_args(config)["encryption-provider-config"]
    assert PurePosixPath(config_path).name == "keysealer.yaml"
    extra = config["apiServer"]["extraVolumes"]
    by_mount = {v["mountPath"]: v for v in extra}
    config_dir = str(PurePosixPath(config_path).parent)
    assert by_mount[config_dir]["hostPath"] == config_dir and by_mount[config_dir]["readOnly"] is True
    socket = kms_providers(encryption_config)[0]["endpoint"].removeprefix("unix://")
    socket_dir = str(PurePosixPath(socket).parent)
    volume = by_mount.get(socket_dir)
    assert volume is not None, f"kube-apiserver does not mount {socket_dir}"
    assert volume["pathType"] == "Directory"
    pod_socket_dir = volumes(pod)[mount_for(pod, "frontend", socket)["name"]]["hostPath"]["path"]
    assert volume["hostPath"] == pod_socket_dir == socket_dir


def test_kubeadm_probe_patch_keeps_kms_out_of_livez() -> None:
    ops = load_one(KUBEADM / "patches" / "kube-apiserver0+json.yaml")
    paths = {op["path"]: op for op in ops}
    for probe in ("livenessProbe", "startupProbe"):
        op = paths[f"/spec/containers/0/{probe}/httpGet/path"]
        assert op["op"] == "replace"
        assert op["value"].startswith("/livez?")
        assert "exclude=kms-provider-0" in op["value"] and "exclude=kms-providers" in op["value"]
    assert not any("readinessProbe" in path for path in paths), "/readyz must keep the KMS check"


# ---- container image --------------------------------------------------------------------------------------

def stages(containerfile: Path) -> list[tuple[str, str]]:
    """(FROM line, stage text) for each stage, comments and continuation lines joined."""
    text = re.sub(r"\\\n", " ", containerfile.read_text(encoding="utf-8"))
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    found: list[tuple[str, list[str]]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            found.append((line, []))
        elif found:
            found[-1][1].append(line)
    return [(head, "\n".join(body)) for head, body in found]


def test_containerfile_is_multi_stage_and_installs_only_hashed_wheels() -> None:
    found = stages(CONTAINER / "Containerfile")
    assert len(found) >= 2
    names = [re.search(r"\bAS\s+(\S+)", head, re.I) for head, _ in found]
    assert all(names), "every stage is named"
    build_text = "\n".join(body for _, body in found[:-1])
    commands = [part.strip() for line in build_text.splitlines() for part in line.split("&&")]
    installs = [command for command in commands if re.search(r"\bpip\b.*\binstall\b", command)]
    locked = [command for command in installs if " -r " in command]
    assert len(locked) >= 2, installs
    for command in locked:
        assert "--require-hashes" in command and "--only-binary :all:" in command, command
    for command in installs:
        assert "--no-deps" in command, command
        assert " -r " in command or "--no-index" in command, f"unpinned install: {command}"
    for lock in re.findall(r"-r (\S+)", build_text):
        assert (ROOT / lock).is_file(), lock


def test_containerfile_final_stage_is_non_root_without_compilers() -> None:
    head, final = stages(CONTAINER / "Containerfile")[-1]
    users = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    assert "COPY --from=build /opt/keysealer /opt/keysealer" in final
    for word in ("gcc", "g++", "clang", "build-essential", "make", "cc ", "-dev ", "python3-dev", "pip install"):
        assert word not in final + " ", f"final stage ({head}) has {word!r}"
    derived = stages(CONTAINER / "Containerfile.softhsm")
    assert len(derived) == 1
    derived_users = re.findall(r"^USER\s+(\S+)", derived[0][1], re.M)
    assert derived_users and derived_users[-1].split(":")[0] not in ("0", "root")
    assert "softhsm2" in derived[0][1] and "gcc" not in derived[0][1]


def requirement_names(lock: Path) -> dict[str, list[str]]:
    """name -> hashes of every requirement in a pip-compile --generate-hashes file."""
    text = re.sub(r"\\\n", " ", lock.read_text(encoding="utf-8"))
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", line)
        assert match, f"{lock.name}: not pinned with hashes: {line[:80]}"
        found[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = re.findall(r"[0-9a-f]{64}", match.group(3))
    return found


def test_lock_files_pin_every_runtime_dependency_with_hashes() -> None:
    runtime = requirement_names(CONTAINER / "requirements.lock")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for requirement in project["dependencies"]:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)).lower()
        assert runtime.get(name), f"{name} is not in requirements.lock"
    build = requirement_names(CONTAINER / "requirements-build.lock")
    assert set(build) == {"setuptools"}
    assert not set(build) & set(runtime)
