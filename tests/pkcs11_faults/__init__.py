"""Fault injection for PKCS #11: builds pkcs11_faults.c (a module that forwards to a real one and fails
chosen calls on cue) and writes its cues.

    so = build()                                   # compiled once, cached; rebuilt when the .c changes
    faults = FaultControl(tmp / "faults")          # the control file (created empty: no faults)
    env = faults.module_env(SOFTHSM)               # PKCS11_FAULTS_MODULE / _CONTROL for the module
    faults.set("C_Decrypt", "CKR_DEVICE_ERROR", count=2)
    faults.set("C_EncryptInit", "CKR_DEVICE_ERROR", sticky_operation=True)
    faults.set("*", "CKR_DEVICE_REMOVED", always=True)
    faults.delay(5)                                # +5 ms on every crypto call
    faults.fired("C_Decrypt")                      # how many times C_Decrypt cues fired, all processes
    faults.clear()

For the broker of a tests/harness.py Plugin:  faults = install(plugin, plugin.layout.root / "faults")
(before plugin.start()): the broker then loads the wrapper in front of its SoftHSM module.

The cue language and the exact semantics are described at the top of pkcs11_faults.c.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import itertools
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().with_name("pkcs11_faults.c")
HEADER_DIRS = (Path("/usr/include/p11-kit-1"),)
CFLAGS = ("-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-fvisibility=hidden")
LIBS = ("-ldl", "-lpthread")
PACKAGES_HINT = "install the Debian packages in deploy/packages/faults.txt (gcc, libc6-dev, libp11-kit-dev)"


def _table(pattern: str) -> frozenset[str]:
    return frozenset(re.findall(pattern, SOURCE.read_text(), re.MULTILINE))


# The names the wrapper understands, read from its own tables.
FUNCTIONS: frozenset[str] = _table(r"^\s*FN\((C_\w+),")
RETURN_VALUES: frozenset[str] = _table(r"\bRV\((CKR_\w+)\)")


class BuildError(RuntimeError):
    """gcc or the PKCS #11 header is missing, or the source does not compile."""


def default_cache_dir() -> Path:
    configured = os.environ.get("PKCS11_FAULTS_CACHE")
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"keysealer-pkcs11-faults-{os.getuid()}"


def _own_dir(path: Path) -> Path:
    """path, created if needed, if it is ours and not writable by others; else a fresh private dir."""
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    st = path.lstat()
    if path.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o022:
        return Path(tempfile.mkdtemp(prefix="keysealer-pkcs11-faults-"))
    return path


@functools.cache
def build(source: Path = SOURCE, cache_dir: Path | None = None) -> Path:
    """The compiled wrapper's path: built into the cache dir under a name derived from the source's content
    and the flags, so a changed .c is rebuilt and an unchanged one is compiled once per machine."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise BuildError(f"no C compiler: {PACKAGES_HINT}")
    include = [d for d in HEADER_DIRS if (d / "p11-kit" / "pkcs11.h").is_file()]
    if not include:
        raise BuildError(f"no <p11-kit/pkcs11.h> in {', '.join(map(str, HEADER_DIRS))}: {PACKAGES_HINT}")
    text = source.read_bytes()
    digest = hashlib.sha256(text + "\0".join((*CFLAGS, *LIBS, gcc)).encode()).hexdigest()[:16]
    cache = _own_dir(cache_dir or default_cache_dir())
    target = cache / f"pkcs11_faults-{digest}.so"
    with (cache / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test sessions build once
        if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
            return target
        partial = cache / f".{target.name}.{os.getpid()}"
        argv = [gcc, *CFLAGS, *(f"-I{d}" for d in include), "-o", str(partial), str(source), *LIBS]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise BuildError(f"{' '.join(argv)} failed:\n{result.stderr}")
        os.replace(partial, target)
        for stale in cache.glob("pkcs11_faults-*.so"):  # builds of older sources (mapped copies live on)
            if stale != target:
                stale.unlink(missing_ok=True)
    return target


@dataclass(frozen=True)
class CueCount:
    line: int
    cue: str
    matched: int  # calls the cue's function made since the control file was written
    fired: int  # of which the cue answered


_ids = itertools.count(time.time_ns() // 1000)


class FaultControl:
    """The control file of the wrapper. Every write replaces it atomically (with a strictly later mtime:
    each process notices on its next call). Counts belong to a cue: one kept while others are added or
    removed keeps its counts; each cue set() or add() writes is new (a unique id=) and starts from zero."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.state_path = Path(f"{self.path}.state")
        if not self.path.exists():
            self._write([])
        # Worker processes may run as another user: they must be able to count.
        fd = os.open(self.state_path, os.O_RDWR | os.O_CREAT, 0o666)
        os.close(fd)
        os.chmod(self.state_path, 0o666)

    def module_env(self, real_module: Path | str, debug: bool = False,
                   cryptoki_version: str | None = None) -> dict[str, str]:
        """What the wrapper needs in the environment of the process that loads it; cryptoki_version
        ("3.0") is what C_GetInfo then reports instead of the real module's version."""
        env = {"PKCS11_FAULTS_MODULE": str(real_module), "PKCS11_FAULTS_CONTROL": str(self.path)}
        if debug:
            env["PKCS11_FAULTS_DEBUG"] = "1"
        if cryptoki_version:
            env["PKCS11_FAULTS_CRYPTOKI_VERSION"] = cryptoki_version
        return env

    # -- cues -----------------------------------------------------------------------------------------------

    @staticmethod
    def cue(function: str, rv: str | int | None = None, *, count: int | None = None, always: bool = False,
            after: int = 0, delay_ms: int = 0, sticky_operation: bool = False,
            reinit_required: bool = False) -> str:
        """One control-file line. rv None: forward (with the delay/flags). Injecting cues default to once,
        forwarding ones to always."""
        if function != "*" and function not in FUNCTIONS:
            raise ValueError(f"unknown PKCS #11 function {function!r}")
        tokens = [function]
        if isinstance(rv, str):
            if rv not in RETURN_VALUES:
                raise ValueError(f"unknown return value {rv!r}")
            tokens.append(rv)
        elif isinstance(rv, int):
            tokens.append(hex(rv))
        if always and count is not None:
            raise ValueError("count and always exclude each other")
        if always:
            tokens.append("always")
        elif count is not None:
            tokens.append(f"count={int(count)}")
        if after:
            tokens.append(f"after={int(after)}")
        if delay_ms:
            tokens.append(f"delay_ms={int(delay_ms)}")
        if sticky_operation:
            tokens.append("sticky_operation")
        if reinit_required:
            tokens.append("reinit_required")
        tokens.append(f"id={next(_ids)}")  # a new cue, new counts (however alike an earlier one)
        return " ".join(tokens)

    def set(self, function: str, rv: str | int | None = None, **options: Any) -> int:
        """Replace the cues on `function` with this one (the others keep their counts); its line number."""
        line = self.cue(function, rv, **options)
        kept = [x for x in self.lines() if x.split()[:1] != [function]]
        self._write([*kept, line])
        return len(kept) + 1

    def add(self, function: str, rv: str | int | None = None, **options: Any) -> int:
        """Append a cue (cues are tried in file order); the line number it got."""
        lines = self.lines()
        self._write([*lines, self.cue(function, rv, **options)])
        return len(lines) + 1

    def delay(self, ms: int) -> None:
        """ms of latency before every crypto call (0: none)."""
        kept = [x for x in self.lines() if not x.startswith("delay_ms=")]
        self._write(([f"delay_ms={int(ms)}"] if ms else []) + kept)

    def clear(self) -> None:
        """No cue, no delay: the wrapper only forwards. (Processes in reinit_required stay so.)"""
        self._write([])

    def write(self, lines: list[str]) -> None:
        """Raw control-file lines (for cues the helpers do not spell)."""
        self._write(lines)

    def lines(self) -> list[str]:
        if not self.path.exists():
            return []
        return [x.strip() for x in self.path.read_text().splitlines() if x.strip()]

    def _write(self, lines: list[str]) -> None:
        old = self.path.stat().st_mtime_ns if self.path.exists() else 0
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        partial.write_text("".join(f"{line}\n" for line in lines))
        os.chmod(partial, 0o644)
        stamp = max(time.time_ns(), old + 1000)  # strictly later: the wrapper compares mtimes
        os.utime(partial, ns=(stamp, stamp))
        os.replace(partial, self.path)

    # -- what happened --------------------------------------------------------------------------------------

    def counts(self) -> list[CueCount]:
        """Each cue of the control file with its counts over every process (zero until some call matched)."""
        try:
            state = self.state_path.read_text().splitlines()
        except OSError:
            state = []
        found: dict[str, tuple[int, int]] = {}
        for row in state:
            matched_text, fired_text, key = row.split(" ", 2)
            found[key] = (int(matched_text), int(fired_text))
        result = []
        seen: dict[str, int] = {}
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        for number, text in enumerate(lines, 1):
            cue = " ".join(text.split("#", 1)[0].split())
            if not cue or cue.startswith("delay_ms="):
                continue
            seen[cue] = seen.get(cue, 0) + 1
            key = cue if seen[cue] == 1 else f"{cue}#{seen[cue]}"  # as the wrapper names repeated lines
            matched, fired = found.get(key, (0, 0))
            result.append(CueCount(number, cue, matched, fired))
        return result

    def fired(self, function: str | None = None) -> int:
        """How many times cues (on `function`, or any) fired, summed over every process."""
        return sum(c.fired for c in self.counts() if function is None or c.cue.split()[0] == function)


def install(plugin: Any, control: Path | str, debug: bool = False,
            cryptoki_version: str | None = None) -> FaultControl:
    """Put the wrapper in front of the token module of a tests/harness.py Plugin (call before start()).
    The broker keeps its module_env (SOFTHSM2_CONF); the wrapper gets the real module's path."""
    config = plugin.broker_config()
    real = config["token"]["module"]
    if Path(real).name.startswith("pkcs11_faults"):
        real = config["token"]["module_env"]["PKCS11_FAULTS_MODULE"]
    faults = FaultControl(control)
    module_env = faults.module_env(real, debug, cryptoki_version)
    plugin.configure(broker={"token": {"module": str(build()), "module_env": module_env}})
    return faults
