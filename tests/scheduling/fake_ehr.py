"""A small stateful FHIR server behind respx, for the scheduling tests: reads with ETags,
searches for what the scheduling code asks (Schedule by actor or service type, free Slots in a
window, Appointments and Patients by identifier, Locations by id), conditional creates,
``If-Match`` updates (412, or 409 when told), atomic transaction Bundles, optional
``Appointment/$book``, a CapabilityStatement to taste, a request log and hooks to make things
happen between two requests (another patient taking the slot)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import respx

BASE = "https://ehr.example.org/fhir/R4"
JSON = dict[str, Any]
Hook = Callable[["FakeEHR", httpx.Request], httpx.Response | None]


def outcome(text: str, code: str = "processing") -> JSON:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "details": {"text": text}}]}


class _Fail(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass
class FakeEHR:
    transaction: bool = True
    book_operation: bool = False
    conflict_status: int = 412
    clock: datetime = datetime(2030, 1, 5, tzinfo=UTC)
    store: dict[str, dict[str, JSON]] = field(default_factory=dict)
    log: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    hooks: list[tuple[str, str, Hook]] = field(default_factory=list)
    _ids: int = 0

    # --- data ------------------------------------------------------------------------------

    def _stamp(self, resource: JSON, *, new: bool) -> JSON:
        self.clock += timedelta(seconds=1)
        meta = resource.setdefault("meta", {})
        old = int(meta.get("versionId") or 0) if not new else 0
        meta["versionId"] = str(old + 1)
        meta["lastUpdated"] = self.clock.isoformat().replace("+00:00", "Z")
        return resource

    def add(self, resource: JSON) -> JSON:
        """Store a resource as created (an id is given when it has none)."""
        resource = copy.deepcopy(resource)
        if not resource.get("id"):
            self._ids += 1
            resource["id"] = f"n{self._ids}"
        resource.pop("meta", None)
        self._stamp(resource, new=True)
        self.store.setdefault(resource["resourceType"], {})[resource["id"]] = resource
        return copy.deepcopy(resource)

    def get(self, ref: str) -> JSON:
        rtype, rid = ref.split("/")
        return copy.deepcopy(self.store[rtype][rid])

    def set(self, ref: str, **values: Any) -> JSON:
        """Change a stored resource as someone else would (a new version)."""
        rtype, rid = ref.split("/")
        resource = self.store[rtype][rid]
        resource.update(values)
        self._stamp(resource, new=False)
        return copy.deepcopy(resource)

    def all(self, rtype: str) -> list[JSON]:
        return [copy.deepcopy(r) for r in self.store.get(rtype, {}).values()]

    def writes(self) -> list[str]:
        """``METHOD path`` of each write request, in order."""
        return [f"{m} {p}" for m, p, _ in self.log if m in ("POST", "PUT", "DELETE")]

    def forget(self) -> None:
        """Clear the request log."""
        self.log.clear()
        self.bodies.clear()

    def sent(self, method: str, path: str) -> list[Any]:
        """The JSON bodies of the requests ``method path``, in order."""
        return [json.loads(self.bodies[n]) for n, (m, p, _) in enumerate(self.log)
                if (m, p) == (method, path)]

    def on(self, method: str, path: str, hook: Hook) -> None:
        """Run ``hook`` before the next request ``method path`` (once)."""
        self.hooks.append((method, path, hook))

    # --- HTTP ------------------------------------------------------------------------------

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = urlsplit(str(request.url)).path
        rel = path[len(urlsplit(BASE).path):].strip("/")
        self.log.append((request.method, rel, dict(request.headers)))
        self.bodies.append(request.content)
        for n, (method, where, hook) in enumerate(self.hooks):
            if method == request.method and where == rel:
                del self.hooks[n]
                answer = hook(self, request)
                if answer is not None:
                    return answer
                break
        try:
            return self._answer(request, rel)
        except _Fail as exc:
            return httpx.Response(exc.status, json=outcome(exc.text))

    def _answer(self, request: httpx.Request, rel: str) -> httpx.Response:
        parts = [p for p in rel.split("/") if p]
        body = json.loads(request.content) if request.content else None
        if request.method == "GET" and rel == "metadata":
            return httpx.Response(200, json=self.capabilities())
        if request.method == "POST" and not parts:
            return self._bundle(body)
        if request.method == "POST" and parts == ["Appointment", "$book"]:
            return self._book(body)
        if request.method == "GET" and len(parts) == 2:
            resource = self.store.get(parts[0], {}).get(parts[1])
            if resource is None:
                raise _Fail(404, f"{rel} not found")
            return _resource(200, resource)
        if request.method == "GET" and len(parts) == 1:
            return httpx.Response(200, json=self._search(parts[0], request))
        if request.method == "POST" and len(parts) == 1:
            status, resource = self._create(body, request.headers.get("if-none-exist"))
            return _resource(status, resource, location=True)
        if request.method == "PUT" and len(parts) == 2:
            status, resource = self._update(f"{parts[0]}/{parts[1]}", body,
                                            request.headers.get("if-match"))
            return _resource(status, resource)
        raise _Fail(400, f"unsupported {request.method} {rel}")

    def capabilities(self) -> JSON:
        appointment: JSON = {"type": "Appointment", "interaction": [{"code": "read"}]}
        if self.book_operation:
            appointment["operation"] = [{
                "name": "book",
                "definition": "http://fhir.org/guides/argonaut/scheduling/OperationDefinition/"
                              "appointment-book"}]
        rest: JSON = {"mode": "server", "resource": [appointment],
                      "interaction": [{"code": "batch"}]}
        if self.transaction:
            rest["interaction"].append({"code": "transaction"})
        return {"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
                "fhirVersion": "4.0.1", "format": ["json"], "rest": [rest]}

    def _create(self, resource: JSON, if_none_exist: str | None) -> tuple[int, JSON]:
        if if_none_exist:
            found = self._matching(resource["resourceType"], if_none_exist)
            if len(found) > 1:
                raise _Fail(412, "several match")
            if found:
                return 200, found[0]
        return 201, self.add(resource)

    def _matching(self, rtype: str, criteria: str) -> list[JSON]:
        params = dict(parse_qsl(criteria))
        wanted = params.get("identifier", "")
        system, _, value = wanted.rpartition("|")
        return [r for r in self.all(rtype)
                if any(i.get("system") == system and i.get("value") == value
                       for i in r.get("identifier") or [])]

    def _update(self, ref: str, resource: JSON, if_match: str | None) -> tuple[int, JSON]:
        rtype, rid = ref.split("/")
        current = self.store.get(rtype, {}).get(rid)
        if current is None:
            raise _Fail(404, f"{ref} not found")
        if if_match is not None:
            version = if_match.removeprefix("W/").strip('"')
            if version != current["meta"]["versionId"]:
                raise _Fail(self.conflict_status, f"{ref} has changed")
        stored = copy.deepcopy(resource)
        stored["id"] = rid
        stored["meta"] = dict(current["meta"])
        self._stamp(stored, new=False)
        self.store[rtype][rid] = stored
        return 200, copy.deepcopy(stored)

    def _bundle(self, bundle: JSON) -> httpx.Response:
        if bundle.get("type") != "transaction" or not self.transaction:
            raise _Fail(400, "transactions only here" if self.transaction
                        else "transactions are not supported")
        snapshot = copy.deepcopy(self.store)
        ids, clock = self._ids, self.clock
        entries = []
        try:
            for entry in bundle["entry"]:
                req = entry["request"]
                if req["method"] == "POST":
                    status, resource = self._create(entry["resource"], req.get("ifNoneExist"))
                elif req["method"] == "PUT":
                    status, resource = self._update(req["url"], entry["resource"],
                                                    req.get("ifMatch"))
                else:
                    raise _Fail(400, f"unsupported {req['method']} in a transaction")
                entries.append({"response": {
                    "status": str(status),
                    "location": f"{resource['resourceType']}/{resource['id']}/_history/"
                                f"{resource['meta']['versionId']}",
                    "etag": f'W/"{resource["meta"]["versionId"]}"'},
                    "resource": resource})
        except _Fail:
            self.store, self._ids, self.clock = snapshot, ids, clock
            raise
        return httpx.Response(200, json={"resourceType": "Bundle",
                                         "type": "transaction-response", "entry": entries})

    def _book(self, parameters: JSON) -> httpx.Response:
        if not self.book_operation:
            raise _Fail(404, "no $book here")
        proposed = next(p["resource"] for p in parameters["parameter"]
                        if p["name"] == "appt-resource")
        slot_ref = proposed["slot"][0]["reference"]
        slot = self.get(slot_ref)
        if slot["status"] != "free":
            raise _Fail(self.conflict_status, "the slot is taken")
        self.set(slot_ref, status="busy")
        appointment = self.add({**proposed, "status": "booked"})
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset",
                                         "entry": [{"resource": appointment}]})

    def _search(self, rtype: str, request: httpx.Request) -> JSON:
        params = parse_qsl(urlsplit(str(request.url)).query)
        found = self.all(rtype)
        for name, value in params:
            found = [r for r in found if _matches(r, name, value)]
        if ("_sort", "start") in params:
            found.sort(key=lambda r: r["start"])
        count = next((int(v) for k, v in params if k == "_count"), 50)
        return {"resourceType": "Bundle", "type": "searchset", "total": len(found),
                "entry": [{"resource": r, "search": {"mode": "match"}} for r in found[:count]]}


def _ref(reference: Any) -> str:
    return str((reference or {}).get("reference") or "")


def _matches(resource: JSON, name: str, value: str) -> bool:
    if name in ("_count", "_sort"):
        return True
    if name == "_id":
        return resource["id"] in value.split(",")
    if name == "actor":
        return any(_ref(a) in value.split(",") for a in resource.get("actor") or [])
    if name == "schedule":
        return _ref(resource.get("schedule")) in value.split(",")
    if name == "status":
        return resource.get("status") == value
    if name == "service-type":
        wanted = value.split(",")
        return any(f"{c.get('system')}|{c.get('code')}" in wanted or c.get("code") in wanted
                   for concept in resource.get("serviceType") or []
                   for c in concept.get("coding") or [])
    if name == "identifier":
        system, _, code = value.rpartition("|")
        return any(i.get("system") == system and i.get("value") == code
                   for i in resource.get("identifier") or [])
    if name == "start":
        prefix, when = value[:2], value[2:]
        start = resource.get("start", "")
        return start >= when if prefix == "ge" else start < when if prefix == "lt" else False
    raise AssertionError(f"the fake EHR does not search {name}")


def _resource(status: int, resource: JSON, *, location: bool = False) -> httpx.Response:
    headers = {"ETag": f'W/"{resource["meta"]["versionId"]}"'}
    if location:
        headers["Location"] = (f"{BASE}/{resource['resourceType']}/{resource['id']}/_history/"
                               f"{resource['meta']['versionId']}")
    return httpx.Response(status, json=resource, headers=headers)


def mocked(ehr: FakeEHR) -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        router.route(host="ehr.example.org").mock(side_effect=ehr)
        yield router
