"""How every console page is answered: one Jinja2 environment, one style sheet, the security
headers, and HTML error pages (:class:`ConsoleError`: a redirect to sign in, 403, 404).

The pages run no JavaScript and load nothing from outside: the only inline style sheet is
allowed by its hash in the Content-Security-Policy, charts are inline SVG
(:mod:`integration.console.charts`), and pages that follow work in progress (a replay) reload
themselves with ``<meta http-equiv="refresh">``.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

__all__ = ["CSS", "HEADERS", "MAX_ROW_ID", "ConsoleError", "console_error", "env", "render"]

CSS = """
:root{color-scheme:light;font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
body{margin:0;color:#1a1a1a;background:#fff;line-height:1.45}
header,main,nav{max-width:76rem;margin:0 auto;padding:0 1rem}
header{display:flex;flex-wrap:wrap;justify-content:space-between;align-items:center;
 border-bottom:1px solid #d0d0d0}
nav ul{display:flex;flex-wrap:wrap;gap:.2rem 1rem;list-style:none;margin:.4rem 0;padding:0}
nav a{display:inline-block;padding:.3rem 0}nav a[aria-current=page]{font-weight:700}
h1{font-size:1.6rem;margin:.6rem 0}h2{font-size:1.2rem;margin:1.4rem 0 .4rem}
label{display:block;font-weight:600;margin:.6rem 0 .2rem}
input,button,select,textarea{font:inherit;padding:.35rem .5rem;min-height:2.2rem;max-width:100%}
button{background:#0b4f8a;color:#fff;border:1px solid #0b4f8a;border-radius:4px;cursor:pointer}
button.secondary{background:#fff;color:#0b4f8a}
a{color:#0b4f8a}
a:focus,button:focus,input:focus,select:focus,textarea:focus{outline:3px solid #f2a900;
 outline-offset:2px}
.error{color:#b50909;font-weight:600}.note{color:#444;font-size:.9rem}.ok{color:#1d6b2f}
.figures{display:flex;flex-wrap:wrap;gap:.75rem;padding:0;list-style:none}
.figures li{border:1px solid #d0d0d0;border-radius:6px;padding:.5rem .8rem;min-width:9rem}
.figures strong{display:block;font-size:1.4rem}
.grid{display:flex;flex-wrap:wrap;gap:0 2rem}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.95rem}
th,td{border:1px solid #d0d0d0;padding:.3rem .6rem;text-align:right;vertical-align:top}
th[scope=row],th.text,td.text{text-align:left}
caption{text-align:left;font-weight:600;padding:.3rem 0}
pre{background:#f5f5f5;border:1px solid #d0d0d0;padding:.6rem;overflow-x:auto;
 white-space:pre-wrap;word-break:break-all;font-size:.85rem}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem}
dl.meta dt{font-weight:600}dl.meta dd{margin:0;word-break:break-word}
form.filters{display:flex;flex-wrap:wrap;gap:.2rem 1rem;align-items:flex-end}
form.filters label{margin:.3rem 0 .1rem}form.inline{display:inline}
.badge{display:inline-block;padding:0 .4rem;border-radius:3px;border:1px solid #888;
 font-size:.85rem}
.status-failed,.status-rejected,.status-dead{border-color:#b50909;color:#b50909}
.status-processed,.status-sent,.status-written,.status-delivered{border-color:#1d6b2f;
 color:#1d6b2f}
.pager{display:flex;gap:1rem;margin:.5rem 0}
.chart{display:block;max-width:100%;height:auto}
.chart rect.bar{fill:#0b4f8a}.chart rect.bar.bad{fill:#b50909}
.chart line.axis{stroke:#888;stroke-width:1}
.chart text{font-size:10px;fill:#444}
figure{margin:.5rem 0 1rem}figcaption{font-weight:600;font-size:.95rem}
progress{width:100%;max-width:30rem;height:1.2rem}
details summary{cursor:pointer;font-size:.9rem;color:#0b4f8a}
td code{word-break:break-all;font-size:.85rem}ul.sources{margin:0;padding-left:1rem}
.id{word-break:break-all}
"""
CSS_HASH = base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()
HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (f"default-src 'none'; style-src 'sha256-{CSS_HASH}'; "
                                "img-src 'self' data:; form-action 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'"),
}
LOGIN_PATH = "/console/login"
MAX_ROW_ID = 2**63 - 1
"""The largest row id a table can hold: a larger number in a URL names no row (404), rather
than overflowing the database driver."""

env = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment is not None else "-"


env.filters["age"] = _age
env.filters["when"] = _when


def render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    """A template as an HTML response with the console's headers. ``session`` (the signed-in
    person's) fills the header and navigation; ``active`` names the current navigation item."""
    context.setdefault("session", None)
    context.setdefault("active", "")
    session = context["session"]
    if session is not None:
        context.setdefault("csrf", session.csrf)
    html = env.get_template(name).render(css=Markup(CSS), **context)  # noqa: S704 - a constant
    return HTMLResponse(html, status_code=status, headers=HEADERS)


class ConsoleError(Exception):
    """A console request that cannot be served: answered as an HTML page (or a redirect to the
    sign-in page when ``status`` is 303)."""

    def __init__(self, status: int, title: str, message: str = "") -> None:
        super().__init__(message or title)
        self.status = status
        self.title = title
        self.message = message


def console_error(request: Request, exc: ConsoleError) -> Response:
    if exc.status == 303:
        return RedirectResponse(LOGIN_PATH, status_code=303, headers=HEADERS)
    session = getattr(request.state, "console_session", None)
    return render("error.html", exc.status, session=session, title=exc.title,
                  message=exc.message)
