"""Where the shared corpus and the subscription fixtures are."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORPUS = Path(os.environ.get("CARELOOP_CORPUS", REPO.parent / "shared" / "corpus"))
SUBSCRIPTIONS = CORPUS / "subscriptions"
FIXTURES = REPO / "tests" / "fixtures" / "subscriptions"


def corpus_files() -> list[Path]:
    """Every JSON file of the corpus's subscriptions folder ([] when the corpus is absent)."""
    if not SUBSCRIPTIONS.is_dir():
        return []
    return sorted(p for p in SUBSCRIPTIONS.rglob("*.json") if p.name != "package.json")
