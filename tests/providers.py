"""The PKCS #11 providers the integration suite runs against. Each is set up by its own script in
deploy/providers/NAME/ (the one operators use), which starts any daemon the token needs and writes the
broker config's token section; a provider whose packages are missing is skipped with the reason."""

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

PROVIDERS_DIR = Path(__file__).resolve().parent.parent / "deploy" / "providers"
EXIT_MISSING_PACKAGE = 77
SETUP_SECONDS = 300


@dataclass(frozen=True)
class Provider:
    name: str  # its folder in deploy/providers
    mechanism: str  # the KeySealer mechanism its keys use in the suite
    # Keys made by the token's own tool (deploy/providers/NAME/create-key.sh) instead of C_GenerateKey.
    own_key_tool: bool = False
    setup_env: tuple[tuple[str, str], ...] = ()  # for setup.sh, on top of the test's environment

    @property
    def folder(self) -> Path:
        return PROVIDERS_DIR / self.name

    def setup(self, state_dir: Path) -> None:
        """Run setup.sh into state_dir; skip the caller's tests, saying why, if the provider is not installed."""
        result = _run([str(self.folder / "setup.sh"), str(state_dir)], check=False,
                      env={**os.environ, **dict(self.setup_env)})
        if result.returncode == EXIT_MISSING_PACKAGE:
            pytest.skip(f"provider {self.name}: {result.stderr.strip()}")
        assert result.returncode == 0, f"{self.name} setup failed ({result.returncode}): {result.stderr}"

    def create_key(self, state_dir: Path, broker_config: Path) -> str:
        """A new version of the broker's current key; the stdout of the tool that made it."""
        if self.own_key_tool:
            argv = [str(self.folder / "create-key.sh"), str(state_dir), str(broker_config)]
        else:
            argv = ["keysealer", "keys", "rotate", "--config", str(broker_config), "--mechanism", self.mechanism]
        return _run(argv).stdout

    def stop(self, state_dir: Path) -> None:
        _run([str(PROVIDERS_DIR / "stop.sh"), str(state_dir)])


def _run(argv: list[str], check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=SETUP_SECONDS, check=False, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr}")
    return result


PROVIDERS = (
    Provider("softhsm", "aes-gcm"),
    # p11-kit 0.24's client forwards RSA-OAEP with SHA-1 parameters but not AES-GCM's or CBC's.
    Provider("p11-kit-remote", "rsa-oaep-sha1"),
    # A TPM has no AES-GCM, and tpm2-pkcs11 generates no keys through PKCS #11: tpm2_ptool makes them.
    Provider("tpm2", "aes-cbc-hmac", own_key_tool=True),
    # openCryptoki 3.8 has no AES-GCM; CBC + HMAC is faster than its RSA-OAEP (which also works). Its one soft
    # token is global state: each run wipes the one an earlier run made (its label), and no other.
    Provider("opencryptoki", "aes-cbc-hmac",
             setup_env=(("TOKEN_LABEL", "keysealer-test"), ("OPENCRYPTOKI_WIPE_TOKEN", "keysealer-test"))),
)
