"""careloop's own signing keys for SMART Backend Services, and the JWKS it publishes.

``careloop keys generate`` writes a private key (PEM, mode 0600) under ``keys_dir`` and adds its
public half to ``keys_dir/jwks.json``, which ``GET /.well-known/jwks.json`` serves; EHRs either
fetch that URL or are given the file. Rotation: generate a new key (the old ``kid`` stays
published), point the connection's ``private_key`` at the new file, and once no EHR can still
need the old key, ``careloop keys remove KID``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from adapters.fhir import (
    SigningKey,
    add_to_jwks,
    generate_signing_key,
    remove_from_jwks,
    save_private_key,
)

__all__ = ["JWKSFile"]


class JWKSFile:
    """The published key set, kept as a JSON file and re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cache: tuple[float, dict[str, Any]] | None = None

    def read(self) -> dict[str, Any]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return {"keys": []}
        if self._cache is None or self._cache[0] != mtime:
            self._cache = (mtime, json.loads(self.path.read_text()))
        return self._cache[1]

    def _write(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.path)

    def generate(self, alg: str, out: Path, *, overwrite: bool = False) -> SigningKey:
        """A new key pair: private PEM at ``out``, public JWK added to the set."""
        key = generate_signing_key("RS384" if alg == "RS384" else "ES384")
        save_private_key(key, out, overwrite=overwrite)
        self._write(add_to_jwks(self.read(), key))
        return key

    def remove(self, kid: str) -> bool:
        current = self.read()
        if not any(k.get("kid") == kid for k in current.get("keys", [])):
            return False
        self._write(remove_from_jwks(current, kid))
        return True
