"""token.reinitialize_when_changed (tpm2-pkcs11 reads its store only in C_Initialize): workers restart the
module when, and only when, the store file changed. The TPM provider's rotation test shows it end to end."""

from pathlib import Path

from keysealer.hsm_broker.config import TokenConfig
from keysealer.hsm_broker.token import StoreWatch


def test_a_change_to_the_store_is_seen_once_whatever_its_size_and_time(tmp_path: Path) -> None:
    store = tmp_path / "tpm2_pkcs11.sqlite3"
    store.write_bytes(b"a" * 64)
    watch = StoreWatch(TokenConfig(module=Path("/unused.so"), pin_file=Path("/unused")), store)
    assert not watch.changed()
    store.write_bytes(b"b" * 64)  # same size, and most likely the same coarse modification time
    assert watch.changed()
    assert not watch.changed()
    store.unlink()
    assert watch.changed()
