"""FHIR R4 over HTTP: an async client with SMART Backend Services, retries and paging.

The public surface, for ``integration`` (wiring) and ``subscriptions`` (planning):

* :class:`FHIRApi`, the port (``send``, ``pages``), and :class:`FHIRClient`, its httpx
  implementation; ``FHIRClient.connect(fhir_base=, client_id=, private_key=, scopes=)`` builds
  one for a ``[[connections]]`` entry. Requests are data (:class:`FHIRRequest`), answers
  :class:`FHIRResponse` / :class:`WriteResult`.
* :class:`SmartBackendAuth`, the ``httpx.Auth`` flow (discovery, private_key_jwt assertions,
  token cache, one re-authentication on 401), and :func:`build_client_assertion`.
* Keys for ``careloop keys generate``: :func:`generate_signing_key`, :func:`read_signing_key`,
  :func:`save_private_key`, :func:`jwks`, :func:`add_to_jwks`, :func:`remove_from_jwks`.
* Errors: :class:`FHIRError` (``status``, ``message``, ``outcome``), split into
  :class:`RetryableFHIRError` and :class:`FatalFHIRError` (:class:`AuthenticationError`,
  :class:`ResourceNotFound`, :class:`PreconditionFailed`, :class:`InvalidResponse`).
"""

from adapters.fhir.client import (
    FHIR_JSON,
    FHIRApi,
    FHIRClient,
    FHIRRequest,
    FHIRResponse,
    Params,
    RetryPolicy,
    WriteResult,
    bundle_resources,
    next_link,
)
from adapters.fhir.errors import (
    AuthenticationError,
    FatalFHIRError,
    FHIRError,
    InvalidResponse,
    PreconditionFailed,
    ResourceNotFound,
    RetryableFHIRError,
    outcome_text,
    parse_retry_after,
)
from adapters.fhir.keys import (
    SIGNING_ALGORITHMS,
    SigningKey,
    SigningKeyError,
    add_to_jwks,
    generate_signing_key,
    jwks,
    load_signing_key,
    read_signing_key,
    remove_from_jwks,
    save_private_key,
)
from adapters.fhir.smart import (
    ASSERTION_TYPE,
    AccessToken,
    SmartBackendAuth,
    build_client_assertion,
)

__all__ = [
    "ASSERTION_TYPE",
    "FHIR_JSON",
    "SIGNING_ALGORITHMS",
    "AccessToken",
    "AuthenticationError",
    "FHIRApi",
    "FHIRClient",
    "FHIRError",
    "FHIRRequest",
    "FHIRResponse",
    "FatalFHIRError",
    "InvalidResponse",
    "Params",
    "PreconditionFailed",
    "ResourceNotFound",
    "RetryPolicy",
    "RetryableFHIRError",
    "SigningKey",
    "SigningKeyError",
    "SmartBackendAuth",
    "WriteResult",
    "add_to_jwks",
    "build_client_assertion",
    "bundle_resources",
    "generate_signing_key",
    "jwks",
    "load_signing_key",
    "next_link",
    "outcome_text",
    "parse_retry_after",
    "read_signing_key",
    "remove_from_jwks",
    "save_private_key",
]
