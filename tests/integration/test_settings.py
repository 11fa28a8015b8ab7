"""Settings: environment, TOML file, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from integration.settings import SettingsError, load_settings


class TestSettings:
    def test_defaults(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for var in ("CARELOOP_DATABASE_URL", "CARELOOP_BROKER_URL", "CARELOOP_CONFIG"):
            monkeypatch.delenv(var, raising=False)
        s = load_settings()
        assert s.database_url == "sqlite:///var/careloop.db"
        assert s.broker_url is None
        assert (s.http_port, s.mllp_port) == (8000, 2575)
        assert s.auth == "required"

    def test_environment_beats_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        cfg = tmp_path / "careloop.toml"
        cfg.write_text('timezone = "America/New_York"\nmllp_port = 3000\n'
                       '[[hl7_senders]]\napplication = "EPIC"\nfacility = "MAIN"\n'
                       'identifier_systems = { MRN = "urn:oid:1.2.3" }\n')
        monkeypatch.setenv("CARELOOP_CONFIG", str(cfg))
        monkeypatch.setenv("CARELOOP_MLLP_PORT", "4000")
        s = load_settings()
        assert s.timezone == "America/New_York"
        assert s.mllp_port == 4000
        rule = s.sender("EPIC", "MAIN")
        assert rule is not None and rule.identifier_systems["MRN"] == "urn:oid:1.2.3"
        assert s.sender("OTHER", "MAIN") is None

    def test_bad_env_value_one_line(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CARELOOP_MLLP_PORT", "lots")
        with pytest.raises(SettingsError) as info:
            load_settings()
        message = str(info.value)
        assert message.startswith("CARELOOP_MLLP_PORT:")
        assert "\n" not in message

    def test_bad_file_key_named(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        cfg = tmp_path / "c.toml"
        cfg.write_text('timezone = "Mars/Olympus"\n')
        monkeypatch.setenv("CARELOOP_CONFIG", str(cfg))
        with pytest.raises(SettingsError, match=r"^timezone: unknown time zone"):
            load_settings()

    def test_unknown_key_rejected(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        cfg = tmp_path / "c.toml"
        cfg.write_text("mlp_port = 1\n")
        monkeypatch.setenv("CARELOOP_CONFIG", str(cfg))
        with pytest.raises(SettingsError, match="mlp_port: unknown setting"):
            load_settings()

    def test_missing_config_file(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CARELOOP_CONFIG", "/nonexistent/careloop.toml")
        with pytest.raises(SettingsError, match="does not exist"):
            load_settings()

    def test_broken_toml(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        cfg = tmp_path / "c.toml"
        cfg.write_text("timezone = \n")
        monkeypatch.setenv("CARELOOP_CONFIG", str(cfg))
        with pytest.raises(SettingsError, match="CARELOOP_CONFIG"):
            load_settings()

    def test_secret_from_env(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        cfg = tmp_path / "c.toml"
        cfg.write_text('broker_url = "env:MY_BROKER"\n')
        monkeypatch.setenv("CARELOOP_CONFIG", str(cfg))
        monkeypatch.setenv("MY_BROKER", "redis://127.0.0.1:6379/3")
        assert load_settings().broker_url == "redis://127.0.0.1:6379/3"
        monkeypatch.delenv("MY_BROKER")
        with pytest.raises(SettingsError, match="MY_BROKER"):
            load_settings()

    def test_tls_cert_needs_key(self, tmp_path: Path) -> None:
        cert = tmp_path / "c.pem"
        cert.write_text("x")
        with pytest.raises(SettingsError, match="go together"):
            load_settings(mllp_tls_cert=cert)


class TestConnections:
    def test_connection_from_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            '[[connections]]\nname = "main-ehr"\nfhir_base = "https://ehr.example.org/fhir/R4/"\n'
            'client_id = "careloop"\nmode = "classic"\n'
        )
        monkeypatch.setenv("CARELOOP_CONFIG", str(cfg))
        conn = load_settings().connection("main-ehr")
        assert conn is not None
        assert conn.fhir_base == "https://ehr.example.org/fhir/R4"
        assert conn.payload == "id-only"

    def test_backport_needs_topics(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            '[[connections]]\nname = "x"\nfhir_base = "https://e.example/fhir"\n'
            'client_id = "c"\nresource_types = ["Appointment"]\n'
        )
        monkeypatch.setenv("CARELOOP_CONFIG", str(cfg))
        with pytest.raises(SettingsError, match="needs a topic for Appointment"):
            load_settings()


class TestPathways:
    def test_pathways_and_outreach_from_file(self, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            '[[pathways]]\nname = "appointment-reminder"\non = "appointment"\n'
            'when = { status = ["booked"] }\n'
            'steps = [ { at = "-P3D", channel = "preferred", template = "appointment-reminder" },'
            ' { at = "-PT2H", channel = "sms", template = "appointment-reminder-short" } ]\n'
            '[outreach]\nquiet_hours = "22:00-07:30"\nmax_per_day = 2\n'
        )
        monkeypatch.setenv("CARELOOP_CONFIG", str(cfg))
        s = load_settings()
        assert s.pathways[0].steps[1].at.total_seconds() == -7200
        assert s.outreach.max_per_day == 2 and s.outreach.max_per_week == 3

    def test_bad_offset_named(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        cfg = tmp_path / "c.toml"
        cfg.write_text('[[pathways]]\nname = "p"\non = "appointment"\n'
                       'steps = [ { at = "3 days before", template = "t" } ]\n')
        monkeypatch.setenv("CARELOOP_CONFIG", str(cfg))
        with pytest.raises(SettingsError, match=r"^pathways\.0\.steps\.0\.at: .*ISO 8601"):
            load_settings()
