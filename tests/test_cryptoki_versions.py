"""Modules of every Cryptoki version KeySealer claims: 2.40 is SoftHSM's own; 2.20 (openCryptoki) and 3.x
(no Debian 12 module) are SoftHSM behind tests/pkcs11_faults reporting that version in C_GetInfo. A 3.x
module still serves C_GetFunctionList, which PyKCS11 uses; the real 2.20 module runs in test_providers."""

import os
import subprocess

import pkcs11_faults
import pytest
from harness import Plugin, short_tmp_dir


@pytest.mark.parametrize("version", ["2.20", "2.40", "3.0", "3.1"])
def test_the_plugin_serves_and_doctor_names_the_modules_cryptoki_version(version: str) -> None:
    plugin = Plugin(short_tmp_dir())
    pkcs11_faults.install(plugin, plugin.layout.root / "faults", cryptoki_version=version)
    doctor = subprocess.run(["keysealer", "doctor", "--config", str(plugin.layout.broker_config)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert f"Cryptoki {version}" in doctor.stdout, doctor.stdout
    plugin.start()
    try:
        seed = os.urandom(32)
        assert plugin.decrypt(plugin.encrypt(seed)) == seed
    finally:
        plugin.stop()
