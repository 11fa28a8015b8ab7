"""The mappings package exports a deliberate public surface."""

from __future__ import annotations

import mappings


class TestExportedMembers:
    def test_public_surface_is_exactly_all(self) -> None:
        """Every name in __all__ exists, and nothing public is exported by accident."""
        public = {n for n in dir(mappings) if not n.startswith("_")}
        modules = {n for n in public if type(getattr(mappings, n)).__name__ == "module"}
        assert set(mappings.__all__) == public - modules

    def test_convert_runs_from_the_package(self) -> None:
        """`mappings.convert` converts a message with a MappingContext."""
        raw = "MSH|^~\\&|A|B|C|D|20240101||ADT^A28|1|P|2.5\rPID|1||7^^^H^MR||Doe^J\r"
        conv = mappings.convert(raw, context=mappings.MappingContext())
        assert conv.message_type == "ADT^A28"
