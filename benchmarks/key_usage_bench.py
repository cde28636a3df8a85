#!/usr/bin/env python3
"""How fast `keysealer keys usage` scans etcd, and how much memory it takes, by store size.

Starts a real etcd (TLS with client certificates, tests/etcd_fixture.py) and a real plugin, fills etcd
with objects as kube-apiserver stores them (90% KMS v2 under 20 seeds of two keys, 5% plaintext, 5% under
another provider; values of 300-1500 bytes), then times `keysealer keys usage --json` and
`--verify` as separate processes and reads each one's peak RSS (ru_maxrss from wait4).

    python benchmarks/key_usage_bench.py                    # 10,000 then 100,000 objects (~3 min)
    python benchmarks/key_usage_bench.py --sizes 1000       # smoke run
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from apiserver_values import ApiserverValues  # noqa: E402 - needs the tests directory on sys.path
from etcd_fixture import Etcd, running_etcd  # noqa: E402
from harness import Plugin, created_key_id, running_plugin, short_tmp_dir  # noqa: E402

RESOURCES = ("secrets", "configmaps", "widgets")


def seeds(plugin: Plugin) -> list[object]:
    made = [plugin.encrypt(os.urandom(32)) for _ in range(10)]
    key_id = created_key_id(plugin.keys("rotate").stdout)
    assert plugin.broker is not None
    os.kill(plugin.broker.pid, signal.SIGHUP)
    plugin.wait_for_status_key(key_id)
    return made + [plugin.encrypt(os.urandom(32)) for _ in range(10)]


def fill(etcd: Etcd, values: ApiserverValues, pool: list[object], start: int, count: int) -> None:
    batch: list[tuple[bytes, bytes]] = []
    for n in range(start, start + count):
        key = f"/registry/{RESOURCES[n % 3]}/ns{n % 50}/obj{n:07d}".encode()
        size, kind = 300 + n * 7919 % 1200, n % 20
        if kind == 0:
            value = b"k8s\x00" + os.urandom(size)
        elif kind == 1:
            value = b"k8s:enc:aescbc:v1:key1:" + os.urandom(size)
        else:
            value = values.kms_v2("keysealer", pool[n % len(pool)], data_size=size)
        batch.append((key, value))
        if len(batch) == 1024:
            etcd.put_many(batch)
            batch = []
    etcd.put_many(batch)


def timed(command: list[str]) -> tuple[float, int, int]:
    """(seconds, peak RSS in MiB, exit code) of one run of `command`."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return elapsed, usage.ru_maxrss // 1024, process.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    root = short_tmp_dir()
    values = ApiserverValues(root)
    try:
        with running_etcd(root / "etcd") as etcd, running_plugin(root / "plugin") as plugin:
            pool, filled = seeds(plugin), 0
            usage = ["keysealer", "keys", "usage", *etcd.flags(), "--json"]
            verify = [*usage, "--verify", "--socket", str(plugin.layout.kms_socket)]
            print(f"{'objects':>8}  {'usage s':>8}  {'objects/s':>9}  {'peak MiB':>8}  {'--verify s':>10}  "
                  f"{'peak MiB':>8}")
            for size in sorted(args.sizes):
                fill(etcd, values, pool, filled, size - filled)
                filled = size
                seconds, peak, code = timed(usage)
                assert code == 0, f"keys usage exited {code}"
                verify_seconds, verify_peak, code = timed(verify)
                assert code == 0, f"keys usage --verify exited {code}"
                print(f"{size:>8}  {seconds:>8.2f}  {size / seconds:>9.0f}  {peak:>8}  {verify_seconds:>10.2f}  "
                      f"{verify_peak:>8}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
