"""Which stored objects need which key: one pass over etcd, counted per provider and key_id.

Memory stays flat whatever the store holds: per distinct seed only what a Decrypt of it needs and the
first few etcd keys of objects under it; per key and resource, counters.
"""

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keysealer.shared.errors import EtcdError, UsageError
from keysealer.shared.etcd_reader import EtcdOptions, scan_prefix
from keysealer.shared.process import EXIT_FAILURE, EXIT_OK
from keysealer.shared.stored_values import EncryptedSeed, ValueKind, classify, resource_of

SAMPLE_KEYS = 5  # etcd keys kept per seed (and of unparsable values) to name in a report
NOT_HELD = "not-held"  # a key_id the token does not hold
UNKNOWN = "unknown"  # no --config: the token was not asked
VERIFY_TIMEOUT = 3.0  # per Decrypt, as the apiserver's default provider timeout


@dataclass
class SeedUsage:
    objects: int = 0
    sample: list[str] = field(default_factory=list)

    def add(self, key: str) -> None:
        self.objects += 1
        if len(self.sample) < SAMPLE_KEYS:
            self.sample.append(key)


@dataclass
class KeyUsage:
    objects: int = 0
    resources: Counter[str] = field(default_factory=Counter)
    seeds: dict[EncryptedSeed, SeedUsage] = field(default_factory=dict)


@dataclass
class UsageReport:
    prefix: str
    objects: int = 0
    providers: dict[str, dict[str, KeyUsage]] = field(default_factory=dict)
    plaintext: Counter[str] = field(default_factory=Counter)  # by resource
    other_providers: Counter[str] = field(default_factory=Counter)
    unparsable: Counter[str] = field(default_factory=Counter)
    unparsable_sample: list[str] = field(default_factory=list)

    def key_usage(self, key_id: str) -> KeyUsage:
        """What every provider stores under `key_id`, added up."""
        total = KeyUsage()
        for keys in self.providers.values():
            if (usage := keys.get(key_id)) is not None:
                total.objects += usage.objects
                total.resources.update(usage.resources)
                total.seeds.update(usage.seeds)
        return total


def collect(pairs: Iterable[tuple[bytes, bytes]], prefix: bytes) -> UsageReport:
    report = UsageReport(prefix.decode(errors="replace"))
    for key, value in pairs:
        report.objects += 1
        resource, stored = resource_of(key, prefix), classify(value)
        if stored.kind is ValueKind.KMS_V2 and stored.seed is not None:
            usage = report.providers.setdefault(stored.provider, {}).setdefault(stored.seed.key_id, KeyUsage())
            usage.objects += 1
            usage.resources[resource] += 1
            usage.seeds.setdefault(stored.seed, SeedUsage()).add(key.decode(errors="replace"))
        elif stored.kind is ValueKind.PLAINTEXT:
            report.plaintext[resource] += 1
        elif stored.kind is ValueKind.OTHER_PROVIDER:
            report.other_providers[resource] += 1
        else:
            report.unparsable[resource] += 1
            if len(report.unparsable_sample) < SAMPLE_KEYS:
                report.unparsable_sample.append(key.decode(errors="replace"))
    return report


def resources_line(resources: Counter[str]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(resources.items()))


def as_json(report: UsageReport, states: dict[str, str] | None) -> dict[str, Any]:
    """The `--json` document; its field names are a contract for monitoring scripts (docs/rotation.md)."""
    return {
        "prefix": report.prefix,
        "objects": report.objects,
        "providers": [{
            "name": name,
            "keys": [{
                "key_id": key_id,
                "state": _state(states, key_id),
                "objects": usage.objects,
                "seeds": len(usage.seeds),
                "resources": dict(sorted(usage.resources.items())),
            } for key_id, usage in sorted(keys.items())],
        } for name, keys in sorted(report.providers.items())],
        "plaintext": report.plaintext.total(),
        "plaintext_resources": dict(sorted(report.plaintext.items())),
        "other_providers": report.other_providers.total(),
        "other_providers_resources": dict(sorted(report.other_providers.items())),
        "unparsable": report.unparsable.total(),
        "unparsable_keys": report.unparsable_sample,
    }


def _state(states: dict[str, str] | None, key_id: str) -> str:
    return UNKNOWN if states is None else states.get(key_id, NOT_HELD)


def as_text(report: UsageReport, states: dict[str, str] | None) -> str:
    lines = [f"{report.objects} objects under {report.prefix}"]
    for name, keys in sorted(report.providers.items()):
        lines.append(f"provider {name} (KMS v2):")
        for key_id, usage in sorted(keys.items()):
            lines.append(f"  {key_id}  {_state(states, key_id)}: {usage.objects} objects, {len(usage.seeds)} "
                         f"seeds ({resources_line(usage.resources)})")
    for label, counts in (("plaintext", report.plaintext), ("under other providers", report.other_providers),
                          ("unparsable", report.unparsable)):
        lines.append(f"{label}: {counts.total()}" + (f" ({resources_line(counts)})" if counts else ""))
    if report.unparsable_sample:
        lines.append("  unparsable values at: " + ", ".join(report.unparsable_sample))
    return "\n".join(lines)


def scan(etcd: EtcdOptions, prefix: str) -> UsageReport:
    """The usage report of everything under `prefix`; unreadable etcd or an empty prefix is a UsageError."""
    if not prefix.startswith("/"):
        raise UsageError(f"--prefix must start with '/': {prefix!r}")
    under = prefix.rstrip("/").encode() + b"/"
    try:
        report = collect(scan_prefix(etcd, under), under)
    except EtcdError as exc:
        raise UsageError(str(exc)) from None
    if report.objects == 0:
        raise UsageError(f"nothing is stored under {under.decode()} in etcd at {','.join(etcd.endpoints)}: "
                         "is --prefix the apiserver's --etcd-prefix?")
    return report


def usage_command(etcd: EtcdOptions, prefix: str, *, config: Path | None, json_output: bool,
                  verify_socket: Path | None, provider: str | None) -> int:
    """`keysealer keys usage`: exit 0, or with --verify 0 only when every seed decrypts, else 1."""
    report = scan(etcd, prefix)
    states = None
    if config is not None:
        from keysealer.tools.keys_cli import key_states  # loads PKCS #11 only when asked

        states = key_states(config)
    failures: list[dict[str, Any]] | None = None
    if verify_socket is not None:
        failures = _verify(report, verify_socket, provider)
    if json_output:
        document = as_json(report, states)
        if failures is not None:
            document["verify"] = {"seeds": _seed_count(report, provider), "failed": failures}
        print(json.dumps(document, indent=2))
    else:
        print(as_text(report, states))
        if failures is not None:
            print(_verify_text(_seed_count(report, provider), failures))
    return EXIT_FAILURE if failures else EXIT_OK


def _seeds(report: UsageReport, provider: str | None) -> Iterator[tuple[str, EncryptedSeed, SeedUsage]]:
    for name, keys in sorted(report.providers.items()):
        if provider is None or name == provider:
            for usage in keys.values():
                for seed, seed_usage in usage.seeds.items():
                    yield name, seed, seed_usage


def _seed_count(report: UsageReport, provider: str | None) -> int:
    return sum(1 for _ in _seeds(report, provider))


def _verify(report: UsageReport, socket: Path, provider: str | None) -> list[dict[str, Any]]:
    from keysealer.tools.seed_verify import failed_seeds  # loads gRPC only when asked

    failed = failed_seeds(socket, [seed for _, seed, _ in _seeds(report, provider)], VERIFY_TIMEOUT)
    return [{"provider": name, "key_id": seed.key_id, "objects": usage.objects, "error": failed[seed],
             "keys": usage.sample} for name, seed, usage in _seeds(report, provider) if seed in failed]


def _verify_text(seeds: int, failures: list[dict[str, Any]]) -> str:
    lines = [f"verify: {seeds - len(failures)} of {seeds} seeds decrypt"]
    for failure in failures:
        more = failure["objects"] - len(failure["keys"])
        lines.append(f"  FAILED provider {failure['provider']} key {failure['key_id']}: {failure['error']}; "
                     f"{failure['objects']} objects need it: {', '.join(failure['keys'])}"
                     + (f" and {more} more" if more else ""))
    return "\n".join(lines)
