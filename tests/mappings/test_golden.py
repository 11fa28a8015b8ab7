"""Golden pairs: each fixture message against its reviewed Bundle in tests/fixtures/fhir/.

After a deliberate mapping change, regenerate with ``CARELOOP_REGEN_GOLDEN=1`` and review the
diff of the JSON files like code.
"""

from __future__ import annotations

import json
import os

import pytest

from mappings.fhir_validation import validate_resource
from tests.mappings.helpers_mappings import FHIR, HL7, run

FIXTURES = sorted(p.name for p in HL7.glob("*.hl7"))


class TestGoldenPairs:
    @pytest.mark.parametrize("name", FIXTURES)
    def test_message_converts_to_its_golden_bundle(self, name: str) -> None:
        """The Bundle for each fixture equals the reviewed one, byte for byte as JSON."""
        bundle = run((HL7 / name).read_bytes()).bundle()
        expected_path = FHIR / name.replace(".hl7", ".bundle.json")
        text = json.dumps(bundle, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
        if os.environ.get("CARELOOP_REGEN_GOLDEN") == "1":
            expected_path.write_text(text, encoding="utf-8")
        assert expected_path.exists(), (
            f"no golden file for {name}; run with CARELOOP_REGEN_GOLDEN=1"
        )
        assert json.loads(expected_path.read_text(encoding="utf-8")) == bundle

    @pytest.mark.parametrize("name", FIXTURES)
    def test_golden_bundle_validates(self, name: str) -> None:
        """Each golden Bundle is itself valid FHIR (R4B models)."""
        path = FHIR / name.replace(".hl7", ".bundle.json")
        if not path.exists():
            pytest.skip("golden file not generated yet")
        assert validate_resource(json.loads(path.read_text(encoding="utf-8"))) == []
