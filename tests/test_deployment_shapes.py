"""Every deployment shape runs for real: images built by deploy/container/build.sh, the static pod started by
`podman kube play` from deploy/kubernetes/keysealer.yaml itself, the systemd units booted under systemd 252
as PID 1 (below, "the systemd pair"), and one-line errors for a build without podman or base, a missing
manifest.

The pod: the test installs the node's files as docs/install.md says (keysealer-tmpfiles.conf under a scratch
root, configs, CURVE keys, PIN, a token made as the broker's uid with the image's own `keysealer keys`), then
changes in the manifest only the hostPath paths (to the scratch root) and the image name (the test's),
and spells one field the way podman reads it (below).
Fields podman 4.3 does not honour, and how their property is checked instead:
  - securityContext.seccompProfile: podman 4.3 ignores the field (both containers would get its default
    profile). The test writes the broker's Localhost profile also as the annotation podman reads
    (container.seccomp.security.alpha.kubernetes.io/broker: localhost/keysealer-broker.json; podman keeps
    only the first path element after localhost/, so --seccomp-profile-root is the kubelet's
    /var/lib/kubelet/seccomp/profiles) and compares the OCI spec runc got with the profile file.
    RuntimeDefault is podman's default profile.
  - emptyDir medium: Memory, sizeLimit: podman makes a volume on disk (not checked; a kubelet makes tmpfs).
  - readinessProbe: ignored by podman; livenessProbe becomes a healthcheck. The test runs both commands
    with `podman exec`, as the kubelet's exec probes run (in the container, as its user).
  - priorityClassName/priority, resources.requests, terminationGracePeriodSeconds: scheduling and
    eviction only; not checked.

Marked `containers`: needs root and podman (deploy/packages/containers.txt); tests/run.sh runs it in CI.
"""

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
import pytest
import yaml
from deployment_shapes import (
    DEPLOY,
    TEST_PREFIX,
    assert_confined,
    children,
    images,
    inspect,
    podman,
    proc_status,
    require_podman,
    root_mount_options,
    run,
)
from harness import KmsClient, Load, created_key_id
from test_confinement_assets import exposure

from keysealer.frontend.kmsv2 import api_pb2

pytestmark = pytest.mark.containers
__all__ = ["images"]  # the session fixture, imported so pytest finds it

KUBERNETES = DEPLOY / "kubernetes"
POD_NAME = "keysealer"  # metadata.name of the manifest: the test changes nothing but paths and image
BROKER, FRONTEND = f"{POD_NAME}-broker", f"{POD_NAME}-frontend"
BROKER_UID, FRONTEND_UID, GROUP = 10002, 10001, 10000
DEADLINE = 2.5 + 1.0  # frontend.yaml's limits.call_timeout_seconds + slack
KEYSEALER = str(Path(sys.executable).with_name("keysealer"))


class Node:
    """A control-plane node's files under a scratch root, prepared as docs/install.md's static pod section."""

    def __init__(self, root: Path, image: str) -> None:
        self.root = root
        self.image = image
        run(["systemd-tmpfiles", "--create", f"--root={root}", str(KUBERNETES / "keysealer-tmpfiles.conf")])
        broker_dir, frontend_dir = self.path("/etc/keysealer/broker"), self.path("/etc/keysealer/frontend")
        for source, target in (("broker.yaml", broker_dir), ("softhsm2.conf", broker_dir),
                               ("frontend.yaml", frontend_dir)):
            shutil.copy(KUBERNETES / source, target / source)
        for directory, name in ((frontend_dir, "frontend"), (broker_dir, "broker")):
            run([KEYSEALER, "ipc-keygen", "--dir", str(directory), "--name", name])
        shutil.copy(frontend_dir / "frontend.key", broker_dir)
        shutil.copy(broker_dir / "broker.key", frontend_dir)
        os.chown(frontend_dir / "frontend.key_secret", FRONTEND_UID, GROUP)
        os.chown(broker_dir / "broker.key_secret", BROKER_UID, GROUP)
        for name in ("pin", "so-pin"):
            path = self.path(f"/etc/keysealer/{name}")
            path.write_text(secrets.token_hex(16))
            os.chown(path, BROKER_UID, GROUP)
            path.chmod(0o400)
        self.keys("init-token", "--so-pin-file", "/etc/keysealer/so-pin")
        self.key_id = created_key_id(self.keys("create"))

    def path(self, node_path: str) -> Path:
        return self.root / node_path.lstrip("/")

    def keys(self, *args: str) -> str:
        """`keysealer keys ARGS` as the broker's uid, with the image's keysealer and SoftHSM (install.md uses
        the node's venv and setpriv: the same program, the same uid, the same paths)."""
        mounts = [f"{self.path(p)}:{p}" for p in ("/etc/keysealer/broker", "/etc/keysealer/pin",
                                                   "/etc/keysealer/so-pin", "/var/lib/keysealer/tokens")]
        cp = podman("run", "--rm", "--network", "none", "--user", f"{BROKER_UID}:{GROUP}",
                    *[arg for mount in mounts for arg in ("-v", mount)], self.image,
                    "keysealer", "keys", args[0], "--config", "/etc/keysealer/broker/broker.yaml", *args[1:])
        return cp.stdout

    def manifest(self) -> Path:
        """deploy/kubernetes/keysealer.yaml with only its hostPath paths and images changed."""
        pod: dict[str, Any] = yaml.safe_load((KUBERNETES / "keysealer.yaml").read_text())
        for volume in pod["spec"]["volumes"]:
            if "hostPath" in volume:
                volume["hostPath"]["path"] = str(self.path(volume["hostPath"]["path"]))
        for container in pod["spec"]["containers"]:
            container["image"] = self.image
            # podman 4.3 reads no securityContext.seccompProfile field, only the annotation the field replaced:
            # the same profile, spelled the way podman reads it.
            profile = container["securityContext"].get("seccompProfile", {})
            if profile.get("type") == "Localhost":
                pod["metadata"].setdefault("annotations", {})[
                    f"container.seccomp.security.alpha.kubernetes.io/{container['name']}"] = \
                    f"localhost/{PurePosixPath(profile['localhostProfile']).name}"
        path = self.root / "keysealer.yaml"
        path.write_text(yaml.safe_dump(pod))
        return path

    def seccomp_root(self) -> Path:
        """The kubelet's seccomp directory's profiles/, holding keysealer-broker.json as install.md installs it."""
        profiles = self.root / "seccomp" / "profiles"
        profiles.mkdir(parents=True)
        shutil.copy(KUBERNETES / "seccomp" / "keysealer-broker.json", profiles)
        return profiles


class Pod(KmsClient):
    def __init__(self, node: Node) -> None:
        super().__init__(node.path("/run/keysealer/kms.sock"))
        self.node = node

    def pid(self, container: str) -> int:
        return int(inspect(container, "{{.State.Pid}}"))

    def describe(self) -> str:
        return "\n".join(podman("logs", name, check=False).stderr for name in (BROKER, FRONTEND))


@pytest.fixture(scope="module")
def pod(images: dict[str, str]) -> Iterator[Pod]:
    existing = podman("pod", "exists", POD_NAME, check=False)
    assert existing.returncode != 0, f"a pod named {POD_NAME} already runs here: remove it first"
    root = Path(tempfile.mkdtemp(prefix="ks-pod-", dir="/tmp"))
    node = Node(root, images["softhsm"])
    manifest = node.manifest()
    try:
        podman("kube", "play", "--seccomp-profile-root", str(node.seccomp_root()), str(manifest))
        running = Pod(node)
        running.wait_healthy(timeout=60)
        yield running
        running.close()
    finally:
        podman("kube", "down", str(manifest), check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_pod_containers_run_with_the_manifests_identity_and_confinement(pod: Pod) -> None:
    for container, uid, filters in ((BROKER, BROKER_UID, 2), (FRONTEND, FRONTEND_UID, 2)):
        pid = pod.pid(container)
        # The pod's profile (or RuntimeDefault) and then KeySealer's own filter.
        assert_confined(pid, uid, filters)
        assert "ro" in root_mount_options(pid), f"{container}: root file system not read-only"
        assert int(proc_status(pid)["CapBnd"], 16) == 0, f"{container}: bounding set not empty"
    for worker in children(pod.pid(BROKER)):
        assert_confined(worker, BROKER_UID, 2)
    touch = podman("exec", BROKER, "touch", "/opt/keysealer/x", check=False)
    assert touch.returncode != 0 and "Read-only file system" in touch.stderr, touch.stderr


def test_broker_runs_under_the_manifests_seccomp_profile(pod: Pod) -> None:
    """The OCI spec runc was given holds the profile of deploy/kubernetes/seccomp, not podman's default."""
    spec_path = Path(inspect(BROKER, "{{.StaticDir}}")) / "config.json"
    seccomp = json.loads(spec_path.read_text())["linux"]["seccomp"]
    profile = json.loads((KUBERNETES / "seccomp" / "keysealer-broker.json").read_text())
    assert seccomp["defaultAction"] == profile["defaultAction"]
    allowed = {name for rule in seccomp["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" for name in rule["names"]}
    wanted = {name for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" for name in rule["names"]}
    assert allowed == wanted
    frontend = json.loads((Path(inspect(FRONTEND, "{{.StaticDir}}")) / "config.json").read_text())
    assert frontend["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"  # RuntimeDefault


def test_kms_calls_through_the_pods_host_socket(pod: Pod) -> None:
    status = pod.status()
    assert status.healthz == "ok" and status.version == "v2"
    seed = os.urandom(32)
    encrypted = pod.encrypt(seed)
    assert pod.decrypt(encrypted) == seed
    tampered = api_pb2.EncryptResponse(ciphertext=bytes([encrypted.ciphertext[0] ^ 1]) + encrypted.ciphertext[1:],
                                       key_id=encrypted.key_id, annotations=encrypted.annotations)
    with pytest.raises(grpc.RpcError) as refused:
        pod.decrypt(tampered)
    assert refused.value.code() != grpc.StatusCode.OK


def manifest_probe(kind: str) -> list[str]:
    pod = yaml.safe_load((KUBERNETES / "keysealer.yaml").read_text())
    frontend = next(c for c in pod["spec"]["containers"] if c["name"] == "frontend")
    command: list[str] = frontend[kind]["exec"]["command"]
    return command


@pytest.mark.parametrize("kind", ["readinessProbe", "livenessProbe"])
def test_manifest_probes_pass_when_run_as_the_kubelet_runs_them(pod: Pod, kind: str) -> None:
    cp = podman("exec", FRONTEND, *manifest_probe(kind), check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_rotation_in_the_broker_container_is_picked_up(pod: Pod) -> None:
    before = pod.encrypt(b"sealed before the rotation")
    cp = podman("exec", BROKER, "keysealer", "keys", "rotate", "--config", "/etc/keysealer/broker/broker.yaml")
    new_key = created_key_id(cp.stdout)
    pod.wait_for_status_key(new_key)
    assert pod.encrypt(b"sealed after").key_id == new_key
    assert pod.decrypt(before) == b"sealed before the rotation"


def kill_under_load(client: KmsClient, kill: Callable[[], object], restarted: Callable[[], bool]) -> None:
    """Kills the broker while callers Encrypt and Decrypt, waits for its restart and for calls to flow again,
    then checks the ledger: every Encrypt that returned OK decrypts, no call outlived its deadline."""
    load = Load(client, callers=4, timeout=DEADLINE)
    time.sleep(1.0)
    kill()
    deadline = time.monotonic() + 60
    while not restarted():
        assert time.monotonic() < deadline, "the killed broker was not restarted"
        time.sleep(0.2)
    client.wait_healthy(timeout=60)
    recovered = len(load.ledger)
    deadline = time.monotonic() + 30
    while len(load.ledger) < recovered + 20:
        assert time.monotonic() < deadline, "calls did not recover after the broker's restart"
        time.sleep(0.1)
    load.check(DEADLINE)


def test_killed_broker_is_restarted_by_the_pod_and_calls_recover(pod: Pod) -> None:
    pid = pod.pid(BROKER)
    restarts = int(inspect(BROKER, "{{.RestartCount}}"))
    kill_under_load(pod, lambda: os.kill(pid, signal.SIGKILL),
                    lambda: int(inspect(BROKER, "{{.RestartCount}}")) > restarts
                    and inspect(BROKER, "{{.State.Running}}") == "true")
    assert pod.pid(BROKER) != pid
    assert_confined(pod.pid(BROKER), BROKER_UID, 2)


def test_the_pod_serves_the_token_the_node_prepared(pod: Pod) -> None:
    assert pod.node.key_id in pod.node.keys("list")



# ---- bad input ----------------------------------------------------------------------------------------

BUILD = DEPLOY / "container" / "build.sh"


def one_line_error(cp: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    assert cp.returncode == code, (cp.returncode, cp.stderr)
    assert len(cp.stderr.strip().splitlines()) == 1 and words in cp.stderr, cp.stderr


def test_build_without_podman_says_so(tmp_path: Path) -> None:
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("dirname", "sed"):  # what build.sh runs before looking for podman
        (tools / tool).symlink_to(shutil.which(tool) or tool)
    cp = subprocess.run(["/bin/bash", str(BUILD)], env={"PATH": str(tools)}, capture_output=True, text=True,
                        timeout=30, check=False)
    one_line_error(cp, 2, "podman is not installed")


def test_build_with_a_missing_base_says_so() -> None:
    require_podman()
    cp = run([str(BUILD), "--base", f"{TEST_PREFIX}no-such-base:1"], check=False)
    one_line_error(cp, 2, f"base image '{TEST_PREFIX}no-such-base:1' is not in podman's storage")


def test_kube_play_of_a_missing_manifest_says_so(tmp_path: Path) -> None:
    require_podman()
    cp = podman("kube", "play", str(tmp_path / "keysealer.yaml"), check=False)
    one_line_error(cp, 125, "no such file or directory")

# ---- the systemd pair, booted ---------------------------------------------------------------------------
#
# A Debian bookworm container with systemd 252 as PID 1 (tests/systemd_node/Containerfile on the base
# build.sh made), KeySealer installed as docs/install.md's systemd section says (tests/systemd_node/
# install.sh: sysusers, tmpfiles, configuration.md's example configs, PIN, CURVE keys, token, the units
# from deploy/systemd unchanged). What the container changes, and why:
#   - --privileged: PID 1 of a node has every capability; without CAP_SYS_ADMIN systemd cannot set up the
#     units' namespaces (PrivateNetwork=, PrivateIPC= are ignored, PrivateUsers= fails the frontend with
#     216/GROUP, LoadCredential= falls back to a plain /run file).
#   - `mount --make-rshared /` before the units start: systemd makes / shared at boot only when the kernel
#     started it, not in a container; without it the credential systemd mounts for LoadCredential= never
#     reaches the service (an empty /run/credentials/keysealer-broker.service, the workers cannot read
#     the PIN).
SYSTEMD_NODE = "ks-shapes-systemd-node"  # the container; its image is TEST_PREFIX + this
NODE_FILES = Path(__file__).with_name("systemd_node")
UNITS = ("keysealer-broker.service", "keysealer-frontend.service")


def example_config(heading: str) -> str:
    """The YAML example of docs/configuration.md that starts with `heading` (the configs install.md uses)."""
    doc = (DEPLOY.parent / "docs" / "configuration.md").read_text()
    return next(block for block in re.findall(r"```yaml\n(.*?)```", doc, re.S) if block.startswith(heading))


class SystemdNode(KmsClient):
    def __init__(self, container: str) -> None:
        self.container = container
        super().__init__(Path(f"/proc/{inspect(container, '{{.State.Pid}}')}/root/run/keysealer/kms.sock"))

    def sh(self, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.container, "sh", "-c", command, check=check)

    def main_pid(self, unit: str) -> int:
        return int(self.sh(f"systemctl show -p MainPID --value {unit}").stdout)

    def status_of(self, pid: int) -> dict[str, str]:
        text = self.sh(f"cat /proc/{pid}/status").stdout
        return {key: value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}

    def describe(self) -> str:
        return self.sh("journalctl --no-pager -n 60 -u keysealer-broker -u keysealer-frontend", check=False).stdout


@pytest.fixture(scope="module")
def systemd_node(images: dict[str, str]) -> Iterator[SystemdNode]:
    image = f"{TEST_PREFIX}{SYSTEMD_NODE}:latest"
    podman("build", "--quiet", "--layers=false", "--network", "host", "--build-arg", f"BASE={images['base']}",
           "-f", str(NODE_FILES / "Containerfile"), "-t", image, str(DEPLOY.parent), timeout=900)
    podman("run", "--detach", "--name", SYSTEMD_NODE, "--systemd=always", "--privileged", "--network", "none", image)
    try:
        deadline = time.monotonic() + 60
        state = ""
        while state not in ("running", "degraded"):  # "" until PID 1 answers on its bus
            assert time.monotonic() < deadline, f"systemd did not finish booting: {state!r}"
            time.sleep(0.5)
            state = podman("exec", SYSTEMD_NODE, "systemctl", "is-system-running", "--wait", check=False).stdout.strip()
        node = SystemdNode(SYSTEMD_NODE)
        node.sh("mount --make-rshared /")
        print("\nsystemd node: --privileged and / made rshared (see the comment above SYSTEMD_NODE)")
        node.sh("mkdir -p /etc/keysealer")
        with tempfile.TemporaryDirectory() as scratch:
            for name, heading in (("broker.yaml", "token:"), ("frontend.yaml", "kms_v1beta1:")):
                (Path(scratch) / name).write_text(example_config(heading))
                podman("cp", str(Path(scratch) / name), f"{SYSTEMD_NODE}:/etc/keysealer/{name}")
        podman("cp", str(NODE_FILES / "install.sh"), f"{SYSTEMD_NODE}:/src/install.sh")
        node.sh("/src/install.sh")
        node.wait_healthy(timeout=60)
        ignored = node.sh("journalctl --no-pager -b -u keysealer-broker -u keysealer-frontend "
                          "| grep -iE 'is configured, but|ignoring' || true").stdout
        print("hardening not in force in this container:", ignored or "none reported by systemd")
        yield node
        node.close()
    finally:
        podman("rm", "--force", SYSTEMD_NODE, check=False)


def test_systemd_units_run_as_their_users_confined(systemd_node: SystemdNode) -> None:
    uids = {}
    for unit, user in zip(UNITS, ("keysealer-hsm", "keysealer-kms"), strict=True):
        uid = systemd_node.sh(f"id -u {user}").stdout.strip()
        pid = systemd_node.main_pid(unit)
        pids = [pid, *map(int, systemd_node.sh(f"cat /proc/{pid}/task/*/children").stdout.split())]
        for process in pids:
            status = systemd_node.status_of(process)
            assert status["Uid"].split() == [uid] * 4, (unit, status["Uid"])
            assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1", (unit, status)
            assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0, (unit, status)
        uids[unit] = uid
    assert len(set(uids.values())) == 2, uids


def test_systemd_filesystem_protections_are_in_force(systemd_node: SystemdNode) -> None:
    broker, frontend = (systemd_node.main_pid(unit) for unit in UNITS)
    # In the broker's mount namespace even root writes only to its state and runtime directories.
    for path in ("/etc/keysealer/probe", "/opt/keysealer/probe", "/var/lib/keysealer/probe", "/usr/probe"):
        cp = systemd_node.sh(f"nsenter -t {broker} -m touch {path}", check=False)
        assert cp.returncode != 0 and "Read-only file system" in cp.stderr, (path, cp.stderr)
    for directory in ("/var/lib/keysealer/tokens", "/run/keysealer-broker"):
        systemd_node.sh(f"nsenter -t {broker} -m sh -c 'touch {directory}/.probe && rm {directory}/.probe'")
    # The frontend sees neither the PIN nor the token directory: inaccessible nodes where they are.
    assert systemd_node.sh("stat -c '%a %s' /etc/keysealer/pin").stdout.split() == ["400", "33"]
    assert systemd_node.sh(f"nsenter -t {frontend} -m stat -c '%a %s' /etc/keysealer/pin").stdout.split() == ["0", "0"]
    assert systemd_node.sh("ls -A /var/lib/keysealer").stdout.split() == ["tokens"]
    assert systemd_node.sh(f"nsenter -t {frontend} -m ls -A /var/lib/keysealer", check=False).stdout.split() == []
    # And the broker never sees the PIN file itself, only its credential.
    assert systemd_node.sh(f"nsenter -t {broker} -m stat -c '%a %s' /etc/keysealer/pin").stdout.split() == ["0", "0"]


def test_systemd_kms_socket_and_calls(systemd_node: SystemdNode) -> None:
    owner = systemd_node.sh("stat -c '%U %G %a %F' /run/keysealer/kms.sock").stdout.split()
    assert owner == ["keysealer-kms", "keysealer-api", "660", "socket"], owner
    assert systemd_node.status().healthz == "ok"
    seed = os.urandom(32)
    assert systemd_node.decrypt(systemd_node.encrypt(seed)) == seed


def test_systemd_reload_makes_a_rotation_take_effect(systemd_node: SystemdNode) -> None:
    before = systemd_node.encrypt(b"sealed before the rotation")
    cp = systemd_node.sh("runuser -u keysealer-hsm -- /opt/keysealer/bin/keysealer keys rotate "
                         "--config /etc/keysealer/broker.yaml")
    new_key = created_key_id(cp.stdout)
    systemd_node.sh("systemctl reload keysealer-broker")
    systemd_node.wait_for_status_key(new_key)
    assert systemd_node.encrypt(b"after").key_id == new_key
    assert systemd_node.decrypt(before) == b"sealed before the rotation"


def test_systemd_restarts_a_killed_broker_and_calls_recover(systemd_node: SystemdNode) -> None:
    pid = systemd_node.main_pid(UNITS[0])
    kill_under_load(systemd_node, lambda: systemd_node.sh("systemctl kill -s KILL keysealer-broker"),
                    lambda: systemd_node.main_pid(UNITS[0]) not in (0, pid))


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_running_units_score_as_offline_or_better(systemd_node: SystemdNode, unit: str) -> None:
    online = exposure(systemd_node.sh(f"systemd-analyze security --no-pager {unit}"), unit)
    offline = exposure(run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                            str(DEPLOY / "systemd" / unit)]), unit)
    print(f"\nEXPOSURE {unit}: running {online}, offline {offline}")
    assert online <= offline
