"""Find the shared corpus and pull every HL7 v2 message out of it (files and markdown)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from mappings.er7 import ER7Error, split_messages

REPO = Path(__file__).resolve().parents[2]


def corpus_root() -> Path | None:
    """``$CARELOOP_CORPUS``, else ``../shared/corpus`` beside the clone; None when absent."""
    env = os.environ.get("CARELOOP_CORPUS")
    root = Path(env) if env else REPO / ".." / "shared" / "corpus"
    return root.resolve() if (root / "hl7v2").is_dir() else None


_SEGMENT_LINE = re.compile(r"^[A-Z][A-Z0-9]{2}\|")


def _from_markdown(text: str) -> list[str]:
    messages: list[str] = []
    current: list[str] | None = None
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if line.startswith("<br>"):
            line = line[4:]
        if line.startswith("MSH|"):
            current = [line]
            messages.append("")  # placeholder, filled below
            messages[-1] = "\r".join(current)
            continue
        if current is not None and _SEGMENT_LINE.match(line):
            current.append(line)
            messages[-1] = "\r".join(current)
            continue
        current = None
    return messages


def corpus_messages(root: Path) -> Iterator[tuple[str, bytes | str]]:
    """(name, raw bytes or text) for every message in the corpus's hl7v2 folder."""
    for path in sorted((root / "hl7v2").rglob("*")):
        if not path.is_file() or path.name.startswith(("LICENSE", "MIT-LICENSE")):
            continue
        rel = path.relative_to(root).as_posix()
        data = path.read_bytes()
        if path.suffix == ".md":
            if b"MSH|" not in data:
                continue
            for i, msg in enumerate(_from_markdown(data.decode("utf-8", "replace"))):
                # the markdown is UTF-8 text already (its NBSP and U+FFFD would contradict an
                # MSH-18 of ASCII if re-encoded), so the message is handed over as text
                yield f"{rel}#{i + 1}", msg
            continue
        if b"MSH" not in data:
            continue
        # SimpleSender's text placeholders for MLLP framing
        data = data.replace(b"[SOM]", b"").replace(b"[EOM][CR]", b"").replace(b"[EOM]", b"")
        try:
            parts = split_messages(data)
        except ER7Error:
            continue
        for i, msg in enumerate(parts):
            yield (f"{rel}#{i + 1}" if len(parts) > 1 else rel), msg
