"""Signing keys for SMART Backend Services (``careloop keys generate``) and the public JWKS.

SMART Backend Services (https://hl7.org/fhir/smart-app-launch/backend-services.html) has the
client sign its token requests with a private key whose public half the EHR knows, either
registered as a JWK Set or fetched from a ``jwks_url``; servers must support RS384 and ES384,
so those are the two algorithms offered here.

* The private key is a PKCS#8 PEM file (what :func:`save_private_key` writes, mode 0600).
* The ``kid`` defaults to the key's RFC 7638 JWK thumbprint, so the PEM file alone is enough to
  sign: nothing else must be kept in step with it. A configured ``kid`` overrides it.
* The algorithm follows from the key: RSA signs RS384, EC P-384 signs ES384.
* Rotation: publish the new key beside the old ones (:func:`add_to_jwks`), switch signing to the
  new one, and only drop the old ``kid`` (:func:`remove_from_jwks`) once no EHR can still hold
  assertions or cached key sets that need it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey, import_key

__all__ = [
    "SIGNING_ALGORITHMS",
    "SigningKey",
    "SigningKeyError",
    "add_to_jwks",
    "generate_signing_key",
    "jwks",
    "load_signing_key",
    "read_signing_key",
    "remove_from_jwks",
    "save_private_key",
]

SIGNING_ALGORITHMS = ("RS384", "ES384")
Algorithm = Literal["RS384", "ES384"]
MIN_RSA_BITS = 2048
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class SigningKeyError(ValueError):
    """A key that cannot be used for SMART Backend Services, with the reason."""


@dataclass(frozen=True)
class SigningKey:
    """A private key with the ``kid`` and algorithm its client assertions carry."""

    key: RSAKey | ECKey
    kid: str
    alg: Algorithm

    def public_jwk(self) -> dict[str, Any]:
        """The public JWK to publish: key members, ``kid``, ``alg``, ``use``, ``key_ops``."""
        jwk = {k: v for k, v in self.key.as_dict(private=False).items()
               if k not in _PRIVATE_MEMBERS}
        jwk.update(kid=self.kid, alg=self.alg, use="sig", key_ops=["verify"])
        return jwk

    def private_pem(self) -> bytes:
        """The private key as PKCS#8 PEM."""
        return self.key.as_pem(private=True)


def _alg_for(key: RSAKey | ECKey) -> Algorithm:
    if isinstance(key, RSAKey):
        bits = key.raw_value.key_size
        if bits < MIN_RSA_BITS:
            raise SigningKeyError(f"the RSA key has {bits} bits; use at least {MIN_RSA_BITS}")
        return "RS384"
    if key.curve_name != "P-384":
        raise SigningKeyError(f"the EC key is on curve {key.curve_name}; ES384 needs P-384")
    return "ES384"


def generate_signing_key(
    alg: Algorithm = "ES384", *, kid: str | None = None, rsa_bits: int = 3072
) -> SigningKey:
    """A new key pair for ``alg`` (``ES384``: EC P-384; ``RS384``: RSA of ``rsa_bits``)."""
    key: RSAKey | ECKey
    if alg == "ES384":
        key = ECKey.generate_key("P-384")
    elif alg == "RS384":
        if rsa_bits < MIN_RSA_BITS:
            raise SigningKeyError(f"rsa_bits must be at least {MIN_RSA_BITS}")
        key = RSAKey.generate_key(rsa_bits)
    else:
        raise SigningKeyError(f"algorithm {alg!r} is not offered; use one of {SIGNING_ALGORITHMS}")
    return SigningKey(key, kid or key.thumbprint(), alg)


def load_signing_key(pem: bytes | str, *, kid: str | None = None) -> SigningKey:
    """A :class:`SigningKey` from a PEM private key (PKCS#8, or PKCS#1 / SEC1)."""
    data = pem.encode() if isinstance(pem, str) else pem
    if b"PRIVATE KEY" not in data:
        raise SigningKeyError("not a PEM private key (no 'PRIVATE KEY' block); SMART Backend "
                              "Services signs with the private key, the EHR gets the public JWKS")
    try:
        raw = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"the private key cannot be read: {exc}") from None
    if isinstance(raw, rsa.RSAPrivateKey):
        if raw.key_size < MIN_RSA_BITS:
            raise SigningKeyError(f"the RSA key has {raw.key_size} bits; use at least "
                                  f"{MIN_RSA_BITS}")
        key_type: Literal["RSA", "EC"] = "RSA"
    elif isinstance(raw, ec.EllipticCurvePrivateKey):
        key_type = "EC"
    else:
        raise SigningKeyError(f"a {type(raw).__name__} cannot sign RS384 or ES384")
    try:
        key = import_key(data, key_type)
    except (JoseError, ValueError, TypeError) as exc:
        raise SigningKeyError(f"the private key cannot be read: {exc}") from None
    assert isinstance(key, RSAKey | ECKey)
    alg = _alg_for(key)
    return SigningKey(key, kid or key.thumbprint(), alg)


def read_signing_key(path: str | os.PathLike[str], *, kid: str | None = None) -> SigningKey:
    """:func:`load_signing_key` on a file; the error names the file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"private key {p}: {exc.strerror or exc}") from None
    try:
        return load_signing_key(data, kid=kid)
    except SigningKeyError as exc:
        raise SigningKeyError(f"private key {p}: {exc}") from None


def save_private_key(key: SigningKey, path: str | os.PathLike[str], *,
                     overwrite: bool = False) -> Path:
    """Write the PEM private key with mode 0600 (parent folders created). Refuses to replace an
    existing file unless ``overwrite``: losing a registered key locks careloop out of the EHR."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(p, flags, 0o600)
    except FileExistsError:
        raise SigningKeyError(f"{p} exists; keep it (it may be registered with an EHR) or pass "
                        "overwrite") from None
    with os.fdopen(fd, "wb") as out:
        out.write(key.private_pem())
    return p


def _public_member(jwk: Mapping[str, Any]) -> dict[str, Any]:
    if _PRIVATE_MEMBERS & set(jwk):
        raise SigningKeyError(f"JWK {jwk.get('kid', '?')} holds private key members; publish only "
                        "public keys")
    if not jwk.get("kid"):
        raise SigningKeyError("every published JWK needs a kid")
    return dict(jwk)


def jwks(keys: Iterable[SigningKey | Mapping[str, Any]]) -> dict[str, Any]:
    """A JWK Set of public keys, in the order given, one per ``kid`` (the first wins)."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for k in keys:
        jwk = k.public_jwk() if isinstance(k, SigningKey) else _public_member(k)
        if jwk["kid"] not in seen:
            seen.add(jwk["kid"])
            out.append(jwk)
    return {"keys": out}


def add_to_jwks(existing: Mapping[str, Any] | None, key: SigningKey) -> dict[str, Any]:
    """``existing`` with ``key`` published first; older keys stay published (rotation)."""
    old = list((existing or {}).get("keys") or [])
    return jwks([key, *[k for k in old if k.get("kid") != key.kid]])


def remove_from_jwks(existing: Mapping[str, Any], kid: str) -> dict[str, Any]:
    """``existing`` without ``kid`` (the end of a rotation)."""
    keys = [k for k in existing.get("keys") or [] if k.get("kid") != kid]
    return jwks(keys)
