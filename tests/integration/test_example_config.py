"""The example configuration in deploy/ loads, and its templates render."""

from __future__ import annotations

from pathlib import Path

import pytest

from integration.outreach.templates import TemplateCatalog
from integration.settings import load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "careloop.example.toml"


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARELOOP_CONFIG", str(EXAMPLE))
    settings = load_settings()
    assert {p.name for p in settings.pathways} == {
        "appointment-reminder", "visit-followup", "survey", "refill-reminder", "careplan-step"}
    TemplateCatalog(default_language=settings.default_language).check(
        settings.pathways, settings.outreach.languages)
