"""Benchmark: HL7 v2 → FHIR conversion throughput per family, beside bare parsers.

Run from the repository root:  python bench/bench_mappings.py  [--budget SECONDS]

For each family it measures, on one core, in messages per second:

* ``parse``: careloop's tokenizer alone (``Message.parse``, bytes in);
* ``convert``: parse + map + serialise (``json.dumps`` of the Bundle), validation off;
* ``convert+validate``: the storing path, with fhir.resources (R4B) validation on;
* ``validate``: validation alone, over the resources one message yields;
* ``python-hl7``: ``hl7.parse`` of the same messages (bare parse, CR-separated text);
* ``hl7apy``: ``hl7apy.parser.parse_message(text, find_groups=False)`` (bare parse, tolerant).

The ADT^A01 row (the issue's target) uses the MSFC ``ADT-A01-01`` sample, the largest ADT in the
corpus. Ratios are ``convert`` ÷ bare parse, measured in the same run. It then times one pass
over every supported message in the shared corpus. Results go to ``bench/results/mappings.json``.
Messages come from ``../shared/corpus`` (or ``$CARELOOP_CORPUS``); without it, from
``tests/fixtures/hl7``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mappings.context import MappingContext  # noqa: E402
from mappings.convert import convert, family_of  # noqa: E402
from mappings.er7 import ER7Error, decode, split_messages, split_segments  # noqa: E402
from mappings.fhir_validation import validate_resources  # noqa: E402
from mappings.message import Message  # noqa: E402

FAMILIES = ("adt", "siu", "pharmacy", "results", "immunization")
CTX = MappingContext(sender_timezone=ZoneInfo("America/New_York"), validate=False)
CTX_VALIDATE = MappingContext(sender_timezone=ZoneInfo("America/New_York"), validate=True)


def corpus_dir() -> Path | None:
    env = os.environ.get("CARELOOP_CORPUS")
    root = Path(env) if env else ROOT / ".." / "shared" / "corpus"
    return root.resolve() if (root / "hl7v2").is_dir() else None


_SEG = re.compile(r"^[A-Z][A-Z0-9]{2}\|")


def _markdown_messages(text: str) -> list[str]:
    out: list[list[str]] = []
    current: list[str] | None = None
    for raw_line in text.splitlines():
        line = raw_line.strip().removeprefix("<br>")
        if line.startswith("MSH|"):
            current = [line]
            out.append(current)
        elif current is not None and _SEG.match(line):
            current.append(line)
        else:
            current = None
    return ["\r".join(m) for m in out]


def load_messages() -> tuple[str, list[tuple[str, bytes | str]]]:
    root = corpus_dir()
    found: list[tuple[str, bytes | str]] = []
    if root is None:
        for path in sorted((ROOT / "tests" / "fixtures" / "hl7").glob("*.hl7")):
            found.append((path.name, path.read_bytes()))
        return "tests/fixtures/hl7", found
    for path in sorted((root / "hl7v2").rglob("*")):
        if not path.is_file() or "LICENSE" in path.name:
            continue
        data = path.read_bytes()
        if path.suffix == ".md":
            found += [(path.name, m) for m in _markdown_messages(data.decode("utf-8", "replace"))]
            continue
        data = data.replace(b"[SOM]", b"").replace(b"[EOM][CR]", b"").replace(b"[EOM]", b"")
        try:
            found += [(path.name, m) for m in split_messages(data)]
        except ER7Error:
            continue
    return str(root), found


def family(raw: bytes | str) -> str | None:
    try:
        h = Message.parse(raw).header
    except ER7Error:
        return None
    return family_of(h.message_code, h.trigger_event or h.message_structure.partition("_")[2])


def as_text(raw: bytes | str) -> str:
    """CR-separated text, which is what python-hl7 and hl7apy expect."""
    text = decode(raw) if isinstance(raw, bytes) else raw
    return "\r".join(split_segments(text)) + "\r"


def rate(fn: Callable[[], object], n_messages: int, budget: float) -> float:
    """Messages per second for ``fn`` (which handles ``n_messages``), over about ``budget`` s."""
    fn()  # warm-up (imports, caches)
    loops = 0
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < budget or loops == 0:
        fn()
        loops += 1
        elapsed = time.perf_counter() - start
    return loops * n_messages / elapsed


def _convert_all(msgs: list[bytes | str], ctx: MappingContext) -> None:
    for raw in msgs:
        json.dumps(convert(raw, context=ctx).bundle())


def bench_family(msgs: list[bytes | str], budget: float, hl7apy_budget: float) -> dict[str, Any]:
    import hl7
    from hl7apy.parser import parse_message

    texts = [as_text(m) for m in msgs]
    n = len(msgs)
    produced = [convert(m, context=CTX).resources for m in msgs]
    row: dict[str, Any] = {"messages": n, "resources": sum(len(r) for r in produced)}
    row["parse"] = rate(lambda: [Message.parse(m) for m in msgs], n, budget)
    row["convert"] = rate(lambda: _convert_all(msgs, CTX), n, budget)
    row["convert+validate"] = rate(lambda: _convert_all(msgs, CTX_VALIDATE), n, budget)

    def validate_only() -> None:
        for resources in produced:
            validate_resources([dict(r) for r in resources], lambda *_: None)

    row["validate"] = rate(validate_only, n, budget)
    row["python-hl7"] = rate(lambda: [hl7.parse(t) for t in texts], n, budget)

    ok = []
    for t in texts:
        try:
            parse_message(t, find_groups=False)
            ok.append(t)
        except Exception:  # hl7apy's own errors and plain ones: counted as rejections
            continue
    row["hl7apy_rejects"] = n - len(ok)
    row["hl7apy"] = (
        rate(lambda: [parse_message(t, find_groups=False) for t in ok], len(ok), hl7apy_budget)
        if ok
        else None
    )
    row["medplum"], row["medplum_rejects"] = medplum_parse_rate(texts, budget)
    row["ratio_vs_python_hl7"] = row["convert"] / row["python-hl7"]
    row["ratio_vs_hl7apy"] = row["convert"] / row["hl7apy"] if row["hl7apy"] else None
    row["ratio_validated_vs_python_hl7"] = row["convert+validate"] / row["python-hl7"]
    row["ratio_validated_vs_hl7apy"] = (
        row["convert+validate"] / row["hl7apy"] if row["hl7apy"] else None
    )
    return row


MEDPLUM_DIR = ROOT / "bench" / "peers" / "medplum"


def medplum_parse_rate(texts: list[str], budget: float) -> tuple[float | None, int | None]:
    """Medplum's ``Hl7Message.parse`` (Node) over the same texts; None when Node or the
    package is missing (``make bench`` installs it with the intake bench)."""
    if shutil.which("node") is None or not (MEDPLUM_DIR / "node_modules").is_dir():
        return None, None
    try:
        done = subprocess.run(
            ["node", str(MEDPLUM_DIR / "parse_bench.mjs")],
            input=json.dumps({"messages": texts, "budget": budget}),
            capture_output=True, text=True, timeout=60 + budget * 4, check=True,
            cwd=MEDPLUM_DIR,
        )
        out = json.loads(done.stdout)
    except (subprocess.SubprocessError, ValueError, OSError):
        return None, None
    return out.get("msg_per_s"), out.get("rejects")


def whole_corpus(msgs: list[bytes | str], rounds: int = 5) -> dict[str, float]:
    out: dict[str, float] = {}
    for label, ctx in (("without_validation_s", CTX), ("with_validation_s", CTX_VALIDATE)):
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for raw in msgs:
                # MappingError (unsupported, unmappable) still counts in the pass
                with contextlib.suppress(ValueError):
                    json.dumps(convert(raw, context=ctx).bundle())
            times.append(time.perf_counter() - start)
        out[label] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=0.6, help="seconds per measurement")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    started = time.perf_counter()
    source, messages = load_messages()
    by_family: dict[str, list[bytes | str]] = {f: [] for f in FAMILIES}
    a01: list[bytes | str] = []
    for name, raw in messages:
        fam = family(raw)
        if fam is None:
            continue
        try:
            convert(raw, context=CTX)
        except ValueError:
            continue
        by_family[fam].append(raw)
        if name in ("ADT-A01-01.hl7", "adt_a01_v2f.hl7") and not a01:
            a01.append(raw)

    rows: dict[str, dict[str, Any]] = {}
    if a01:
        rows["ADT^A01 (MSFC ADT-A01-01)"] = bench_family(a01, args.budget, args.budget)
    for fam in FAMILIES:
        if by_family[fam]:
            rows[fam] = bench_family(by_family[fam], args.budget, args.budget / 2)

    corpus_msgs = [raw for _, raw in messages]
    corpus = whole_corpus(corpus_msgs)
    corpus["messages"] = len(corpus_msgs)
    corpus["supported"] = sum(len(v) for v in by_family.values())

    cols = ["parse", "convert", "convert+validate", "validate", "python-hl7", "hl7apy",
            "medplum"]
    head = f"{'family':28} {'msgs':>5} " + " ".join(f"{c:>16}" for c in cols)
    head += f" {'conv/py-hl7':>11} {'conv/hl7apy':>11} {'valid/py-hl7':>12} {'valid/hl7apy':>12}"
    print(f"source: {source}   python {platform.python_version()}   one core, msg/s")
    print(head)
    print("-" * len(head))
    for label, row in rows.items():
        cells = " ".join(f"{row[c]:>16,.0f}" if row[c] is not None else f"{'-':>16}" for c in cols)

        def fmt(v: float | None, w: int) -> str:
            return f"{v:>{w - 1}.1f}x" if v is not None else f"{'-':>{w}}"

        print(
            f"{label:28} {row['messages']:>5} {cells} "
            f"{fmt(row['ratio_vs_python_hl7'], 11)} {fmt(row['ratio_vs_hl7apy'], 11)} "
            f"{fmt(row['ratio_validated_vs_python_hl7'], 12)} "
            f"{fmt(row['ratio_validated_vs_hl7apy'], 12)}"
        )
    print(
        f"\nwhole corpus: {corpus['messages']} messages ({corpus['supported']} supported): "
        f"{corpus['without_validation_s']:.3f} s without validation, "
        f"{corpus['with_validation_s']:.3f} s with validation"
    )
    result = {
        "generated_by": "bench/bench_mappings.py",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "source": source,
        "unit": "messages per second, one core",
        "families": rows,
        "whole_corpus": corpus,
        "runtime_s": round(time.perf_counter() - started, 1),
    }
    out = ROOT / "bench" / "results" / "mappings.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written {out.relative_to(ROOT)} in {result['runtime_s']} s")


if __name__ == "__main__":
    main()
