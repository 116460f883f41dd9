"""The layering check itself works: it passes on the tree and catches a forbidden import."""

from __future__ import annotations

from pathlib import Path

import pytest
from check_layers import violations

pytestmark = pytest.mark.unit


def test_tree_respects_layering() -> None:
    """agent and controller never import each other; protocols imports only stdlib and cryptography."""
    assert violations() == []


def test_check_catches_cross_import(tmp_path: Path) -> None:
    """An agent module importing controller, or protocols importing aiohttp, is reported."""
    for package in ("agent", "controller", "protocols"):
        (tmp_path / package).mkdir()
    (tmp_path / "agent" / "x.py").write_text("from controller import cli\n")
    (tmp_path / "protocols" / "y.py").write_text("import aiohttp\n")
    found = violations(tmp_path)
    assert len(found) == 2
    assert "agent must not import controller.cli" in found[0] or "agent must not import controller" in found[0]
    assert "protocols must stay pure" in found[1]
