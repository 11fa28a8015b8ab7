"""Booking a free slot in an EHR (and cancelling the appointment it replaces), over FHIR R4.

Three ways, by what the server's CapabilityStatement offers (:class:`~integration.scheduling.
slots.Capabilities`):

* ``book-operation``: ``POST Appointment/$book`` (Argonaut Scheduling) with the proposed
  Appointment (``appt-resource``: the slot, the participants, the service) — the server books
  the slot itself; then the old appointment is cancelled and its slot freed as below.
* ``transaction``: one ``transaction`` Bundle, all or nothing: ``PUT`` the Slot ``busy``
  (``ifMatch`` its version), ``POST`` the new Appointment (conditional on its booking
  identifier), ``PUT`` the old Appointment ``cancelled`` (reason ``pat``, ``ifMatch``) and, when
  it held a Slot, ``PUT`` that Slot ``free`` (``ifMatch``).
* ``ordered``: the same writes one by one in an order that never leaves the patient without an
  appointment, nor with two for long: the Slot ``busy`` (``If-Match``) → the new Appointment
  (``If-None-Exist``) → the old one ``cancelled`` (``If-Match``) → its Slot ``free``. If the new
  Appointment cannot be created the Slot is put back to ``free``. A cancel or free that fails
  is left to the write-back outbox (a :class:`Repair`), which retries it.

A ``409`` or ``412`` (the slot taken meanwhile, a stale version) reads the slot and the old
appointment again: a slot no longer free is a :class:`SlotConflict`; an old appointment no
longer active is :class:`NoLongerActive`; otherwise (something else changed a version) the
booking is tried again with the fresh versions. Before any of that, and after any error that
leaves the outcome unknown (a timeout, a dropped connection), the EHR is asked for an
Appointment carrying this booking's identifier (``urn:careloop:booking|<id>``): one found means
this booking (an earlier try of it) went through, and it is completed rather than repeated.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from adapters.fhir import FHIRApi, FHIRRequest, FHIRResponse
from adapters.fhir.errors import (
    FatalFHIRError,
    FHIRError,
    ResourceNotFound,
    RetryableFHIRError,
)
from integration.scheduling.slots import (
    SCHEDULE_ACTOR_TYPES,
    Capabilities,
    FreeSlot,
    fhir_time,
    ref_of,
    slot_refs,
)
from integration.writeback.resources import APPOINTMENT_CANCELLATION_REASON

__all__ = [
    "ACTIVE_STATUSES",
    "BOOKING_SYSTEM",
    "CANCEL_CHANGE",
    "Booked",
    "BookingError",
    "BookingOutcome",
    "BookingRequest",
    "NoLongerActive",
    "Repair",
    "SlotConflict",
    "book",
    "cancelled",
    "find_booked",
    "method_for",
    "new_appointment",
    "participants",
    "transaction_bundle",
    "with_status",
]

JSON = dict[str, Any]

BOOKING_SYSTEM = "urn:careloop:booking"
"""The identifier system of the Appointments careloop books; the value is the bookings row id."""

ACTIVE_STATUSES = frozenset({"proposed", "pending", "booked", "arrived", "checked-in",
                             "waitlist"})
CANCELLATION_REASON: JSON = {"coding": [{"system": APPOINTMENT_CANCELLATION_REASON,
                                         "code": "pat", "display": "Patient"}]}
CANCEL_CHANGE: JSON = {"status": "cancelled", "cancelationReason": CANCELLATION_REASON}
"""The write-back outbox change spec that cancels an Appointment (as the patient)."""
_CONFLICT = frozenset({409, 412})
_COPIED = ("serviceCategory", "serviceType", "specialty", "appointmentType", "reasonCode",
           "priority")
_ATTEMPTS = 3


@dataclass
class BookingOutcome:
    """What :meth:`~integration.scheduling.SchedulingService.rebook` did."""

    status: str
    """booked | conflict | failed | requested"""
    booking_id: int | None
    appointment_ref: str | None
    """the new (or updated) Appointment in the EHR"""
    start: datetime | None
    alternatives: list[FreeSlot] = field(default_factory=list)
    """the next choices after a conflict (never an error page)"""
    message: str = ""
    """short, for logs and the page; never patient data"""


class BookingError(Exception):
    """The EHR refused or could not take the booking; nothing is left half done (a slot taken
    for it was put back, or a :class:`Repair` is owed). ``message`` is short and safe to show;
    ``detail`` is the server's answer, for the bookings row."""

    def __init__(self, message: str, detail: str = "", repairs: list[Repair] | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail or message
        self.repairs = list(repairs or [])


class NoLongerActive(BookingError):
    """The appointment to replace was cancelled, fulfilled or removed meanwhile."""


class SlotConflict(Exception):
    """The slot is no longer free (someone else booked it, or it was withdrawn)."""

    def __init__(self, slot_ref: str, detail: str = ""):
        super().__init__(f"{slot_ref} is no longer free")
        self.slot_ref = slot_ref
        self.detail = detail or f"{slot_ref} is no longer free"


@dataclass(frozen=True)
class Repair:
    """A write the booking could not finish, owed through the write-back outbox as an
    ``update`` (key ``booking-<id>-<what>``)."""

    what: str
    """cancel-old | free-old-slot | revert-slot"""
    resource_type: str
    target: str
    change: JSON


@dataclass(frozen=True)
class BookingRequest:
    """Everything one booking writes, as read from the EHR just before."""

    booking_id: int
    slot: JSON
    """the Slot to book, as read (``status`` free when bookable)"""
    patient: JSON
    """the Reference to the patient in this EHR"""
    schedule: JSON | None = None
    """the Slot's Schedule (its actors become participants)"""
    old: JSON | None = None
    """the Appointment it replaces, as read"""
    old_slot: JSON | None = None
    """the Slot ``old`` holds, as read"""

    @property
    def slot_ref(self) -> str:
        return f"Slot/{self.slot['id']}"

    @property
    def old_ref(self) -> str | None:
        return f"Appointment/{self.old['id']}" if self.old else None

    @property
    def identifier(self) -> JSON:
        return {"system": BOOKING_SYSTEM, "value": str(self.booking_id)}


@dataclass
class Booked:
    """A booking that went through."""

    method: str
    """transaction | book-operation | ordered"""
    appointment: JSON
    """the new Appointment as the EHR has it"""
    old: JSON | None = None
    """the old Appointment as the EHR has it now (cancelled), when it was cancelled"""
    repairs: list[Repair] = field(default_factory=list)

    @property
    def appointment_ref(self) -> str:
        return f"Appointment/{self.appointment['id']}"


# --- resources ------------------------------------------------------------------------------


def _version(resource: Mapping[str, Any] | None) -> str | None:
    meta = resource.get("meta") if resource else None
    vid = meta.get("versionId") if isinstance(meta, Mapping) else None
    return str(vid) if vid else None


def _etag(resource: Mapping[str, Any]) -> str | None:
    vid = _version(resource)
    return f'W/"{vid}"' if vid else None


def with_status(resource: Mapping[str, Any], status: str) -> JSON:
    """A copy of a Slot (or Appointment) with another ``status``."""
    out = copy.deepcopy(dict(resource))
    out["status"] = status
    return out


def cancelled(appointment: Mapping[str, Any]) -> JSON:
    """A copy of an Appointment cancelled by the patient (reason ``pat``)."""
    out = copy.deepcopy(dict(appointment))
    out["status"] = "cancelled"
    out["cancelationReason"] = copy.deepcopy(CANCELLATION_REASON)
    return out


def _actor_ref(participant: Mapping[str, Any]) -> str | None:
    return ref_of(participant.get("actor"))


def participants(old: Mapping[str, Any] | None, patient: Mapping[str, Any],
                 schedule: Mapping[str, Any] | None) -> list[JSON]:
    """The new appointment's participants: the old appointment's (the patient ``accepted``, the
    others as they were), except that a practitioner, location or service the new slot's
    Schedule does not have gives way to the Schedule's own of the same type; the Schedule's
    actors not yet there join (``accepted``). Without an old appointment: the patient and the
    Schedule's actors."""
    actors = [a for a in (schedule or {}).get("actor") or [] if isinstance(a, Mapping)]
    actor_refs = {r for r in (ref_of(a) for a in actors) if r}
    actor_types = {r.split("/", 1)[0] for r in actor_refs}
    out: list[JSON] = []
    replaced: dict[str, str] = {}
    have: set[str] = set()
    patient_seen = False
    for p in (old or {}).get("participant") or []:
        if not isinstance(p, Mapping):
            continue
        ref = _actor_ref(p)
        kind = ref.split("/", 1)[0] if ref else ""
        item = copy.deepcopy(dict(p))
        if kind == "Patient":
            item["status"] = "accepted"
            patient_seen = True
        elif (kind in SCHEDULE_ACTOR_TYPES and ref not in actor_refs and kind in actor_types):
            replaced.setdefault(kind, str(p.get("status") or "accepted"))
            continue
        out.append(item)
        if ref:
            have.add(ref)
    if not patient_seen:
        out.insert(0, {"actor": copy.deepcopy(dict(patient)), "status": "accepted"})
    for actor in actors:
        ref = ref_of(actor)
        if ref is None or ref in have or ref.split("/", 1)[0] not in SCHEDULE_ACTOR_TYPES:
            continue
        have.add(ref)
        reference: JSON = {"reference": ref}
        if isinstance(actor.get("display"), str):
            reference["display"] = actor["display"]
        out.append({"actor": reference,
                    "status": replaced.get(ref.split("/", 1)[0], "accepted")})
    return out


def new_appointment(request: BookingRequest, *, status: str = "booked",
                    created: datetime | None = None) -> JSON:
    """The Appointment a booking creates: the slot's times and reference, the old
    appointment's service, type and reasons (else the slot's service type), the participants
    (:func:`participants`) and the booking identifier."""
    slot, old = request.slot, request.old or {}
    appointment: JSON = {
        "resourceType": "Appointment",
        "identifier": [dict(request.identifier)],
        "status": status,
    }
    for name in _COPIED:
        if old.get(name):
            appointment[name] = copy.deepcopy(old[name])
    if not appointment.get("serviceType") and slot.get("serviceType"):
        appointment["serviceType"] = copy.deepcopy(slot["serviceType"])
    if not appointment.get("serviceType") and (request.schedule or {}).get("serviceType"):
        appointment["serviceType"] = copy.deepcopy((request.schedule or {})["serviceType"])
    appointment["start"] = slot["start"]
    appointment["end"] = slot["end"]
    appointment["slot"] = [{"reference": request.slot_ref}]
    if created is not None:
        appointment["created"] = fhir_time(created)[:10]
    appointment["participant"] = participants(request.old, request.patient, request.schedule)
    return appointment


def transaction_bundle(request: BookingRequest, *, created: datetime | None = None) -> JSON:
    """The all-or-nothing booking: new Slot busy, new Appointment, old one cancelled, old Slot
    free (each version-checked; the Appointment conditional on its identifier)."""
    entries: list[JSON] = [
        _put(with_status(request.slot, "busy"), request.slot),
        {"fullUrl": f"urn:uuid:{uuid.uuid4()}",
         "resource": new_appointment(request, created=created),
         "request": {"method": "POST", "url": "Appointment",
                     "ifNoneExist": f"identifier={BOOKING_SYSTEM}|{request.booking_id}"}},
    ]
    if request.old is not None and request.old.get("status") != "cancelled":
        entries.append(_put(cancelled(request.old), request.old))
    if request.old_slot is not None and request.old_slot.get("status") != "free":
        entries.append(_put(with_status(request.old_slot, "free"), request.old_slot))
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _put(resource: JSON, current: Mapping[str, Any]) -> JSON:
    ref = f"{resource['resourceType']}/{resource['id']}"
    req: JSON = {"method": "PUT", "url": ref}
    etag = _etag(current)
    if etag:
        req["ifMatch"] = etag
    return {"resource": resource, "request": req}


def method_for(capabilities: Capabilities) -> str:
    if capabilities.book:
        return "book-operation"
    if capabilities.transaction:
        return "transaction"
    return "ordered"


# --- talking to the EHR ---------------------------------------------------------------------

_PREFER = ("Prefer", "return=representation")


async def _read(api: FHIRApi, ref: str) -> JSON:
    return (await api.send(FHIRRequest.get(ref))).resource


async def _put_resource(api: FHIRApi, resource: JSON, current: Mapping[str, Any]) -> JSON:
    ref = f"{resource['resourceType']}/{resource['id']}"
    headers = [_PREFER]
    etag = _etag(current)
    if etag:
        headers.append(("If-Match", etag))
    response = await api.send(FHIRRequest("PUT", ref, body=resource, headers=tuple(headers)))
    return await _written(api, response, ref)


async def _written(api: FHIRApi, response: FHIRResponse, ref: str | None) -> JSON:
    """The resource a write answered with, or read back (``Prefer`` ignored)."""
    body = response.body
    if isinstance(body, dict) and body.get("resourceType") not in (None, "OperationOutcome"):
        return body
    where = _location_ref(response.location) or ref
    if where is None:
        raise BookingError("the EHR did not say what it wrote",
                           f"{response.url}: HTTP {response.status} without a resource or "
                           "Location")
    return await _read(api, where)


def _location_ref(location: str | None) -> str | None:
    if not location:
        return None
    parts = [p for p in location.split("?", 1)[0].split("/") if p]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return f"{parts[-2]}/{parts[-1]}" if len(parts) >= 2 else None


async def find_booked(api: FHIRApi, booking_id: int) -> JSON | None:
    """The Appointment this booking created, if an earlier try of it went through."""
    request = FHIRRequest.get("Appointment", [
        ("identifier", f"{BOOKING_SYSTEM}|{booking_id}"), ("_count", "2")])
    response = await api.send(request)
    body = response.body if isinstance(response.body, Mapping) else {}
    for entry in body.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, Mapping) else None
        if (isinstance(resource, dict) and resource.get("resourceType") == "Appointment"
                and resource.get("status") not in ("cancelled", "entered-in-error")):
            return resource
    return None


async def refresh(api: FHIRApi, request: BookingRequest) -> BookingRequest:
    """The request with the Slot, the old Appointment and its Slot read again."""
    async def maybe(ref: str | None) -> JSON | None:
        if ref is None:
            return None
        try:
            return await _read(api, ref)
        except ResourceNotFound:
            return None

    old_ref = request.old_ref
    slot, old = await asyncio.gather(maybe(request.slot_ref), maybe(old_ref))
    old_slot_ref = _old_slot_ref(old) if old is not None else None
    old_slot = await maybe(old_slot_ref)
    if old is None and request.old is not None:
        old = with_status(request.old, "entered-in-error")  # deleted meanwhile
    return replace(request, slot=slot or with_status(request.slot, "entered-in-error"),
                   old=old, old_slot=old_slot)


def _old_slot_ref(old: Mapping[str, Any]) -> str | None:
    refs = slot_refs(old)
    return refs[0] if refs else None


def _check(request: BookingRequest) -> None:
    """Raise when the booking cannot go ahead as it stands."""
    if request.old is not None and request.old.get("status") not in ACTIVE_STATUSES:
        raise NoLongerActive("the appointment is no longer active",
                             f"{request.old_ref} is {request.old.get('status')}")
    if request.slot.get("status") != "free":
        raise SlotConflict(request.slot_ref,
                           f"{request.slot_ref} is {request.slot.get('status')}")


async def book(api: FHIRApi, request: BookingRequest, capabilities: Capabilities, *,
               now: datetime | None = None) -> Booked:
    """Book ``request`` by the best way the server offers (module docstring).

    Raises :class:`SlotConflict` (the slot is taken), :class:`NoLongerActive` or
    :class:`BookingError` (refused, or the EHR unreachable; nothing half done but the
    :class:`Repair` rows it carries)."""
    method = method_for(capabilities)
    flows = {"transaction": _by_transaction, "book-operation": _by_operation,
             "ordered": _by_ordered_writes}
    last: FHIRError | None = None
    for _ in range(_ATTEMPTS):
        try:
            _check(request)
        except (SlotConflict, NoLongerActive):
            found = await _found(api, request)
            if found is not None:
                return await _complete(api, request, found, method)
            raise
        try:
            return await flows[method](api, request, now)
        except FHIRError as exc:
            last = exc
            found = await _found(api, request)
            if found is not None:
                return await _complete(api, request, found, method)
            if _unknown(exc):
                raise BookingError("the EHR could not be reached", exc.message) from exc
            request = await refresh(api, request)
            if exc.status not in _CONFLICT:
                # refused outright: because the slot was taken meanwhile? else it is the answer
                _check(request)
                raise BookingError("the EHR refused the booking", exc.message) from exc
    assert last is not None
    _check(request)
    raise SlotConflict(request.slot_ref, last.message)


def _unknown(exc: FHIRError) -> bool:
    """The request may or may not have been carried out (no answer, a server error)."""
    return isinstance(exc, RetryableFHIRError) or exc.status is None


async def _found(api: FHIRApi, request: BookingRequest) -> JSON | None:
    try:
        return await find_booked(api, request.booking_id)
    except FHIRError:
        return None


async def _complete(api: FHIRApi, request: BookingRequest, appointment: JSON,
                    method: str) -> Booked:
    """An earlier try of this booking created ``appointment``: finish what it may have left
    (the old appointment cancelled, its slot freed)."""
    old, repairs = await _cancel_and_free(api, request,
                                          reread_slot=method == "book-operation")
    return Booked(method, appointment, old, repairs)


# --- the three ways ---------------------------------------------------------------------------


async def _by_transaction(api: FHIRApi, request: BookingRequest,
                          now: datetime | None) -> Booked:
    bundle = transaction_bundle(request, created=now)
    response = await api.send(FHIRRequest("POST", "", body=bundle, headers=(_PREFER,),
                                          retry_safe=True))
    body = response.body
    entries = body.get("entry") if isinstance(body, Mapping) else None
    if not isinstance(entries, list) or len(entries) != len(bundle["entry"]):
        raise BookingError("the EHR answered the booking with something unexpected",
                           "the transaction-response does not match the transaction")
    results: list[JSON] = []
    for sent, entry in zip(bundle["entry"], entries, strict=True):
        answer = entry.get("response") if isinstance(entry, Mapping) else None
        answer = answer if isinstance(answer, Mapping) else {}
        status = str(answer.get("status") or "").split(" ", 1)[0]
        if not status.startswith("2"):
            # a server that answers a failed transaction entry by entry: same as a whole 4xx
            code = int(status) if status.isdigit() else None
            raise FatalFHIRError(code, f"transaction entry {sent['request']['method']} "
                                 f"{sent['request']['url']}: HTTP {answer.get('status')}")
        resource = entry.get("resource") if isinstance(entry, Mapping) else None
        if isinstance(resource, dict) and resource.get("resourceType"):
            results.append(resource)
        else:
            where = _location_ref(answer.get("location")) or (
                sent["request"]["url"] if sent["request"]["method"] == "PUT" else None)
            if where is None:
                raise BookingError("the EHR did not say what it wrote",
                                   "a transaction entry without a resource or location")
            results.append(await _read(api, where))
    appointment = results[1]
    old = next((r for r in results[2:] if r.get("resourceType") == "Appointment"), None)
    return Booked("transaction", appointment, old)


async def _by_operation(api: FHIRApi, request: BookingRequest,
                        now: datetime | None) -> Booked:
    proposed = new_appointment(request, status="proposed", created=now)
    parameters = {"resourceType": "Parameters",
                  "parameter": [{"name": "appt-resource", "resource": proposed}]}
    response = await api.send(FHIRRequest.post("Appointment/$book", parameters,
                                                headers=dict([_PREFER])))
    appointment = _booked_appointment(response.body)
    if appointment is None:
        raise BookingError("the EHR answered the booking with something unexpected",
                           "Appointment/$book returned no Appointment")
    if appointment.get("status") not in ("booked", "pending", "arrived", "checked-in"):
        raise BookingError("the EHR did not book the appointment",
                           f"Appointment/$book answered status {appointment.get('status')}")
    old, repairs = await _cancel_and_free(api, request, reread_slot=True)
    return Booked("book-operation", appointment, old, repairs)


def _booked_appointment(body: object) -> JSON | None:
    if not isinstance(body, dict):
        return None
    if body.get("resourceType") == "Appointment" and body.get("id"):
        return body
    if body.get("resourceType") == "Bundle":
        for entry in body.get("entry") or []:
            found = _booked_appointment(entry.get("resource") if isinstance(entry, dict)
                                        else None)
            if found is not None:
                return found
    if body.get("resourceType") == "Parameters":
        for parameter in body.get("parameter") or []:
            if isinstance(parameter, dict) and parameter.get("name") in ("return",
                                                                        "appointment"):
                found = _booked_appointment(parameter.get("resource"))
                if found is not None:
                    return found
    return None


async def _by_ordered_writes(api: FHIRApi, request: BookingRequest,
                             now: datetime | None) -> Booked:
    # 1. the slot: a 409/412 here is the conflict (raised to book(), which decides)
    busy = await _put_resource(api, with_status(request.slot, "busy"), request.slot)
    # 2. the new appointment, conditional on the booking identifier
    appointment = new_appointment(request, created=now)
    try:
        response = await api.send(FHIRRequest.post("Appointment", appointment, headers={
            "If-None-Exist": f"identifier={BOOKING_SYSTEM}|{request.booking_id}",
            "Prefer": "return=representation"}))
        created = await _written(api, response, None)
    except (FHIRError, BookingError) as exc:
        found = await _found(api, request) if isinstance(exc, FHIRError) else None
        if found is None:
            repairs = await _revert(api, busy, request.slot_ref)
            raise BookingError("the EHR refused the appointment", exc.message,
                               repairs) from exc
        created = found
    # 3. and 4. the old appointment cancelled, its slot freed (or owed through the outbox)
    old, repairs = await _cancel_and_free(api, request)
    return Booked("ordered", created, old, repairs)


async def _revert(api: FHIRApi, busy: JSON, ref: str) -> list[Repair]:
    """Put the slot taken for a booking that failed back to ``free``."""
    try:
        await _put_resource(api, with_status(busy, "free"), busy)
    except FHIRError:
        return [Repair("revert-slot", "Slot", ref, {"status": "free"})]
    return []


async def _cancel_and_free(api: FHIRApi, request: BookingRequest, *,
                           reread_slot: bool = False) -> tuple[JSON | None, list[Repair]]:
    """Cancel the old appointment (``If-Match``; a 412 reads it again, up to three tries) and
    free its slot; what cannot be done now becomes a :class:`Repair`. Returns the old
    appointment as the EHR has it once cancelled (``None`` when there is none, or the cancel
    is owed). ``reread_slot``: read the old slot after the cancel (a server that books by
    ``$book`` may free it itself)."""
    repairs: list[Repair] = []
    if request.old is None:
        return None, repairs
    ref = str(request.old_ref)
    old: JSON | None
    if request.old.get("status") not in ACTIVE_STATUSES:
        old = request.old  # cancelled (by an earlier try), or gone: nothing to write
        if old.get("status") != "cancelled":
            return old, repairs
    else:
        old = await _settle(api, ref, request.old, cancelled, "cancelled")
    slot_ref = _old_slot_ref(old or request.old)
    if old is None:
        # the slot stays held until the appointment is cancelled: both owed, in that order
        repairs.append(Repair("cancel-old", "Appointment", ref, copy.deepcopy(CANCEL_CHANGE)))
        if slot_ref is not None:
            repairs.append(Repair("free-old-slot", "Slot", slot_ref, {"status": "free"}))
        return old, repairs
    if slot_ref is None:
        return old, repairs
    current = request.old_slot
    if current is not None and f"Slot/{current.get('id')}" != slot_ref:
        current = None
    if current is None or reread_slot:
        try:
            current = await _read(api, slot_ref)
        except FHIRError:
            current = None
    if current is None or await _settle(api, slot_ref, current, _freed, "free") is None:
        repairs.append(Repair("free-old-slot", "Slot", slot_ref, {"status": "free"}))
    return old, repairs


def _freed(slot: JSON) -> JSON:
    return with_status(slot, "free")


async def _settle(api: FHIRApi, ref: str, current: JSON, change: Callable[[JSON], JSON],
                  done: str) -> JSON | None:
    """Write ``change(current)`` with ``If-Match`` until it holds (``status == done``); a 412
    or 409 reads again. ``None`` when it could not be written."""
    for _ in range(_ATTEMPTS):
        if current.get("status") == done:
            return current
        try:
            return await _put_resource(api, change(current), current)
        except FHIRError as exc:
            if exc.status not in _CONFLICT:
                return None
        try:
            current = await _read(api, ref)
        except FHIRError:
            return None
    return current if current.get("status") == done else None
