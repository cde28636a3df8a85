"""Fixtures that start the real plugin: real SoftHSM token, real processes, real sockets."""

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Plugin, running_plugin, short_tmp_dir


@pytest.fixture
def state_dir() -> Iterator[Path]:
    root = short_tmp_dir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def plugin(state_dir: Path) -> Iterator[Plugin]:
    with running_plugin(state_dir) as running:
        yield running


@pytest.fixture(scope="module")
def shared_plugin() -> Iterator[Plugin]:
    """One plugin for a module of read-mostly tests: starting a token and two processes costs ~1 s."""
    root = short_tmp_dir()
    with running_plugin(root) as running:
        yield running
    shutil.rmtree(root, ignore_errors=True)
