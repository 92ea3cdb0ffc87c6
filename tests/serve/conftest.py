"""A bundle with a chat template, built from the shipped one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serve._helpers import with_chat_template


@pytest.fixture(scope="session")
def chat_bundle(shipped_bundle, tmp_path_factory) -> Path:
    return with_chat_template(shipped_bundle, tmp_path_factory.mktemp("chat") / "chat.dymoe")
