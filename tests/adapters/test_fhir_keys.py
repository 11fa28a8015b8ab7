"""Signing keys for `careloop keys generate`: generation, PEM round trip, kid, JWKS rotation."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.jwk import KeySet

from adapters.fhir import (
    SigningKey,
    SigningKeyError,
    add_to_jwks,
    build_client_assertion,
    generate_signing_key,
    jwks,
    load_signing_key,
    read_signing_key,
    remove_from_jwks,
    save_private_key,
)
from tests.adapters import test_fhir_fakes as fakes

es_key = fakes.es_key
rs_key = fakes.rs_key

PRIVATE = {"d", "p", "q", "dp", "dq", "qi"}


def _pem(raw: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return raw.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class TestGenerate:
    @pytest.mark.parametrize("alg", ["ES384", "RS384"])
    def test_pem_round_trip_keeps_kid_and_alg(self, alg: str, es_key: SigningKey,
                                              rs_key: SigningKey) -> None:
        """Reloading the PEM gives the same kid (the RFC 7638 thumbprint) and algorithm."""
        key = es_key if alg == "ES384" else rs_key
        again = load_signing_key(key.private_pem())
        assert (again.kid, again.alg) == (key.kid, alg)
        assert key.kid == key.key.thumbprint()

    def test_public_jwk_has_no_private_members(self, es_key: SigningKey) -> None:
        """The published JWK carries kid, alg and use, never the private scalar."""
        jwk = es_key.public_jwk()
        assert not PRIVATE & set(jwk)
        assert jwk["kid"] == es_key.kid and jwk["alg"] == "ES384" and jwk["use"] == "sig"
        assert jwk["crv"] == "P-384"

    def test_published_jwks_verifies_assertions(self, rs_key: SigningKey) -> None:
        """What the EHR gets (the JWKS) verifies what careloop signs."""
        token = build_client_assertion(rs_key, client_id="c", token_url="https://t", jti="1",
                                       now=1_700_000_000)
        claims = jwt.decode(token, KeySet.import_key_set(jwks([rs_key])),
                            algorithms=["RS384"]).claims
        assert claims["iss"] == "c"

    def test_explicit_kid_overrides_thumbprint(self, es_key: SigningKey) -> None:
        """A configured kid is used as given."""
        assert load_signing_key(es_key.private_pem(), kid="careloop-2025").kid == "careloop-2025"

    def test_assertion_lifetime_is_bounded(self, es_key: SigningKey) -> None:
        """No assertion may live longer than five minutes."""
        with pytest.raises(ValueError, match="lifetime"):
            build_client_assertion(es_key, client_id="c", token_url="https://t", jti="1",
                                   now=0, lifetime_s=301)


class TestLoadRefusals:
    def test_public_key_pem(self, es_key: SigningKey) -> None:
        """The public half cannot sign; the message says which half the EHR gets."""
        with pytest.raises(SigningKeyError, match="PRIVATE KEY"):
            load_signing_key(es_key.key.as_pem(private=False))

    def test_wrong_curve(self) -> None:
        """ES384 needs P-384; a P-256 key is refused with the curve named."""
        with pytest.raises(SigningKeyError, match="P-256"):
            load_signing_key(_pem(ec.generate_private_key(ec.SECP256R1())))

    def test_small_rsa(self) -> None:
        """RSA under 2048 bits is refused."""
        with pytest.raises(SigningKeyError, match="1024 bits"):
            load_signing_key(_pem(rsa.generate_private_key(65537, 1024)))

    def test_garbage_names_the_file(self, tmp_path: Path) -> None:
        """A broken key file: the error names the file."""
        bad = tmp_path / "k.pem"
        bad.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
        with pytest.raises(SigningKeyError, match=str(bad)):
            read_signing_key(bad)
        with pytest.raises(SigningKeyError, match="No such file"):
            read_signing_key(tmp_path / "missing.pem")


class TestSave:
    def test_written_owner_only_and_never_overwritten(self, es_key: SigningKey,
                                                      tmp_path: Path) -> None:
        """Mode 0600; an existing key is kept unless overwrite is asked for."""
        path = save_private_key(es_key, tmp_path / "var" / "keys" / "careloop.pem")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert read_signing_key(path).kid == es_key.kid
        other = generate_signing_key("ES384")
        with pytest.raises(SigningKeyError, match="exists"):
            save_private_key(other, path)
        save_private_key(other, path, overwrite=True)
        assert read_signing_key(path).kid == other.kid


class TestRotation:
    def test_old_kid_stays_published_until_removed(self, es_key: SigningKey,
                                                   rs_key: SigningKey) -> None:
        """Adding the new key keeps the old one; removing drops only that kid."""
        first = jwks([es_key])
        both = add_to_jwks(first, rs_key)
        assert [k["kid"] for k in both["keys"]] == [rs_key.kid, es_key.kid]
        assert add_to_jwks(both, rs_key) == both
        assert [k["kid"] for k in remove_from_jwks(both, es_key.kid)["keys"]] == [rs_key.kid]

    def test_private_members_are_never_published(self, es_key: SigningKey) -> None:
        """A JWK with a private member in the set is refused."""
        leaked = dict(es_key.key.as_dict(private=True), kid="x")
        with pytest.raises(SigningKeyError, match="private"):
            jwks([leaked])
