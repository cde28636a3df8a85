#!/usr/bin/env python3
"""KeySealer soak: mixed Encrypt/Decrypt/Status at a fixed rate for a given time against the real KMS v2
Unix socket, optionally killing or freezing the broker on a schedule. Not a test: it prints figures.

    python benchmarks/soak.py --duration 60 --rate 100
    python benchmarks/soak.py --duration 300 --kill-broker-every 30 --freeze-broker-every 45 --freeze-for 5
    python benchmarks/soak.py --token-delay-ms 5            # a slower token (the pkcs11_faults wrapper)
    python benchmarks/soak.py --socket /run/keysealer/kms.sock --broker-pid 1234   # a running plugin

By default it starts its own plugin (SoftHSM token, broker and frontend as real processes, through
tests/harness.py) in a fresh state dir under /tmp, and after a broker kill starts the broker again after
--restart-delay seconds (what systemd's RestartSec=2s does). With --socket it restarts nothing: something
else (systemd, `keysealer dev`) must, and the broker's pid is looked up again after each kill.

Calls are sent open-loop at --rate per second (at most --max-in-flight at once; calls that would exceed it
are counted as CLIENT_OVERLOAD, not sent). Every Decrypt decrypts a ciphertext an earlier Encrypt of this
run returned and checks the plaintext (MISMATCH otherwise). At the end every Encrypt that returned OK is
decrypted again and compared: the ledger check.

Printed: calls and errors by gRPC code (overall and per operation), p50/p99/max latency, Status answers
that were not "ok", the disruptions with the time until the first successful call after each, and the
RSS of the frontend and of every broker process (supervisor and workers) at start, end and peak.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import grpc
from proc_info import child_pids, proc_status_kib, socket_owner  # a sibling module: run as python benchmarks/...

from keysealer.frontend.kmsv2 import api_pb2, api_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
SEED_BYTES = 32  # KMS v2 sends 32-byte seeds
CALL_TIMEOUT_SECONDS = 3.0  # the apiserver's default for KMS calls
READY_SECONDS = 60.0
RSS_SAMPLE_SECONDS = 2.0
LEDGER_CONCURRENCY = 16
DEFAULT_MIX = "encrypt=2,decrypt=2,status=1"
OPS = ("encrypt", "decrypt", "status")

Stub: TypeAlias = api_pb2_grpc.KeyManagementServiceStub


# ---------------------------------------------------------------------------------------------------------
# Processes



def cmdline(pid: int) -> list[str]:
    try:
        return [p.decode(errors="replace") for p in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if p]
    except OSError:
        return []


def is_broker(pid: int) -> bool:
    return any("keysealer.hsm_broker.main" in part or part.endswith("keysealer-broker") for part in cmdline(pid))


def find_broker(config: Path | None) -> int | None:
    """The broker supervisor (a broker process whose parent is not one), optionally the one of config."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or not is_broker(int(proc.name)):
            continue
        pid = int(proc.name)
        if is_broker(proc_status_kib(pid, "PPid") or 0):
            continue  # a worker
        if config is not None and str(config) not in cmdline(pid):
            continue
        found.append(pid)
    return found[0] if len(found) == 1 else None



@dataclass
class Memory:
    """RSS in KiB by role ('frontend', 'supervisor', 'worker <pid>')."""

    start: dict[str, int] = field(default_factory=dict)
    end: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)


class Target:
    """The plugin under load: its socket and, when known, its processes."""

    def __init__(self, socket: Path, frontend: int | None, broker: int | None, broker_config: Path | None,
                 plugin: Any = None) -> None:
        self.socket = socket
        self.frontend = frontend
        self.broker = broker
        self.broker_config = broker_config
        self.plugin = plugin  # a tests/harness.py Plugin when we started it
        self.faults: Any = None  # its pkcs11_faults.FaultControl, when the wrapper is in front of the token
        self.memory = Memory()

    def broker_pid(self) -> int | None:
        if self.plugin is not None:
            process = self.plugin.broker
            return process.pid if process is not None and process.poll() is None else None
        if self.broker is None or not is_broker(self.broker):
            self.broker = find_broker(self.broker_config)
        return self.broker

    def roles(self) -> list[tuple[str, int]]:
        found: list[tuple[str, int]] = []
        if self.frontend:
            found.append(("frontend", self.frontend))
        broker = self.broker_pid()
        if broker:
            found.append(("supervisor", broker))
            found += [(f"worker {pid}", pid) for pid in sorted(child_pids(broker))]
        return found

    def rss(self) -> dict[str, int]:
        return {role: kib for role, pid in self.roles() if (kib := proc_status_kib(pid, "VmRSS")) is not None}

    def sample(self) -> dict[str, int]:
        now = self.rss()
        for role, kib in now.items():
            self.memory.peak[role] = max(kib, self.memory.peak.get(role, 0))
        return now


def start_own_plugin(workers: int, token_delay_ms: int, cues: Sequence[str], wrapper: bool) -> Target:
    sys.path.insert(0, str(REPO / "tests"))
    from harness import Plugin, short_tmp_dir

    plugin = Plugin(short_tmp_dir())
    plugin.configure(broker={"workers": {"count": workers}})
    faults = None
    if wrapper:
        from pkcs11_faults import install

        faults = install(plugin, plugin.layout.root / "faults")
        faults.write(list(cues))
        if token_delay_ms:
            faults.delay(token_delay_ms)
    plugin.start()
    assert plugin.frontend is not None and plugin.broker is not None
    print(f"soak: own plugin in {plugin.layout.root} ({workers} workers"
          + (f", token delay {token_delay_ms} ms" if token_delay_ms else "")
          + (f", fault control {faults.path}" if faults else "") + ")", flush=True)
    target = Target(plugin.layout.kms_socket, plugin.frontend.pid, plugin.broker.pid, plugin.layout.broker_config,
                    plugin)
    target.faults = faults
    return target


async def cue_at(target: Target, at: float, line: str, start: float) -> None:
    """Add a pkcs11_faults cue `at` seconds into the run."""
    await asyncio.sleep(max(0.0, start + at - time.monotonic()))
    if line.strip() == "clear":
        target.faults.clear()
    else:
        target.faults.write([*target.faults.lines(), line])
    print(f"soak: +{time.monotonic() - start:.1f}s cue {line!r}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# Load


@dataclass
class Sealed:
    plaintext: bytes
    response: api_pb2.EncryptResponse

    def request(self) -> api_pb2.DecryptRequest:
        return api_pb2.DecryptRequest(ciphertext=self.response.ciphertext, key_id=self.response.key_id,
                                      uid="soak", annotations=self.response.annotations)


@dataclass
class Call:
    op: str
    started: float  # monotonic
    seconds: float
    outcome: str  # "OK" or the gRPC code's name, MISMATCH, CLIENT_OVERLOAD
    healthz: str = ""  # Status: what it answered


@dataclass
class Disruption:
    kind: str
    began: float  # monotonic
    ended: float = 0.0  # when the broker was back (restarted / continued)
    pids: list[int] = field(default_factory=list)
    recovered_after: float | None = None  # from `ended` to the first OK Encrypt/Decrypt started after it
    # Outcomes of the calls started from `began` to recovery, as "op outcome" (Status: its healthz too).
    during: dict[str, int] = field(default_factory=dict)


class Soak:
    def __init__(self, stub: Stub, mix: dict[str, int], timeout: float, max_in_flight: int) -> None:
        self.stub = stub
        self.pattern = [op for op, weight in mix.items() for _ in range(weight)]
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.calls: list[Call] = []
        self.ledger: list[Sealed] = []
        self.status_answers: Counter[str] = Counter()
        self.details: dict[str, Counter[str]] = {}  # "op CODE" -> the errors' detail texts
        self.random = random.Random(1)  # noqa: S311 - which ciphertext to decrypt, not a secret

    async def one(self, op: str) -> None:
        started = time.monotonic()
        outcome = "OK"
        healthz = ""
        try:
            if op == "encrypt" or (op == "decrypt" and not self.ledger):
                op = "encrypt"
                plaintext = os.urandom(SEED_BYTES)
                response = await self.stub.Encrypt(api_pb2.EncryptRequest(plaintext=plaintext, uid="soak"),
                                                   timeout=self.timeout)
                self.ledger.append(Sealed(plaintext, response))
            elif op == "decrypt":
                sealed = self.random.choice(self.ledger)
                answer = await self.stub.Decrypt(sealed.request(), timeout=self.timeout)
                if answer.plaintext != sealed.plaintext:
                    outcome = "MISMATCH"
            else:
                status = await self.stub.Status(api_pb2.StatusRequest(), timeout=self.timeout)
                self.status_answers[status.healthz] += 1
                healthz = status.healthz
        except grpc.aio.AioRpcError as exc:
            outcome = exc.code().name
            self.details.setdefault(f"{op} {outcome}", Counter())[str(exc.details())[:120]] += 1
        finally:
            self.in_flight -= 1
        self.calls.append(Call(op, started, time.monotonic() - started, outcome, healthz))

    async def run(self, rate: float, duration: float) -> None:
        tasks: set[asyncio.Task[None]] = set()
        began = time.monotonic()
        count = int(rate * duration)
        for i in range(count):
            delay = began + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            op = self.pattern[i % len(self.pattern)]
            if self.in_flight >= self.max_in_flight:
                self.calls.append(Call(op, time.monotonic(), 0.0, "CLIENT_OVERLOAD"))
                continue
            self.in_flight += 1
            task = asyncio.create_task(self.one(op))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)


async def check_ledger(stub: Stub, ledger: list[Sealed], timeout: float) -> Counter[str]:
    """Decrypt every sealed seed again and compare."""
    outcomes: Counter[str] = Counter()
    gate = asyncio.Semaphore(LEDGER_CONCURRENCY)

    async def check(sealed: Sealed) -> None:
        async with gate:
            for attempt in range(3):  # a call caught by the plugin's own hiccup is tried again
                try:
                    answer = await stub.Decrypt(sealed.request(), timeout=timeout)
                except grpc.aio.AioRpcError as exc:
                    if attempt == 2 or exc.code() not in {grpc.StatusCode.UNAVAILABLE,
                                                          grpc.StatusCode.DEADLINE_EXCEEDED}:
                        outcomes[exc.code().name] += 1
                        return
                    await asyncio.sleep(0.5)
                    continue
                outcomes["OK" if answer.plaintext == sealed.plaintext else "MISMATCH"] += 1
                return

    await asyncio.gather(*(check(s) for s in ledger))
    return outcomes


async def wait_healthy(stub: Stub, seconds: float = READY_SECONDS) -> float:
    """Seconds until Status says ok (raises if it never does)."""
    began = time.monotonic()
    last = "no answer"
    while time.monotonic() - began < seconds:
        try:
            status = await stub.Status(api_pb2.StatusRequest(), timeout=1.0)
            if status.healthz == "ok":
                return time.monotonic() - began
            last = status.healthz
        except grpc.aio.AioRpcError as exc:
            last = exc.code().name
        await asyncio.sleep(0.1)
    raise SystemExit(f"soak: plugin not healthy after {seconds:.0f}s: {last}")


# ---------------------------------------------------------------------------------------------------------
# Disruptions


class Disruptor:
    def __init__(self, target: Target, restart_delay: float) -> None:
        self.target = target
        self.restart_delay = restart_delay
        self.events: list[Disruption] = []
        self.frozen: list[int] = []
        self._lock = asyncio.Lock()

    async def kill_every(self, period: float, until: float) -> None:
        while time.monotonic() + period < until:
            await asyncio.sleep(period)
            async with self._lock:
                await self.kill()

    async def kill(self) -> None:
        pid = self.target.broker_pid()
        if pid is None:
            print("soak: no broker to kill", flush=True)
            return
        event = Disruption("kill", time.monotonic(), pids=[pid, *child_pids(pid)])
        self.events.append(event)
        os.kill(pid, signal.SIGKILL)  # its workers follow (PR_SET_PDEATHSIG)
        plugin = self.target.plugin
        if plugin is not None:
            await asyncio.to_thread(plugin.broker.wait)
            await asyncio.sleep(self.restart_delay)
            plugin.start_broker()
            self.target.broker = plugin.broker.pid
        else:  # someone else restarts it
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                new = self.target.broker_pid()
                if new is not None and new != pid:
                    break
        event.ended = time.monotonic()

    async def freeze_every(self, period: float, hold: float, until: float) -> None:
        while time.monotonic() + period < until:
            await asyncio.sleep(period)
            async with self._lock:
                pid = self.target.broker_pid()
                if pid is None:
                    continue
                event = Disruption("freeze", time.monotonic(), pids=[pid, *child_pids(pid)])
                self.events.append(event)
                self.frozen = list(event.pids)
                for frozen in self.frozen:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(frozen, signal.SIGSTOP)
                await asyncio.sleep(hold)
                self.thaw()
                event.ended = time.monotonic()

    def thaw(self) -> None:
        for pid in self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.frozen = []


def recovery(events: list[Disruption], calls: list[Call]) -> None:
    ok = sorted((c.started + c.seconds, c.started) for c in calls
                if c.outcome == "OK" and c.op in {"encrypt", "decrypt"})
    for event in events:
        if not event.ended:
            continue
        after = [done for done, started in ok if started >= event.ended]
        event.recovered_after = min(after) - event.ended if after else None
        until = event.ended + (event.recovered_after or 0.0)
        event.during = dict(Counter(f"{c.op} {c.outcome}" + (f" ({c.healthz})" if c.healthz else "")
                                    for c in calls if event.began <= c.started <= until).most_common())


async def sample_memory(target: Target, until: float) -> None:
    while time.monotonic() < until:
        await asyncio.sleep(RSS_SAMPLE_SECONDS)
        target.sample()


# ---------------------------------------------------------------------------------------------------------
# Report


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100.0 * (len(ordered) - 1)))]


def summarize(calls: list[Call]) -> dict[str, Any]:
    sent = [c for c in calls if c.outcome != "CLIENT_OVERLOAD"]
    latencies = [c.seconds * 1000 for c in sent]
    return {
        "calls": len(calls),
        "ok": sum(c.outcome == "OK" for c in calls),
        "outcomes": dict(Counter(c.outcome for c in calls).most_common()),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies, default=0.0),
    }


def mib(kib: int | None) -> str:
    return f"{kib / 1024:7.1f}" if kib is not None else "      -"


def report(args: argparse.Namespace, soak: Soak, *, elapsed: float, events: list[Disruption], memory: Memory,
           ledger: Counter[str], start: float) -> dict[str, Any]:
    overall = summarize(soak.calls)
    by_op = {op: summarize([c for c in soak.calls if c.op == op]) for op in OPS}
    load = os.getloadavg()
    print(f"\nsoak: {overall['calls']} calls in {elapsed:.1f}s ({overall['calls'] / elapsed:.1f}/s, target "
          f"{args.rate:g}/s), {overall['ok']} OK; machine load average {load[0]:.1f} (1 min) on "
          f"{os.cpu_count()} cores: other processes skew the latencies")
    print(f"  {'op':10}{'calls':>8}{'ok':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}  errors")
    for op, row in [*by_op.items(), ("all", overall)]:
        errors = {k: v for k, v in row["outcomes"].items() if k != "OK"}
        print(f"  {op:10}{row['calls']:8}{row['ok']:8}{row['p50_ms']:9.2f}{row['p99_ms']:9.2f}"
              f"{row['max_ms']:9.1f}  {errors or '-'}")
    for key, texts in sorted(soak.details.items()):
        print(f"  {key}: " + "; ".join(f"{n} x {text!r}" for text, n in texts.most_common(3)))
    not_ok = {k: v for k, v in soak.status_answers.items() if k != "ok"}
    print(f"  Status answers: {dict(soak.status_answers)}" + (f" (not ok: {sum(not_ok.values())})" if not_ok else ""))
    for event in events:
        recovered = f"{event.recovered_after:.2f}s" if event.recovered_after is not None else "never"
        print(f"  {event.kind} at +{event.began - start:.1f}s of pids {event.pids}: broker back "
              f"{event.ended - event.began:.2f}s later, first OK call {recovered} after that")
        print(f"    calls started until then: {event.during}")
    print(f"  RSS MiB   {'start':>7} {'end':>7} {'peak':>7}")
    for role in dict.fromkeys([*memory.start, *memory.end]):
        print(f"  {role:15}{mib(memory.start.get(role))} {mib(memory.end.get(role))} {mib(memory.peak.get(role))}")
    total = sum(ledger.values())
    print(f"  ledger: {total} sealed seeds decrypted again: {dict(ledger)}"
          + ("" if ledger.get("OK", 0) == total else "  <-- NOT ALL OK"))
    return {"args": vars(args), "elapsed": elapsed, "overall": overall, "by_op": by_op,
            "status": dict(soak.status_answers), "error_details": {k: dict(v) for k, v in soak.details.items()},
            "disruptions": [asdict(e) for e in events],
            "memory_kib": asdict(memory), "ledger": dict(ledger), "timeline": timeline(soak.calls, start)}


def print_faults(target: Target) -> None:
    if target.faults is not None:
        for count in target.faults.counts():
            print(f"  cue {count.cue!r}: matched {count.matched} calls, fired {count.fired} times")


def timeline(calls: list[Call], start: float) -> list[dict[str, int]]:
    """Outcomes by second of the run (by when each call was started)."""
    seconds: list[Counter[str]] = []
    for call in calls:
        index = max(0, int(call.started - start))
        while len(seconds) <= index:
            seconds.append(Counter())
        seconds[index][f"{call.op} {call.outcome}"] += 1
    return [dict(second) for second in seconds]


# ---------------------------------------------------------------------------------------------------------
# Main


def parse_mix(text: str) -> dict[str, int]:
    mix: dict[str, int] = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in OPS or not weight.strip().isdigit():
            raise argparse.ArgumentTypeError(f"bad mix part {part!r}: use e.g. {DEFAULT_MIX}")
        mix[name.strip()] = int(weight)
    if not any(mix.values()):
        raise argparse.ArgumentTypeError("the mix has no call")
    return mix


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--rate", type=float, default=100.0, help="calls per second (default 100)")
    parser.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX),
                        help=f"relative weights (default {DEFAULT_MIX})")
    parser.add_argument("--max-in-flight", type=int, default=64, help="calls outstanding at once (default 64)")
    parser.add_argument("--timeout", type=float, default=CALL_TIMEOUT_SECONDS, help="per-call deadline, s")
    parser.add_argument("--kill-broker-every", type=float, metavar="S", help="SIGKILL the broker every S seconds")
    parser.add_argument("--restart-delay", type=float, default=2.0,
                        help="own plugin: seconds before the killed broker is started again (systemd: 2)")
    parser.add_argument("--freeze-broker-every", type=float, metavar="S",
                        help="SIGSTOP the broker (supervisor and workers) every S seconds")
    parser.add_argument("--freeze-for", type=float, default=5.0, metavar="S", help="SIGCONT after S seconds")
    parser.add_argument("--socket", type=Path, help="target a running plugin's KMS socket instead of our own")
    parser.add_argument("--frontend-pid", type=int, help="with --socket (default: the socket's owner)")
    parser.add_argument("--broker-pid", type=int, help="with --socket (default: looked up in /proc)")
    parser.add_argument("--broker-config", type=Path, help="with --socket: tells the broker apart in /proc")
    parser.add_argument("--workers", type=int, default=2, help="own plugin: broker workers (default 2)")
    parser.add_argument("--token-delay-ms", type=int, default=0,
                        help="own plugin: put the pkcs11_faults wrapper in front of SoftHSM with this delay "
                        "on every crypto call")
    parser.add_argument("--fault-cue", action="append", default=[], metavar="LINE",
                        help="own plugin: a pkcs11_faults control line (see tests/pkcs11_faults/pkcs11_faults.c) "
                        "set before the plugin starts")
    parser.add_argument("--fault-at", action="append", default=[], nargs=2, metavar=("S", "LINE"),
                        help="own plugin: add this control line S seconds into the run, e.g. "
                        "--fault-at 10 'C_Decrypt CKR_DEVICE_ERROR count=20'; a line 'clear' removes every cue")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="own plugin: keep its state dir")
    args = parser.parse_args(argv)
    if args.socket is None and (args.frontend_pid or args.broker_pid or args.broker_config):
        parser.error("--frontend-pid/--broker-pid/--broker-config go with --socket")
    if args.socket is not None and (args.token_delay_ms or args.fault_cue or args.fault_at):
        parser.error("--token-delay-ms/--fault-cue/--fault-at need our own plugin (no --socket)")
    for at, _ in args.fault_at:
        try:
            float(at)
        except ValueError:
            parser.error(f"--fault-at: {at!r} is not a number of seconds")
    return args


async def soak_main(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(f"unix:{target.socket}") as channel:
        stub = Stub(channel)
        await wait_healthy(stub)
        target.memory.start = target.sample()
        soak = Soak(stub, args.mix, args.timeout, args.max_in_flight)
        disruptor = Disruptor(target, args.restart_delay)
        start = time.monotonic()
        until = start + args.duration
        side: list[asyncio.Task[None]] = [asyncio.create_task(sample_memory(target, until))]
        if args.kill_broker_every:
            side.append(asyncio.create_task(disruptor.kill_every(args.kill_broker_every, until)))
        for at, line in args.fault_at:
            side.append(asyncio.create_task(cue_at(target, float(at), line, start)))
        if args.freeze_broker_every:
            side.append(asyncio.create_task(
                disruptor.freeze_every(args.freeze_broker_every, args.freeze_for, until)))
        try:
            await soak.run(args.rate, args.duration)
            elapsed = time.monotonic() - start
            await asyncio.gather(*side)
        finally:
            for task in side:
                task.cancel()
            disruptor.thaw()
        target.memory.end = target.sample()
        recovery(disruptor.events, soak.calls)
        healthy_after = await wait_healthy(stub)
        if healthy_after > 0.5:
            print(f"soak: plugin healthy again {healthy_after:.1f}s after the load", flush=True)
        ledger = await check_ledger(stub, soak.ledger, args.timeout)
        print_faults(target)
        return report(args, soak, elapsed=elapsed, events=disruptor.events, memory=target.memory, ledger=ledger,
                      start=start)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.socket is None:
        wrapper = bool(args.token_delay_ms or args.fault_cue or args.fault_at)
        target = start_own_plugin(args.workers, args.token_delay_ms, args.fault_cue, wrapper)
    else:
        frontend = args.frontend_pid or socket_owner(args.socket)
        broker = args.broker_pid or find_broker(args.broker_config)
        if (args.kill_broker_every or args.freeze_broker_every) and broker is None:
            raise SystemExit("soak: broker pid unknown: give --broker-pid or --broker-config")
        target = Target(args.socket, frontend, broker, args.broker_config)
    try:
        figures = asyncio.run(soak_main(args, target))
    finally:
        if target.plugin is not None:
            try:
                target.plugin.stop()
            except AssertionError as exc:  # the harness found a secret in the logs
                print(f"soak: {exc}", file=sys.stderr)
                return 1
            if not args.keep:
                shutil.rmtree(target.plugin.layout.root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    ledger = figures["ledger"]
    return 0 if ledger.get("OK", 0) == sum(ledger.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
