"""The HTTP API (FastAPI): HL7 v2 over HTTP, health, metrics.

Errors are JSON ``{"code": ..., "message": ...}`` with a stable ``code``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from integration.bodies import BodyRefused, read_limited
from integration.clients import Client
from integration.db import ping
from integration.fhir_notify import router as fhir_notify_router
from integration.keys import JWKSFile
from integration.logs import get_logger
from integration.oauth import OAuthError
from integration.portal.home import router as home_router
from integration.portal.offer import router as offer_router
from integration.portal.page import router as portal_router
from integration.replies.webhooks import router as replies_router
from integration.runtime import Runtime
from mappings.ack import AckCode

__all__ = ["ApiError", "create_app"]

log = get_logger("careloop.api")

HL7_MEDIA_TYPE = "application/hl7-v2"
ANONYMOUS = Client("anonymous", "authentication disabled", frozenset({"admin"}))


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


def require_scope(scope: str) -> Callable[[Request], Awaitable[Client]]:
    """A dependency that authenticates the caller and checks one scope.

    ``Authorization: Bearer <access token>`` (from ``POST /oauth/token``), or ``Basic`` with a
    client id and secret for interface engines that cannot do OAuth. 401 when the credentials
    are missing, wrong or expired; 403 when they are good but lack the scope.
    """

    async def dependency(request: Request) -> Client:
        runtime: Runtime = request.app.state.runtime
        if runtime.settings.auth == "disabled":
            return ANONYMOUS
        authorization = request.headers.get("authorization", "")
        scheme, _, value = authorization.partition(" ")
        scheme = scheme.lower()
        if not authorization:
            raise ApiError(401, "unauthenticated", "credentials are required", _CHALLENGE)
        if scheme == "bearer" and value.strip():
            found = await asyncio.to_thread(runtime.tokens.check_bearer, value.strip())
            if found is None:
                raise ApiError(
                    401, "invalid_token", "the access token is unknown, expired or revoked",
                    {"WWW-Authenticate": 'Bearer error="invalid_token"'},
                )
            client = found[0]
        elif scheme == "basic":
            basic = await asyncio.to_thread(runtime.clients.authenticate_basic, authorization)
            if basic is None:
                raise ApiError(401, "invalid_client", "unknown client or wrong secret",
                               _CHALLENGE)
            client = basic
        else:
            raise ApiError(401, "unauthenticated", "use a Bearer token or Basic credentials",
                           _CHALLENGE)
        if not client.allows(scope):
            raise ApiError(
                403, "insufficient_scope", f"this client lacks the {scope} scope",
                {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
            )
        request.state.client = client
        return client

    return dependency


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="careloop", Basic realm="careloop"'}


async def _read_body(request: Request, limit: int) -> bytes:
    try:
        return await read_limited(request, limit)
    except BodyRefused as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None


def create_app(runtime: Runtime, *, manage_runtime: bool = True) -> FastAPI:
    """The ASGI app. With ``manage_runtime`` its lifespan starts and stops ``runtime``."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_runtime:
            await runtime.start()
        try:
            yield
        finally:
            if manage_runtime:
                await runtime.stop()

    app = FastAPI(
        title="careloop",
        version="0.1.0",
        summary="FHIR-native integration middleware for patient engagement.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> Response:
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if request.url.path.startswith("/console"):
            from integration.console.render import ConsoleError, console_error  # noqa: PLC0415

            title = {404: "Not found", 405: "Not allowed here"}.get(exc.status_code, "Error")
            return console_error(request, ConsoleError(exc.status_code, title, str(exc.detail)))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.post(
        "/oauth/token",
        tags=["auth"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "required": ["grant_type"],
                            "properties": {
                                "grant_type": {"type": "string", "enum": ["client_credentials"]},
                                "scope": {"type": "string"},
                                "client_id": {"type": "string"},
                                "client_secret": {"type": "string"},
                                "client_assertion_type": {"type": "string"},
                                "client_assertion": {"type": "string"},
                            },
                        }
                    }
                },
            }
        },
        responses={
            200: {"description": "an access token"},
            400: {"description": "bad grant or scope (RFC 6749 error)"},
            401: {"description": "client authentication failed"},
        },
    )
    async def token(request: Request) -> Response:
        """OAuth 2.0 client credentials: ``client_secret_basic``, ``client_secret_post`` or
        ``private_key_jwt``. Form-encoded, as RFC 6749 requires."""
        body = await _read_body(request, 64 * 1024)
        try:
            form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8"), keep_blank_values=True)
                    .items()}
        except UnicodeDecodeError:
            form = {}
        try:
            issued = await asyncio.to_thread(
                runtime.tokens.issue, form, request.headers.get("authorization", "")
            )
        except OAuthError as exc:
            headers = {"Cache-Control": "no-store"}
            if exc.status == 401:
                headers["WWW-Authenticate"] = 'Basic realm="careloop"'
            return JSONResponse(
                {"error": exc.error, "error_description": exc.description,
                 "code": exc.error, "message": exc.description},
                status_code=exc.status, headers=headers,
            )
        return JSONResponse(
            issued.as_json(), headers={"Cache-Control": "no-store", "Pragma": "no-cache"}
        )

    jwks_file = JWKSFile(runtime.settings.keys_dir / "jwks.json")

    @app.get("/.well-known/jwks.json", tags=["auth"])
    async def jwks() -> Response:
        """careloop's public keys for SMART Backend Services (``careloop keys generate``)."""
        data = await asyncio.to_thread(jwks_file.read)
        return JSONResponse(data, headers={"Cache-Control": "public, max-age=300"})

    @app.get("/health/live", tags=["ops"])
    async def live() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/health/ready", tags=["ops"])
    async def ready() -> Response:
        """The database (and the broker, when configured) answer."""
        checks: dict[str, str] = {}
        ok = True
        try:
            await _in_thread(ping, runtime.engine)
            checks["database"] = "ok"
        except Exception as exc:
            ok = False
            checks["database"] = f"error: {type(exc).__name__}"
        check_broker = getattr(runtime.dispatcher, "ping", None)
        if check_broker is not None:
            try:
                await _in_thread(check_broker)
                checks["broker"] = "ok"
            except Exception as exc:
                ok = False
                checks["broker"] = f"error: {type(exc).__name__}"
        body = {"status": "ok" if ok else "unavailable", "checks": checks}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        """Prometheus metrics."""
        data = await _in_thread(generate_latest)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/hl7v2",
        tags=["hl7"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "One or more HL7 v2 messages in ER7 (batches allowed).",
                "content": {
                    "application/hl7-v2": {"schema": {"type": "string"}},
                    "text/plain": {"schema": {"type": "string"}},
                },
            }
        },
        responses={
            200: {"description": "every message stored and accepted (AA/CA)"},
            400: {"description": "a message could not be read (AR); fix and resend"},
            413: {"description": "the body is larger than the limit"},
            422: {"description": "stored, but the content has an error (AE); replayable"},
            503: {"description": "could not be stored; nothing was kept, resend later"},
        },
    )
    async def post_hl7v2(
        request: Request,
        client: Annotated[Client, Depends(require_scope("hl7.write"))],
    ) -> Response:
        """Take one or more HL7 v2 messages (ER7; batches allowed) and answer with their ACKs.

        Each message is stored before the answer; a message sent again (same MSH-3, MSH-4 and
        MSH-10) is acknowledged AA and not processed twice.
        """
        body = await _read_body(request, runtime.settings.http_max_body_bytes)
        peer = client.client_id
        receipts = await runtime.receive_body(body, "http", peer)
        codes = {r.code for r in receipts}
        if any(r.unavailable for r in receipts):
            status = 503
        elif codes & {AckCode.AR, AckCode.CR}:
            status = 400
        elif AckCode.AE in codes:
            status = 422
        else:
            status = 200
        content = b"".join(b for r in receipts if (b := r.ack_bytes()) is not None)
        headers = {"Retry-After": "5"} if status == 503 else None
        return Response(content, status_code=status, media_type=HL7_MEDIA_TYPE, headers=headers)

    # patients_api depends on require_scope above: imported here to avoid an import cycle.
    from integration.console.render import ConsoleError, console_error  # noqa: PLC0415
    from integration.console.routes import router as console_router  # noqa: PLC0415
    from integration.outcomes.api import router as outcomes_router  # noqa: PLC0415
    from integration.patients_api import router as patients_router  # noqa: PLC0415

    app.include_router(patients_router)
    app.include_router(fhir_notify_router)
    app.include_router(home_router)  # "p" links, then "o" links, before page.router's "t"
    app.include_router(offer_router)
    app.include_router(portal_router)
    app.include_router(replies_router)
    app.include_router(outcomes_router)
    app.include_router(console_router)
    app.add_exception_handler(ConsoleError, console_error)  # type: ignore[arg-type]
    return app


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)
