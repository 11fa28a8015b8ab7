"""GET /outreach/outcomes (JSON, outreach.read), /console/outcomes (HTML with SVG charts) and
/console/outcomes.csv (admin): auth, the Basic challenge, figures, and no identifiers."""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from integration.api import create_app
from integration.outcomes.api import CSS, CSS_HASH
from integration.outcomes.api import router as outcomes_router
from integration.runtime import Runtime
from tests.helpers import settings_for
from tests.outcomes import history as h

JUNE = {"since": "2024-06-01", "until": "2024-06-30"}


def outcomes_app(runtime: Runtime) -> FastAPI:
    """The real app, with the outcomes router (included here until the app includes it)."""
    app = create_app(runtime)
    if "/console/outcomes" not in {getattr(r, "path", "") for r in app.routes}:
        app.include_router(outcomes_router)
    return app


@pytest.fixture
def runtime(db_url: str) -> Iterator[Runtime]:
    rt = Runtime(settings_for(db_url, auth="required", inprocess_worker=False,
                              pathways=h.PATHWAYS, timezone="UTC"), with_mllp=False)
    h.seed(rt.engine)
    yield rt
    rt.engine.dispose()


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(outcomes_app(runtime)) as c:
        yield c


def basic(runtime: Runtime, *scopes: str) -> dict[str, str]:
    client_id, secret = runtime.clients.create("someone", list(scopes))
    token = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _no_identifiers(text: str) -> None:
    for secret in h.identifiers():
        assert secret not in text, secret


class TestVendorApi:
    def test_the_figures_for_outreach_read(self, client: TestClient, runtime: Runtime) -> None:
        r = client.get("/outreach/outcomes", params=JUNE,
                       headers=basic(runtime, "outreach.read"))
        assert r.status_code == 200
        assert r.headers["cache-control"] == "no-store"
        assert r.json() == h.expected_json()
        _no_identifiers(r.text)

    def test_a_bearer_token(self, client: TestClient, runtime: Runtime) -> None:
        token = client.post("/oauth/token", data={"grant_type": "client_credentials"},
                            headers=basic(runtime, "outreach.read")).json()["access_token"]
        r = client.get("/outreach/outcomes", params=JUNE,
                       headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        assert r.json()["totals"]["sent"] == 13

    def test_other_scopes_403(self, client: TestClient, runtime: Runtime) -> None:
        r = client.get("/outreach/outcomes", params=JUNE,
                       headers=basic(runtime, "timeline.read"))
        assert (r.status_code, r.json()["code"]) == (403, "insufficient_scope")

    def test_no_credentials_401(self, client: TestClient) -> None:
        r = client.get("/outreach/outcomes", params=JUNE)
        assert r.status_code == 401
        assert "Bearer" in r.headers["www-authenticate"]

    def test_periods(self, client: TestClient, runtime: Runtime) -> None:
        auth = basic(runtime, "outreach.read")
        r = client.get("/outreach/outcomes", params={"since": "2024-06-01T00:00:00Z",
                                                     "until": "2024-07-01T00:00:00+00:00"},
                       headers=auth)
        assert r.json() == h.expected_json()
        default = client.get("/outreach/outcomes", headers=auth)
        assert default.status_code == 200  # the last 30 days: nothing seeded there
        assert default.json()["totals"]["touches"] == 0
        for bad in ({"since": "June"}, {"until": "2024-13-01"},
                    {"since": "2024-06-30", "until": "2024-06-01"}):
            r = client.get("/outreach/outcomes", params=bad, headers=auth)
            assert (r.status_code, r.json()["code"]) == (400, "bad_request"), bad


class TestConsole:
    @pytest.mark.parametrize("path", ["/console/outcomes", "/console/outcomes.csv"])
    def test_asks_a_browser_for_credentials(self, client: TestClient, path: str) -> None:
        r = client.get(path)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == 'Basic realm="careloop console"'
        wrong = {"Authorization": "Basic " + base64.b64encode(b"nobody:nothing").decode()}
        r = client.get(path, headers=wrong)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == 'Basic realm="careloop console"'

    @pytest.mark.parametrize("path", ["/console/outcomes", "/console/outcomes.csv"])
    def test_needs_admin(self, client: TestClient, runtime: Runtime, path: str) -> None:
        r = client.get(path, headers=basic(runtime, "outreach.read"))
        assert (r.status_code, r.json()["code"]) == (403, "insufficient_scope")

    def test_the_page(self, client: TestClient, runtime: Runtime) -> None:
        r = client.get("/console/outcomes", params=JUNE, headers=basic(runtime, "admin"))
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        html = r.text
        assert html.count("<svg") == 4
        assert 'role="img"' in html
        assert "<script" not in html
        assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert "https://" not in html
        # figures, with the counts behind each rate
        assert "83.3% (5 of 6)" in html       # step 0 delivered
        assert "25.0% (1 of 4)" in html       # no-shows, reminded
        assert "50.0% (1 of 2)" in html       # no-shows, not reminded
        assert "60.0% (3 of 5)" in html       # freed slots filled
        assert "its time … had passed when planned" in html
        assert "<td>8.25</td><td>25.0</td>" in html  # survey mean and NPS
        # the inline style is the one the policy allows, and nothing else is allowed
        csp = r.headers["content-security-policy"]
        assert f"style-src 'sha256-{CSS_HASH}'" in csp
        assert "default-src 'none'" in csp
        assert f"<style>{CSS}</style>" in html
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["x-frame-options"] == "DENY"
        _no_identifiers(html)

    def test_the_csv(self, client: TestClient, runtime: Runtime) -> None:
        r = client.get("/console/outcomes.csv", params=JUNE, headers=basic(runtime, "admin"))
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/csv")
        assert 'filename="careloop-outcomes-steps-20240601-20240630.csv"' in (
            r.headers["content-disposition"])
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert [(row["pathway"], row["step"]) for row in rows] == [
            (h.AR, "0"), (h.AR, "1"), (h.SV, "0"), (h.VF, "0")]
        first = rows[0]
        assert (first["sent"], first["delivered"], first["delivery_rate"]) == ("6", "5",
                                                                               "0.8333")
        assert (first["confirmations"], first["opt_outs"], first["rebookings_portal"]) == (
            "1", "1", "1")
        assert rows[2]["nps"] == "25.0"
        assert rows[3]["survey_mean_score"] == ""
        _no_identifiers(r.text)

    @pytest.mark.parametrize("table", ["appointments", "waitlist", "bookings"])
    def test_the_other_tables(self, client: TestClient, runtime: Runtime,
                              table: str) -> None:
        r = client.get("/console/outcomes.csv", params={**JUNE, "table": table},
                       headers=basic(runtime, "admin"))
        assert r.status_code == 200
        rows = list(csv.reader(io.StringIO(r.text)))
        assert len(rows) > 1
        _no_identifiers(r.text)

    def test_an_unknown_table(self, client: TestClient, runtime: Runtime) -> None:
        r = client.get("/console/outcomes.csv", params={**JUNE, "table": "patients"},
                       headers=basic(runtime, "admin"))
        assert (r.status_code, r.json()["code"]) == (400, "bad_request")


def test_rates_and_bars_as_drawn() -> None:
    from integration.outcomes.api import bar_chart, pct
    from integration.outcomes.report import Rate

    assert pct(Rate(5, 6)) == "83.3% (5 of 6)"
    assert pct(Rate(0, 0)) == "– (0 of 0)"
    chart = bar_chart("c", "t", "d", ("a", "b"), [("one", [(10, "10"), (5, "5")]),
                                                  ("two", [(0, "0"), (2.5, "2.5")])])
    widths = [[b.width for b in g.bars] for g in chart.groups]
    assert widths == [[400.0, 200.0], [0.0, 100.0]]
    scaled = bar_chart("c", "t", "d", ("rate",), [("x", [(25.0, "25%")])], scale=100.0)
    assert scaled.groups[0].bars[0].width == 100.0
