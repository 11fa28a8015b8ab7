"""An async FHIR R4 REST client over httpx: retries, paging, conditional writes, operations.

:class:`FHIRApi` is the port the rest of careloop depends on (two methods: :meth:`send` one
request, :meth:`pages` of a search); :class:`FHIRClient` is the httpx implementation, with the
usual interactions on top (read, search, batched read, create, conditional create, update with
``If-Match``, delete, operations such as ``$status`` and ``$events``).

Requests are plain data (:class:`FHIRRequest`), so ``subscriptions`` can plan them without
touching the network and the caller executes them here.

Retries (:class:`RetryPolicy`): 408, 429, 500, 502, 503, 504 and transport errors are retried
with exponential backoff and full jitter, a bounded number of times. A ``Retry-After`` (seconds
or an HTTP date) is honoured: the wait is at least what the server asked, capped (30 s by
default) so one answer cannot stall a worker for an hour. Requests that are not idempotent (a
plain ``POST`` create) are retried only where the server cannot have acted on them: 429 and
503 (refused before processing) and connection failures before anything was sent; a dropped
connection or a 500 after a plain create could mean it was created, and a blind retry would
make a duplicate. Conditional create (``If-None-Exist``) is idempotent and retried freely.

Paging follows ``Bundle.link[relation=next]``; a next link that leaves the server's origin is
refused (the bearer token would go with it), and so is a link seen twice (a paging loop).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlencode, urlsplit

import httpx

from adapters.fhir.errors import (
    AuthenticationError,
    FatalFHIRError,
    FHIRError,
    InvalidResponse,
    RetryableFHIRError,
    error_from_response,
)
from adapters.fhir.keys import SigningKey, load_signing_key, read_signing_key
from adapters.fhir.smart import AccessToken, SmartBackendAuth

__all__ = [
    "FHIR_JSON",
    "FHIRApi",
    "FHIRClient",
    "FHIRRequest",
    "FHIRResponse",
    "Params",
    "RetryPolicy",
    "WriteResult",
    "bundle_resources",
    "next_link",
]

FHIR_JSON = "application/fhir+json"
Params = Mapping[str, str | int | Sequence[str]] | Sequence[tuple[str, str]]
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
# Refused before processing (RFC 9110 15.6.4 and RFC 6585 4): safe to repeat even a plain POST.
_NOT_PROCESSED = frozenset({429, 503})
_CONNECT_PHASE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _pairs(params: Params | None) -> tuple[tuple[str, str], ...]:
    if not params:
        return ()
    if isinstance(params, Mapping):
        out: list[tuple[str, str]] = []
        for key, value in params.items():
            if isinstance(value, str | int):
                out.append((key, str(value)))
            else:
                out.extend((key, str(v)) for v in value)
        return tuple(out)
    return tuple((str(k), str(v)) for k, v in params)


@dataclass(frozen=True)
class FHIRRequest:
    """One FHIR REST request as data.

    ``path`` is relative to the FHIR base (``Appointment``, ``Subscription/7/$events``) or an
    absolute URL on the same origin (a ``next`` link). ``body`` is JSON (a resource or
    Parameters); ``form`` a form-encoded body (``POST Type/_search``). ``retry_safe`` overrides
    whether the request may be repeated after an ambiguous failure (default: by method, and
    ``POST`` with ``If-None-Exist`` counts as idempotent).
    """

    method: str
    path: str
    params: tuple[tuple[str, str], ...] = ()
    body: Mapping[str, Any] | None = field(default=None, compare=False)
    headers: tuple[tuple[str, str], ...] = ()
    form: tuple[tuple[str, str], ...] = ()
    retry_safe: bool | None = None

    @classmethod
    def get(cls, path: str, params: Params | None = None) -> FHIRRequest:
        return cls("GET", path, _pairs(params))

    @classmethod
    def post(cls, path: str, body: Mapping[str, Any] | None = None, *,
             params: Params | None = None, headers: Mapping[str, str] | None = None,
             retry_safe: bool | None = None) -> FHIRRequest:
        return cls("POST", path, _pairs(params), body,
                   tuple((headers or {}).items()), retry_safe=retry_safe)

    def header(self, name: str) -> str | None:
        lname = name.lower()
        return next((v for k, v in self.headers if k.lower() == lname), None)

    @property
    def idempotent(self) -> bool:
        if self.retry_safe is not None:
            return self.retry_safe
        if self.method.upper() in _IDEMPOTENT_METHODS:
            return True
        path = urlsplit(self.path).path
        return (self.header("If-None-Exist") is not None or path.endswith("/_search")
                or path.startswith("_search"))


@dataclass(frozen=True)
class FHIRResponse:
    """A successful (< 400) answer: status, JSON body (``None`` when empty), headers, URL."""

    status: int
    body: Any
    headers: Mapping[str, str]
    url: str

    @property
    def resource(self) -> dict[str, Any]:
        """The body as a resource; :class:`InvalidResponse` if it is not one."""
        if not isinstance(self.body, dict) or "resourceType" not in self.body:
            raise InvalidResponse(self.status, f"{self.url}: expected a FHIR resource in the "
                                  "response body", url=self.url)
        return self.body

    @property
    def location(self) -> str | None:
        return self.headers.get("location") or self.headers.get("content-location")

    @property
    def version_id(self) -> str | None:
        """From ``ETag`` (``W/"3"`` → ``3``), else the body's meta.versionId."""
        etag = self.headers.get("etag")
        if etag:
            return etag.removeprefix("W/").strip('"')
        meta = self.body.get("meta") if isinstance(self.body, dict) else None
        vid = meta.get("versionId") if isinstance(meta, dict) else None
        return str(vid) if vid is not None else None


@dataclass(frozen=True)
class WriteResult:
    """The outcome of a create or update: ``created`` is true for 201 (false for a conditional
    create that found the resource already there, or an update of an existing one)."""

    status: int
    resource: dict[str, Any] | None
    location: str | None
    version_id: str | None

    @property
    def created(self) -> bool:
        return self.status == 201

    @property
    def id(self) -> str | None:
        if self.resource and self.resource.get("id"):
            return str(self.resource["id"])
        if self.location:
            parts = urlsplit(self.location).path.rstrip("/").split("/")
            if "_history" in parts:
                parts = parts[: parts.index("_history")]
            return parts[-1] if parts else None
        return None


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: at most ``attempts`` tries in all; the n-th wait is a uniform random
    fraction of ``min(max_delay_s, base_delay_s * 2**(n-1))`` (full jitter), and never less than
    a ``Retry-After``, which itself is capped at ``retry_after_cap_s``."""

    attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    retry_after_cap_s: float = 30.0

    def delay(self, attempt: int, retry_after: float | None, rng: Callable[[], float]) -> float:
        backoff = rng() * min(self.max_delay_s, self.base_delay_s * 2.0 ** (attempt - 1))
        if retry_after is None:
            return backoff
        return max(backoff, min(retry_after, self.retry_after_cap_s))


def next_link(bundle: Mapping[str, Any]) -> str | None:
    """The ``next`` link of a Bundle, if any."""
    for link in bundle.get("link") or []:
        if isinstance(link, Mapping) and link.get("relation") == "next" and link.get("url"):
            return str(link["url"])
    return None


@runtime_checkable
class FHIRApi(Protocol):
    """What careloop needs from a FHIR server: send one request, or walk a search's pages."""

    async def send(self, request: FHIRRequest) -> FHIRResponse:
        """Execute ``request`` (with retries); :class:`FHIRError` for a status of 400 or more."""
        ...

    def pages(self, request: FHIRRequest) -> AsyncIterator[dict[str, Any]]:
        """Each Bundle of a search or history, following ``next`` links."""
        ...


def _decode_json(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        # utf-8-sig: some servers (and files copied from Windows tools) start with a BOM.
        return json.loads(response.content.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidResponse(
            response.status_code,
            f"{response.request.method} {response.request.url}: HTTP {response.status_code} "
            f"with a body that is not JSON ({response.headers.get('content-type', 'no type')})",
            url=str(response.request.url)) from None


def _etag(version: str) -> str:
    version = version.strip()
    return version if version.startswith(('W/"', '"')) else f'W/"{version}"'


class FHIRClient:
    """The httpx implementation of :class:`FHIRApi`, with the common interactions on top.

    Build it with :meth:`connect` for an EHR with SMART Backend Services, or directly with any
    ``httpx.Auth`` (or none). Use it as an async context manager, or call :meth:`aclose`.
    """

    def __init__(
        self,
        fhir_base: str,
        *,
        auth: httpx.Auth | None = None,
        http: httpx.AsyncClient | None = None,
        retry: RetryPolicy | None = None,
        timeout_s: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        max_pages: int = 10_000,
        user_agent: str = "careloop",
    ) -> None:
        split = urlsplit(fhir_base)
        if split.scheme not in ("http", "https") or not split.netloc:
            raise ValueError(f"fhir_base {fhir_base!r} is not an http(s) URL")
        self.base = fhir_base.rstrip("/")
        self._origin = f"{split.scheme}://{split.netloc}".lower()
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout_s)
        self._auth = auth
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._rng = rng
        self._max_pages = max_pages
        self._user_agent = user_agent

    @classmethod
    def connect(
        cls,
        *,
        fhir_base: str,
        client_id: str,
        private_key: str | Path | bytes | SigningKey,
        scopes: Sequence[str],
        kid: str | None = None,
        token_url: str | None = None,
        on_token: Callable[[AccessToken], None] | None = None,
        **kwargs: Any,
    ) -> FHIRClient:
        """A client for one EHR connection (INTERFACE.md ``[[connections]]``): SMART Backend
        Services with the key at ``private_key`` (a PEM path, PEM bytes or a loaded key);
        ``on_token`` is told of each access token it obtains."""
        if isinstance(private_key, SigningKey):
            key = private_key
        elif isinstance(private_key, bytes):
            key = load_signing_key(private_key, kid=kid)
        else:
            key = read_signing_key(private_key, kid=kid)
        auth = SmartBackendAuth(fhir_base=fhir_base, client_id=client_id, key=key,
                                scopes=scopes, token_url=token_url, on_token=on_token)
        return cls(fhir_base, auth=auth, **kwargs)

    @property
    def auth(self) -> httpx.Auth | None:
        return self._auth

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> FHIRClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the port ---------------------------------------------------------------------------
    def url(self, path: str) -> str:
        """The absolute URL for ``path``; absolute URLs must stay on the server's origin."""
        split = urlsplit(path)
        if split.scheme or split.netloc:
            if f"{split.scheme}://{split.netloc}".lower() != self._origin:
                raise FatalFHIRError(None, f"refusing to follow {path}: it is not on "
                                     f"{self._origin} and the access token would go with it")
            return path
        return f"{self.base}/{path.lstrip('/')}"

    def _build(self, request: FHIRRequest) -> httpx.Request:
        headers = {"Accept": FHIR_JSON, "User-Agent": self._user_agent}
        headers.update(dict(request.headers))
        content: bytes | None = None
        if request.body is not None:
            content = json.dumps(request.body, separators=(",", ":")).encode()
            headers.setdefault("Content-Type", FHIR_JSON)
        elif request.form:
            content = urlencode(request.form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        url = self.url(request.path)
        return self._http.build_request(request.method.upper(), url, params=request.params or None,
                                        content=content, headers=headers)

    async def send(self, request: FHIRRequest) -> FHIRResponse:
        attempt = 0
        what = f"{request.method.upper()} {request.path}"
        while True:
            attempt += 1
            try:
                response = await self._http.send(self._build(request), auth=self._auth)
            except httpx.TransportError as exc:
                error: FHIRError = RetryableFHIRError(
                    None, f"{what}: {type(exc).__name__}: {exc or 'connection failed'}",
                    url=self.url(request.path))
                allowed = request.idempotent or isinstance(exc, _CONNECT_PHASE)
            except RetryableFHIRError as exc:  # from the auth flow (token endpoint busy)
                error, allowed = exc, True
            else:
                if response.status_code < 400:
                    return FHIRResponse(response.status_code, _decode_json(response),
                                        response.headers, str(response.request.url))
                error = error_from_response(response, what=what)
                if response.status_code == 401:
                    error = AuthenticationError(
                        401, f"{error.message} (after a fresh token: check the client's scopes "
                        "and registration)" if self._auth else error.message,
                        error.outcome, url=error.url)
                allowed = error.retryable and (request.idempotent
                                               or response.status_code in _NOT_PROCESSED)
            if not allowed or attempt >= self.retry.attempts:
                raise error
            await self._sleep(self.retry.delay(attempt, error.retry_after, self._rng))

    async def pages(self, request: FHIRRequest) -> AsyncIterator[dict[str, Any]]:
        seen: set[str] = set()
        current = request
        for _ in range(self._max_pages):
            bundle = (await self.send(current)).body
            if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                raise InvalidResponse(200, f"{current.method} {current.path}: expected a "
                                      "Bundle", url=self.url(current.path))
            yield bundle
            link = next_link(bundle)
            if link is None:
                return
            if link in seen:
                raise InvalidResponse(200, f"paging loop: next link {link} came back twice")
            seen.add(link)
            current = FHIRRequest.get(link)
        raise FatalFHIRError(None, f"{request.path}: more than {self._max_pages} pages; "
                             "narrow the search")

    # -- interactions -----------------------------------------------------------------------
    async def capabilities(self) -> dict[str, Any]:
        """``GET metadata`` (the CapabilityStatement)."""
        return (await self.send(FHIRRequest.get("metadata"))).resource

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """``GET Type/id``; :class:`ResourceNotFound` (``gone`` for 410) when absent."""
        return (await self.send(FHIRRequest.get(f"{resource_type}/{resource_id}"))).resource

    async def search(
        self, resource_type: str, params: Params | None = None, *, matches_only: bool = True,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every resource a search returns, over all pages. With ``matches_only`` (default),
        ``_include``d resources and OperationOutcome entries (search.mode include / outcome)
        are left out."""
        async for bundle in self.pages(FHIRRequest.get(resource_type, params)):
            for resource in bundle_resources(bundle, matches_only=matches_only):
                yield resource

    async def read_many(self, resource_type: str, ids: Iterable[str], *,
                        chunk_size: int = 50) -> dict[str, dict[str, Any]]:
        """Several resources of one type by id, ``chunk_size`` per ``GET Type?_id=a,b,c``
        search; ids the server does not return (deleted, never existed) are absent."""
        wanted = list(dict.fromkeys(i for i in ids if i))
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(wanted), chunk_size):
            chunk = wanted[start:start + chunk_size]
            params = {"_id": ",".join(chunk), "_count": str(len(chunk))}
            async for resource in self.search(resource_type, params):
                if resource.get("resourceType") == resource_type and resource.get("id"):
                    found[str(resource["id"])] = resource
        return found

    async def create(self, resource: Mapping[str, Any], *,
                     if_none_exist: str | Params | None = None) -> WriteResult:
        """``POST Type``; with ``if_none_exist`` (``identifier=sys|val`` or params) a
        conditional create: 201 when created, 200 with the match when it already existed,
        :class:`PreconditionFailed` when several match."""
        headers = {"Prefer": "return=representation"}
        if if_none_exist is not None:
            headers["If-None-Exist"] = (if_none_exist if isinstance(if_none_exist, str)
                                        else urlencode(_pairs(if_none_exist)))
        rtype = _resource_type(resource)
        response = await self.send(FHIRRequest.post(rtype, resource, headers=headers))
        return _write_result(response)

    async def update(self, resource: Mapping[str, Any], *,
                     if_match: str | bool | None = None) -> WriteResult:
        """``PUT Type/id``. ``if_match``: a version id (or ETag), or ``True`` for the resource's
        own meta.versionId; a stale version gives :class:`PreconditionFailed`."""
        rtype = _resource_type(resource)
        rid = resource.get("id")
        if not rid:
            raise ValueError(f"{rtype} has no id to update")
        headers = [("Prefer", "return=representation")]
        if if_match is True:
            meta = resource.get("meta") or {}
            if not meta.get("versionId"):
                raise ValueError(f"{rtype}/{rid} has no meta.versionId for If-Match")
            headers.append(("If-Match", _etag(str(meta["versionId"]))))
        elif isinstance(if_match, str):
            headers.append(("If-Match", _etag(if_match)))
        request = FHIRRequest("PUT", f"{rtype}/{rid}", body=resource, headers=tuple(headers))
        return _write_result(await self.send(request))

    async def delete(self, resource_type: str, resource_id: str) -> None:
        """``DELETE Type/id``."""
        await self.send(FHIRRequest("DELETE", f"{resource_type}/{resource_id}"))

    async def operation(
        self, name: str, *, resource_type: str | None = None, resource_id: str | None = None,
        params: Params | None = None, body: Mapping[str, Any] | None = None,
        method: str = "GET",
    ) -> dict[str, Any]:
        """An operation at system, type or instance level (``name`` with or without ``$``).
        Operations asked with GET, or POST carrying Parameters, are treated as retry-safe
        reads; use :meth:`send` for an operation with side effects."""
        op = name if name.startswith("$") else f"${name}"
        path = "/".join(p for p in (resource_type, resource_id, op) if p)
        request = FHIRRequest(method.upper(), path, _pairs(params), body, retry_safe=True)
        return (await self.send(request)).resource

    async def subscription_status(self, subscription_id: str) -> dict[str, Any]:
        """``GET Subscription/id/$status`` (a searchset of SubscriptionStatus)."""
        return await self.operation("$status", resource_type="Subscription",
                                    resource_id=subscription_id)

    async def subscription_events(self, subscription_id: str, *, since: int | None = None,
                                  until: int | None = None,
                                  content: str | None = None) -> dict[str, Any]:
        """``GET Subscription/id/$events`` for event numbers ``since``..``until``."""
        params: dict[str, str] = {}
        if since is not None:
            params["eventsSinceNumber"] = str(since)
        if until is not None:
            params["eventsUntilNumber"] = str(until)
        if content is not None:
            params["content"] = content
        return await self.operation("$events", resource_type="Subscription",
                                    resource_id=subscription_id, params=params)


def bundle_resources(bundle: Mapping[str, Any], *,
                     matches_only: bool = True) -> list[dict[str, Any]]:
    """The entry resources of a Bundle (see :meth:`FHIRClient.search`)."""
    out = []
    for entry in bundle.get("entry") or []:
        if not isinstance(entry, Mapping):
            continue
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            continue
        mode = (entry.get("search") or {}).get("mode")
        if matches_only and (mode in ("include", "outcome")
                             or (mode is None and resource.get("resourceType")
                                 == "OperationOutcome")):
            continue
        out.append(resource)
    return out


def _resource_type(resource: Mapping[str, Any]) -> str:
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise ValueError("the resource has no resourceType")
    return rtype


def _write_result(response: FHIRResponse) -> WriteResult:
    body = response.body if isinstance(response.body, dict) and \
        response.body.get("resourceType") not in (None, "OperationOutcome") else None
    return WriteResult(response.status, body, response.location, response.version_id)
