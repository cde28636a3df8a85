"""Helpers for tests/test_deployment_shapes.py: podman, the images build.sh makes, the kernel's view of a process.

Everything these tests create in podman's (machine-global) storage is named with TEST_PREFIX and removed
at the end of the session.
"""

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TEST_PREFIX = "localhost/ks-shapes-"


def run(cmd: list[str], timeout: float = 120, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    """Runs cmd; on failure the assertion shows its output."""
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload]
    if check:
        assert cp.returncode == 0, f"{' '.join(cmd)} exited {cp.returncode}\n{cp.stdout}\n{cp.stderr}"
    return cp  # type: ignore[no-any-return]


def require_podman() -> None:
    """Fails (never skips) without root or podman: CI installs podman (deploy/packages/containers.txt)."""
    assert os.geteuid() == 0, "the deployment-shape tests need root (podman as root, debootstrap, chown)"
    assert shutil.which("podman"), "podman is missing: apt-get install podman (deploy/packages/containers.txt)"
    run([str(DEPLOY / "container" / "podman-setup.sh")])


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["podman", *args], timeout=timeout, check=check)


def inspect(container: str, template: str) -> str:
    return podman("inspect", "--format", template, container).stdout.strip()


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as read from the host: the kernel's word on uid, capabilities, seccomp."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def assert_confined(pid: int, uid: int, min_filters: int) -> dict[str, str]:
    """The process runs as uid (real, effective, saved, fs), with no capability, no_new_privs and seccomp."""
    status = proc_status(pid)
    assert status["Uid"].split() == [str(uid)] * 4, status["Uid"]
    for capabilities in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert int(status[capabilities], 16) == 0, f"{capabilities} {status[capabilities]}"
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2", "seccomp filter mode"
    assert int(status["Seccomp_filters"]) >= min_filters, status["Seccomp_filters"]
    return status


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        path = task / "children"
        if path.exists():
            found += [int(p) for p in path.read_text().split()]
    return found


def root_mount_options(pid: int) -> list[str]:
    """The mount options of the process's root directory (mountinfo field 6)."""
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            return fields[5].split(",")
    raise AssertionError(f"no root mount for {pid}")


@pytest.fixture(scope="session")
def images() -> Iterator[dict[str, str]]:
    """Both images, built once per session by deploy/container/build.sh (with its Debian base); removed after."""
    require_podman()
    built = {"base": f"{TEST_PREFIX}keysealer-base:bookworm"}
    try:
        cp = run([str(DEPLOY / "container" / "build.sh"), "--prefix", TEST_PREFIX], timeout=1800)
        names = cp.stdout.split()
        assert len(names) == 2 and all(re.fullmatch(rf"{TEST_PREFIX}keysealer(-softhsm)?:\S+", n) for n in names)
        built |= {"runtime": names[0], "softhsm": names[1]}
        yield built
    finally:
        leftover = [name for name in podman("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
                    if name.startswith(TEST_PREFIX)]
        if leftover:
            podman("rmi", "--force", *leftover, check=False)
