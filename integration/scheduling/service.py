"""The scheduling application service: free slots for an appointment, and rebooking into one.

:class:`SchedulingService` is what the patient page (and the waitlist) call. For an appointment
that came over FHIR from a connection with ``scheduling = "slots"`` (:meth:`~SchedulingService.
mode`), :meth:`~SchedulingService.free_slots` searches the EHR's Schedules and free Slots
(:mod:`integration.scheduling.slots`), and :meth:`~SchedulingService.rebook`:

1. records the attempt (a ``bookings`` row, ``pending``), after reading the slot, the old
   appointment and its slot fresh from the EHR (one round of concurrent reads);
2. books in the EHR (:func:`integration.scheduling.booking.book`: ``$book``, a transaction, or
   ordered conditional writes, by the server's CapabilityStatement, read once per connection);
3. in one database transaction: puts the new Appointment and the cancelled old one on the
   timeline as FHIR ingestion would (``entry_sources`` ``fhir`` with the connection), so the
   outreach reconciler stops the old reminders and plans the new ones on its next pass; owes
   the EHR the Communication that records the rebooking (key ``booking-<id>``), and any write
   the booking could not finish (:class:`~integration.scheduling.booking.Repair`); tells the
   waitlist the old slot is free (``integration.waitlist.slot_freed``, once that module exists);
   and closes the ``bookings`` row (``booked``, ``conflict`` or ``failed``).

A slot taken meanwhile gives ``conflict`` with the next free slots as ``alternatives``. The same
choice made twice (a form sent again) books once: a booked attempt for the same appointment and
slot is answered again, a pending one is resumed under the same booking id, whose identifier
(``urn:careloop:booking|<id>``) on the new Appointment lets the EHR's copy be found.

FHIR clients are made lazily per event loop and connection (an ``httpx.AsyncClient`` must not
cross event loops); database work runs in ``asyncio.to_thread`` and no transaction is held open
across a call to the EHR.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import importlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection as DbConnection
from sqlalchemy import Engine, insert, or_, select, update

from adapters.fhir import FHIRApi, FHIRRequest, bundle_resources
from adapters.fhir.errors import FHIRError, ResourceNotFound
from integration.db import write_lock
from integration.fhir_ingest import ClientFactory, fhir_source, recording_clients
from integration.identity import REF_SYSTEM_PREFIX, IdentityRules, resolve_id
from integration.logs import get_logger
from integration.metrics import count_booking
from integration.models import (
    bookings,
    entry_sources,
    patient_identifiers,
    patients,
    timeline_entries,
)
from integration.scheduling.booking import (
    Booked,
    BookingError,
    BookingOutcome,
    BookingRequest,
    Repair,
    SlotConflict,
    book,
    cancelled,
    method_for,
)
from integration.scheduling.slots import (
    Capabilities,
    FreeSlot,
    fhir_time,
    free_slot,
    location_refs,
    matches_service,
    normal_ref,
    ref_of,
    schedule_actor_search,
    schedule_service_search,
    service_text,
    service_tokens,
    slot_refs,
    slot_search,
)
from integration.settings import Connection, Settings
from integration.timeline import apply_batch
from integration.timeline.facts import parse_fhir_time
from integration.writeback import enqueue, patient_reference
from integration.writeback.outbox import write_back_connection
from integration.writeback.references import fhir_ref
from integration.writeback.resources import fhir_instant, medium

__all__ = ["IN_FLIGHT", "SchedulingService", "communication"]

log = get_logger("careloop.scheduling")

JSON = dict[str, Any]
IN_FLIGHT = timedelta(minutes=2)
"""A pending booking younger than this is taken as still running (another request's)."""
_LOCATION_CACHE = 5000


@dataclass(frozen=True)
class _Entry:
    """An appointment on the timeline that came from a ``slots`` connection."""

    entry_id: str
    patient_id: str
    status: str
    connection: Connection
    ref: str
    """``Appointment/<id>`` in that EHR"""
    resource: JSON
    """the newest version on the timeline"""


@dataclass
class _Attempt:
    patient_id: str
    """the surviving patient"""
    entry: _Entry | None
    connection: Connection
    slot_ref: str
    source: str
    now: datetime
    patient: JSON | None
    """how this EHR knows the patient (a Reference), when careloop can say"""
    done: BookingOutcome | None = None
    booking_id: int | None = None
    method: str | None = None
    """how the EHR is asked (from its CapabilityStatement), once known"""
    booked_in_ehr: bool = False
    start: datetime | None = None
    end: datetime | None = None
    extra: list[JSON] = field(default_factory=list)
    """resources to put on the timeline with the booking (the Patient, found by identifier)"""


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def communication(*, patient: JSON, appointment_ref: str, source: str, start: datetime,
                  now: datetime, organization: str | None = None) -> JSON:
    """The Communication that records a rebooking in the EHR (about the new Appointment)."""
    resource: JSON = {"resourceType": "Communication", "status": "completed",
                      "category": [{"text": "careloop rebooking"}]}
    channel = medium(source)
    if channel is not None:
        resource["medium"] = [channel]
    resource["subject"] = patient
    resource["about"] = [{"reference": appointment_ref}]
    resource["sent"] = fhir_instant(now)
    if organization:
        resource["recipient"] = [{"display": organization}]
    resource["sender"] = patient
    resource["payload"] = [{"contentString":
                            f"Rebooked by the patient from {source}: {fhir_instant(start)}"}]
    return resource


def _patient_participant(appointment: Mapping[str, Any]) -> JSON | None:
    for participant in appointment.get("participant") or []:
        actor = participant.get("actor") if isinstance(participant, Mapping) else None
        ref = ref_of(actor)
        if ref and ref.startswith("Patient/"):
            return {"reference": ref}
    return None


def _outcome(status: str, message: str, *, booking_id: int | None = None,
             appointment_ref: str | None = None, start: datetime | None = None,
             alternatives: list[FreeSlot] | None = None) -> BookingOutcome:
    return BookingOutcome(status=status, booking_id=booking_id,
                          appointment_ref=appointment_ref, start=start,
                          alternatives=list(alternatives or []), message=message)


class SchedulingService:
    """Free slots and rebooking against the EHRs of ``scheduling = "slots"`` connections
    (module docstring). Call :meth:`aclose` at the end (on each event loop that used it)."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        client_factory: ClientFactory | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        notify: Callable[[], None] | None = None,
    ) -> None:
        """``notify`` is called after each booking is committed (wire it to poke the outreach
        and write-back stages)."""
        self.engine = engine
        self.settings = settings
        self._factory = client_factory or recording_clients(engine)
        self._clock = clock
        self._notify = notify
        self._clients: dict[tuple[int, str], tuple[asyncio.AbstractEventLoop, FHIRApi]] = {}
        self._guard = threading.Lock()
        self._capabilities: dict[str, Capabilities] = {}
        self._locations: dict[str, str] = {}
        self._identity = IdentityRules(settings.authoritative_identifier_systems)

    # --- clients ------------------------------------------------------------------------

    def _client(self, connection: Connection) -> FHIRApi:
        loop = asyncio.get_running_loop()
        key = (id(loop), connection.name)
        with self._guard:
            for k in [k for k, (lp, _) in self._clients.items() if lp.is_closed()]:
                del self._clients[k]  # its loop is gone, and its connections with it
            found = self._clients.get(key)
            if found is not None and found[0] is loop:
                return found[1]
            api = self._factory(connection)
            self._clients[key] = (loop, api)
            return api

    async def aclose(self) -> None:
        """Close the FHIR clients (those of other, still running loops on their own loop)."""
        loop = asyncio.get_running_loop()
        with self._guard:
            clients, self._clients = list(self._clients.values()), {}
        for owner, api in clients:
            close = getattr(api, "aclose", None)
            if close is None:
                continue
            if owner is loop:
                await close()
            elif owner.is_running() and not owner.is_closed():
                future = asyncio.run_coroutine_threadsafe(close(), owner)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.wrap_future(future), 5)

    async def _caps(self, api: FHIRApi, connection: Connection) -> Capabilities:
        key = f"{connection.name}|{connection.fhir_base}"
        caps = self._capabilities.get(key)
        if caps is None:
            statement = (await api.send(FHIRRequest.get("metadata"))).body
            caps = self._capabilities[key] = Capabilities.from_statement(statement)
        return caps

    # --- the timeline -------------------------------------------------------------------

    def _entry(self, conn: DbConnection, entry_id: str) -> _Entry | None:
        row = conn.execute(
            select(timeline_entries.c.patient_id, timeline_entries.c.status,
                   timeline_entries.c.resource_type, timeline_entries.c.resource)
            .where(timeline_entries.c.id == entry_id)
        ).first()
        if row is None or row.resource_type != "Appointment":
            return None
        sources = conn.execute(
            select(entry_sources.c.connection, entry_sources.c.ref)
            .where(entry_sources.c.entry_id == entry_id, entry_sources.c.system == "fhir")
            .order_by(entry_sources.c.id.desc())
        )
        for source in sources:
            ref = fhir_ref(str(source.ref))
            connection = self.settings.connection(str(source.connection))
            if (ref is not None and ref.startswith("Appointment/") and connection is not None
                    and connection.scheduling == "slots"):
                return _Entry(entry_id, str(row.patient_id), str(row.status), connection, ref,
                              dict(row.resource or {}))
        return None

    def mode(self, entry_id: str) -> str:
        """``slots`` when the entry's appointment came over FHIR from a connection with
        ``scheduling = "slots"`` (the page offers free slots and books one), else
        ``request`` (the patient's preferences go to staff)."""
        with self.engine.connect() as conn:
            return "slots" if self._entry(conn, entry_id) is not None else "request"

    def _slots_entry(self, entry_id: str) -> _Entry:
        with self.engine.connect() as conn:
            entry = self._entry(conn, entry_id)
        if entry is None:
            raise ValueError(f"entry {entry_id} is not an appointment from a connection with "
                             'scheduling = "slots"')
        return entry

    # --- free slots ---------------------------------------------------------------------

    async def free_slots(self, entry_id: str, *, start: datetime, days: int,
                         limit: int = 30) -> list[FreeSlot]:
        """Free slots for the entry's appointment from ``start`` for ``days`` days (at most
        ``limit``, by start): in the Schedules of its practitioner, location or service (else
        of its service type, else of its own slot), of the same service, never its own slot.
        :class:`ValueError` for an entry not in ``slots`` mode."""
        entry = await asyncio.to_thread(self._slots_entry, entry_id)
        api = self._client(entry.connection)
        return await self._search(api, entry.connection, entry.resource, start=_utc(start),
                                  days=days, limit=limit,
                                  exclude=set(slot_refs(entry.resource)))

    async def _search(self, api: FHIRApi, connection: Connection, appointment: Mapping[str, Any],
                      *, start: datetime, days: int, limit: int, exclude: set[str],
                      schedules: list[JSON] | None = None) -> list[FreeSlot]:
        if limit <= 0 or days <= 0:
            return []
        if schedules is None:
            schedules = await self._schedules(api, appointment)
        if not schedules:
            return []
        by_ref = {f"Schedule/{s['id']}": s for s in schedules if s.get("id")}
        response = await api.send(slot_search(list(by_ref), start=start, days=days,
                                              limit=limit))
        found = [r for r in bundle_resources(response.body if isinstance(response.body, dict)
                                             else {})
                 if r.get("resourceType") == "Slot" and r.get("status") == "free"]
        names = await self._location_names(api, connection, schedules)
        wanted = service_tokens(appointment)
        out: list[FreeSlot] = []
        for resource in found:
            schedule = by_ref.get(ref_of(resource.get("schedule")) or "")
            slot = free_slot(resource, schedule, names)
            if slot is None or slot.ref in exclude or slot.start < start:
                continue
            offered = service_tokens(resource) or (service_tokens(schedule) if schedule else set())
            if matches_service(wanted, offered):
                out.append(slot)
        out.sort(key=lambda s: (s.start, s.ref))
        return out[:limit]

    async def _schedules(self, api: FHIRApi, appointment: Mapping[str, Any]) -> list[JSON]:
        for request in (schedule_actor_search(appointment),
                        schedule_service_search(appointment)):
            if request is None:
                continue
            response = await api.send(request)
            found = [r for r in bundle_resources(response.body if isinstance(response.body, dict)
                                                 else {})
                     if r.get("resourceType") == "Schedule" and r.get("id")
                     and r.get("active") is not False]
            if found:
                return found
        for ref in slot_refs(appointment):
            try:
                held = (await api.send(FHIRRequest.get(ref))).resource
                schedule_ref = ref_of(held.get("schedule"))
                if schedule_ref:
                    return [(await api.send(FHIRRequest.get(schedule_ref))).resource]
            except ResourceNotFound:
                continue
        return []

    async def _location_names(self, api: FHIRApi, connection: Connection,
                              schedules: Sequence[Mapping[str, Any]]) -> dict[str, str]:
        wanted: list[str] = []
        for schedule in schedules:
            for actor in schedule.get("actor") or []:
                ref = ref_of(actor)
                if (ref in location_refs(schedule) and ref not in wanted
                        and not (isinstance(actor, Mapping) and actor.get("display"))):
                    wanted.append(str(ref))
        key = f"{connection.name}|"
        missing = [r for r in wanted if key + r not in self._locations]
        if missing:
            if len(self._locations) > _LOCATION_CACHE:
                self._locations.clear()
            ids = ",".join(r.split("/", 1)[1] for r in missing)
            names: dict[str, str] = {}
            try:
                response = await api.send(FHIRRequest.get(
                    "Location", [("_id", ids), ("_count", str(len(missing)))]))
                for r in bundle_resources(response.body if isinstance(response.body, dict)
                                          else {}):
                    if r.get("resourceType") == "Location" and r.get("id"):
                        names[f"Location/{r['id']}"] = str(r.get("name") or "").strip()
            except FHIRError:
                return {}  # names are a nicety: show the slots without them
            for ref in missing:
                self._locations[key + ref] = names.get(ref, "")
        return {r: self._locations.get(key + r, "") for r in wanted}

    # --- rebooking ----------------------------------------------------------------------

    async def rebook(
        self,
        *,
        patient_id: str,
        entry_id: str | None,
        slot: FreeSlot | str,
        source: str,
        now: datetime | None = None,
        connection: str | None = None,
    ) -> BookingOutcome:
        """Book ``slot`` for the patient in the EHR, replacing the appointment ``entry_id``
        (``None``: a new booking, e.g. from the waitlist; ``connection`` then names the EHR,
        else the patient's own ``slots`` connection). See the module docstring.

        :class:`ValueError` when the entry is not in ``slots`` mode (the page asks staff
        instead, see :meth:`mode`), is not the patient's, or there is no EHR to book in. Any
        trouble with the EHR is an outcome (``failed``), never an exception."""
        started = time.perf_counter()
        at = _utc(now or self._clock())
        slot_ref = normal_ref(slot.ref if isinstance(slot, FreeSlot) else slot, "Slot")
        attempt = await asyncio.to_thread(functools.partial(
            self._plan, patient_id, entry_id, slot_ref, source=source, now=at,
            connection=connection))
        if attempt.done is not None:
            return attempt.done
        if isinstance(slot, FreeSlot):
            attempt.start, attempt.end = slot.start, slot.end
        api = self._client(attempt.connection)
        try:
            outcome = await self._rebook(api, attempt, slot)
        except Exception as exc:
            log.error("booking_error", connection=attempt.connection.name,
                      exc_type=type(exc).__name__, status="pending" if attempt.booked_in_ehr
                      else "failed")
            if attempt.booking_id is not None and not attempt.booked_in_ehr:
                await asyncio.to_thread(self._close, attempt, "failed",
                                        f"unexpected error: {type(exc).__name__}", [])
            # booked in the EHR but not recorded here: the row stays pending, and the same
            # choice made again resumes it (the Appointment is found by its identifier)
            raise
        count_booking(source, outcome.status)
        log.info("booking_finished", patient_id=attempt.patient_id,
                 entry_id=entry_id, booking_id=outcome.booking_id, status=outcome.status,
                 connection=attempt.connection.name, source=source,
                 count=len(outcome.alternatives),
                 elapsed_ms=round((time.perf_counter() - started) * 1000, 1))
        return outcome

    async def _rebook(self, api: FHIRApi, attempt: _Attempt,
                      slot: FreeSlot | str) -> BookingOutcome:
        try:
            caps = await self._caps(api, attempt.connection)
            attempt.method = method_for(caps)
            request = await self._read(api, attempt, slot)
        except SlotConflict as exc:
            return await self._conflict(api, attempt, None, exc)
        except (FHIRError, BookingError) as exc:
            return await self._failed(attempt, exc)
        attempt.start = parse_fhir_time(request.slot.get("start")) or attempt.start
        attempt.end = parse_fhir_time(request.slot.get("end")) or attempt.end
        started = await asyncio.to_thread(self._begin, attempt)
        if isinstance(started, BookingOutcome):
            return started
        request = replace(request, booking_id=started)
        if attempt.start is not None and attempt.start <= attempt.now:
            return await self._conflict(api, attempt, request, SlotConflict(
                attempt.slot_ref, f"{attempt.slot_ref} starts in the past"))
        try:
            booked = await book(api, request, caps, now=attempt.now)
        except SlotConflict as exc:
            return await self._conflict(api, attempt, request, exc)
        except BookingError as exc:
            await asyncio.to_thread(self._close, attempt, "failed", exc.detail, exc.repairs)
            return _outcome("failed", exc.message, booking_id=attempt.booking_id)
        except FHIRError as exc:
            return await self._failed(attempt, exc)
        attempt.booked_in_ehr = True
        await asyncio.to_thread(self._commit, attempt, request, booked)
        if self._notify is not None:
            with contextlib.suppress(Exception):
                self._notify()
        start = parse_fhir_time(booked.appointment.get("start")) or attempt.start
        return _outcome("booked", "booked", booking_id=attempt.booking_id,
                        appointment_ref=booked.appointment_ref, start=start)

    async def _read(self, api: FHIRApi, attempt: _Attempt,
                    slot: FreeSlot | str) -> BookingRequest:
        """The Slot, its Schedule, the old Appointment and its Slot, read concurrently."""
        async def maybe(ref: str | None) -> JSON | None:
            if ref is None:
                return None
            try:
                return (await api.send(FHIRRequest.get(ref))).resource
            except ResourceNotFound:
                return None

        entry = attempt.entry
        held = slot_refs(entry.resource) if entry else []
        schedule_ref = slot.schedule_ref if isinstance(slot, FreeSlot) else None
        new_slot, old, old_slot, schedule = await asyncio.gather(
            maybe(attempt.slot_ref), maybe(entry.ref if entry else None),
            maybe(held[0] if held else None), maybe(schedule_ref))
        if new_slot is None:
            raise SlotConflict(attempt.slot_ref, f"{attempt.slot_ref} is gone")
        actual = ref_of(new_slot.get("schedule"))
        if actual and (schedule is None or f"Schedule/{schedule.get('id')}" != actual):
            schedule = await maybe(actual)
        if entry is not None:
            if old is None:
                raise BookingError("the appointment is no longer there",
                                   f"{entry.ref} was not found")
            now_held = slot_refs(old)
            if now_held[:1] != held[:1]:
                old_slot = await maybe(now_held[0]) if now_held else None
        if entry is None:
            patient = await self._ehr_patient(api, attempt)
        else:
            patient = _patient_participant(old or {}) or attempt.patient or {}
        return BookingRequest(booking_id=0, slot=new_slot, schedule=schedule, old=old,
                              old_slot=old_slot, patient=patient)

    async def _ehr_patient(self, api: FHIRApi, attempt: _Attempt) -> JSON:
        """A literal reference to the patient in the EHR (a new booking needs one): careloop's
        own record of the EHR's id, else the EHR's Patient found by identifier (then also put
        on the timeline with the booking, so identity links the two)."""
        known = attempt.patient or {}
        if "reference" in known:
            return known
        ident = known.get("identifier")
        if not isinstance(ident, Mapping) or not ident.get("value"):
            raise BookingError("the patient is not known to the EHR",
                               "no identifier the EHR could know the patient by")
        value = f"{ident.get('system')}|{ident['value']}" if ident.get("system") \
            else str(ident["value"])
        response = await api.send(FHIRRequest.get("Patient", [("identifier", value),
                                                              ("_count", "2")]))
        found = [r for r in bundle_resources(response.body if isinstance(response.body, dict)
                                             else {})
                 if r.get("resourceType") == "Patient" and r.get("id")]
        if len(found) != 1:
            raise BookingError("the patient is not known to the EHR",
                               f"{len(found)} Patients carry the patient's identifier")
        attempt.extra.append(found[0])
        return {"reference": f"Patient/{found[0]['id']}"}

    async def _conflict(self, api: FHIRApi, attempt: _Attempt, request: BookingRequest | None,
                        exc: SlotConflict) -> BookingOutcome:
        alternatives: list[FreeSlot] = []
        try:
            alternatives = await self._alternatives(api, attempt, request)
        except FHIRError as error:
            log.warning("booking_alternatives_failed", connection=attempt.connection.name,
                        exc_type=type(error).__name__)
        if attempt.booking_id is None:
            await asyncio.to_thread(self._record, attempt, "conflict", exc.detail)
        else:
            await asyncio.to_thread(self._close, attempt, "conflict", exc.detail, [])
        return _outcome("conflict", "the slot was taken; here are the next free ones",
                        booking_id=attempt.booking_id, alternatives=alternatives)

    async def _alternatives(self, api: FHIRApi, attempt: _Attempt,
                            request: BookingRequest | None) -> list[FreeSlot]:
        """The next free slots after losing ``attempt.slot_ref``: from the lost slot's day (in
        the clinic's zone, never before now), for the patient page's number of days."""
        start = attempt.now
        if attempt.start is not None:
            zone = ZoneInfo(self.settings.timezone)
            local = attempt.start.astimezone(zone)
            day = local.replace(hour=0, minute=0, second=0, microsecond=0)
            start = max(attempt.now, day.astimezone(UTC))
        days = self.settings.patient_page.slot_days
        exclude = {attempt.slot_ref}
        if attempt.entry is not None:
            exclude |= set(slot_refs(attempt.entry.resource))
            return await self._search(api, attempt.connection, attempt.entry.resource,
                                      start=start, days=days, limit=30, exclude=exclude)
        if request is None or request.schedule is None:
            return []
        like: JSON = {"serviceType": request.slot.get("serviceType")
                      or request.schedule.get("serviceType") or []}
        return await self._search(api, attempt.connection, like, start=start, days=days,
                                  limit=30, exclude=exclude, schedules=[request.schedule])

    async def _failed(self, attempt: _Attempt, exc: FHIRError | BookingError) -> BookingOutcome:
        if isinstance(exc, BookingError):
            message, detail = exc.message, exc.detail
        else:
            message, detail = "the EHR could not be reached", exc.message
        log.warning("booking_failed", connection=attempt.connection.name,
                    exc_type=type(exc).__name__, status_code=getattr(exc, "status", None))
        if attempt.booking_id is None:
            await asyncio.to_thread(self._record, attempt, "failed", detail)
        else:
            await asyncio.to_thread(self._close, attempt, "failed", detail, [])
        return _outcome("failed", message, booking_id=attempt.booking_id)

    # --- database -----------------------------------------------------------------------

    def _plan(self, patient_id: str, entry_id: str | None, slot_ref: str, *, source: str,
              now: datetime, connection: str | None) -> _Attempt:
        with self.engine.connect() as conn:
            survivor = resolve_id(conn, patient_id)
            if survivor is None:
                raise ValueError(f"patient {patient_id} is not known")
            entry: _Entry | None = None
            if entry_id is not None:
                entry = self._entry(conn, entry_id)
                if entry is None:
                    raise ValueError(f"entry {entry_id} is not an appointment from a "
                                     'connection with scheduling = "slots"')
                if (resolve_id(conn, entry.patient_id) or entry.patient_id) != survivor:
                    raise ValueError(f"entry {entry_id} is not patient {patient_id}'s")
                target = entry.connection
            else:
                target = self._connection_for(conn, survivor, connection)
            try:
                patient: JSON | None = patient_reference(conn, survivor, target.name)
            except ValueError:
                if entry is None:
                    raise
                patient = None
            attempt = _Attempt(survivor, entry, target, slot_ref, source, now, patient)
            found = self._already(conn, attempt, lock=False)
            attempt.done = found if isinstance(found, BookingOutcome) else None
            return attempt

    def _connection_for(self, conn: DbConnection, patient_id: str,
                        name: str | None) -> Connection:
        slots = [c for c in self.settings.connections if c.scheduling == "slots"]
        if name is not None:
            found = self.settings.connection(name)
            if found is None or found.scheduling != "slots":
                raise ValueError(f'connection {name!r} does not have scheduling = "slots"')
            return found
        ids = [patient_id, *(r.id for r in conn.execute(
            select(patients.c.id).where(patients.c.merged_into == patient_id)))]
        prefix = f"{REF_SYSTEM_PREFIX}fhir:"
        rows = conn.execute(
            select(patient_identifiers.c.system).where(
                patient_identifiers.c.patient_id.in_(ids),
                patient_identifiers.c.system.like(f"{prefix}%:Patient"))
            .order_by(patient_identifiers.c.id))
        for row in rows:
            found = self.settings.connection(str(row.system)[len(prefix):-len(":Patient")])
            if found is not None and found.scheduling == "slots":
                return found
        if len(slots) == 1:
            return slots[0]
        raise ValueError("no connection with scheduling = \"slots\" to book in")

    def _same(self, attempt: _Attempt) -> Any:
        b = bookings
        entry_id = attempt.entry.entry_id if attempt.entry else None
        query = select(b.c.id, b.c.status, b.c.slot_ref, b.c.new_appointment_ref, b.c.start,
                       b.c.started_at).where(
            b.c.patient_id == attempt.patient_id, b.c.status.in_(("pending", "booked")))
        if entry_id is not None:
            return query.where(b.c.old_entry_id == entry_id).order_by(b.c.id.desc())
        return query.where(b.c.old_entry_id.is_(None), b.c.slot_ref == attempt.slot_ref) \
            .order_by(b.c.id.desc())

    def _already(self, conn: DbConnection, attempt: _Attempt, *,
                 lock: bool) -> BookingOutcome | int | None:
        """A booked attempt for the same choice (answered again), a booking of the same
        appointment into another slot (refused), the same choice pending (its id: resumed);
        with ``lock``, also another pending choice still in flight (refused)."""
        for row in conn.execute(self._same(attempt)):
            if row.status == "booked":
                if row.slot_ref == attempt.slot_ref:
                    return _outcome("booked", "booked", booking_id=int(row.id),
                                    appointment_ref=row.new_appointment_ref,
                                    start=_utc(row.start))
                return _outcome("failed", "this appointment was already rebooked",
                                booking_id=int(row.id))
        if not lock:
            return None
        abandoned: list[int] = []
        for row in conn.execute(self._same(attempt)):
            if row.slot_ref == attempt.slot_ref:
                return int(row.id)
            if _utc(row.started_at) > attempt.now - IN_FLIGHT:
                return _outcome("failed", "another rebooking of this appointment is under way",
                                booking_id=int(row.id))
            abandoned.append(int(row.id))
        if abandoned:
            conn.execute(update(bookings).where(
                bookings.c.id.in_(abandoned), bookings.c.status == "pending",
            ).values(status="failed", error="abandoned: a later choice replaced it",
                     finished_at=attempt.now))
        return None

    def _begin(self, attempt: _Attempt) -> int | BookingOutcome:
        """The ``bookings`` row (``pending``) under the patient's lock; or the answer when the
        same choice was made before (see :meth:`_already`)."""
        with write_lock(self.engine), self.engine.begin() as conn:
            lock = select(patients.c.id).where(patients.c.id == attempt.patient_id)
            if conn.dialect.name == "postgresql":
                lock = lock.with_for_update()
            conn.execute(lock)
            found = self._already(conn, attempt, lock=True)
            if isinstance(found, BookingOutcome):
                return found
            if found is None:
                found = int(conn.execute(insert(bookings).values(
                    patient_id=attempt.patient_id,
                    old_entry_id=attempt.entry.entry_id if attempt.entry else None,
                    connection=attempt.connection.name, slot_ref=attempt.slot_ref,
                    start=attempt.start or attempt.now, end=attempt.end,
                    source=attempt.source, method=attempt.method, status="pending",
                    started_at=attempt.now,
                ).returning(bookings.c.id)).scalar_one())
        attempt.booking_id = found
        return found

    def _record(self, attempt: _Attempt, status: str, error: str) -> None:
        """An attempt that ended before it had a row (the slot gone, the EHR unreachable)."""
        with write_lock(self.engine), self.engine.begin() as conn:
            attempt.booking_id = int(conn.execute(insert(bookings).values(
                patient_id=attempt.patient_id,
                old_entry_id=attempt.entry.entry_id if attempt.entry else None,
                connection=attempt.connection.name, slot_ref=attempt.slot_ref,
                start=attempt.start or attempt.now, end=attempt.end, source=attempt.source,
                method=attempt.method, status=status, error=error[:4000],
                started_at=attempt.now,
                finished_at=max(attempt.now, self._clock()),
            ).returning(bookings.c.id)).scalar_one())

    def _close(self, attempt: _Attempt, status: str, error: str | None,
               repairs: Sequence[Repair]) -> None:
        with write_lock(self.engine), self.engine.begin() as conn:
            self._repairs(conn, attempt, repairs)
            values: dict[str, Any] = {"status": status, "error": (error or "")[:4000] or None,
                                      "finished_at": max(attempt.now, self._clock())}
            if attempt.method:
                values["method"] = attempt.method
            conn.execute(update(bookings).where(bookings.c.id == attempt.booking_id,
                                                bookings.c.status == "pending").values(**values))

    def _repairs(self, conn: DbConnection, attempt: _Attempt,
                 repairs: Sequence[Repair]) -> None:
        for repair in repairs:
            enqueue(conn, key=f"booking-{attempt.booking_id}-{repair.what}",
                    connection=attempt.connection.name, resource_type=repair.resource_type,
                    resource=copy.deepcopy(repair.change), operation="update",
                    target=repair.target, now=attempt.now)
            log.warning("booking_repair_owed", connection=attempt.connection.name,
                        reason=repair.what)

    def _commit(self, attempt: _Attempt, request: BookingRequest, booked: Booked) -> None:
        """Steps 3 to 6 of the module docstring, in one transaction."""
        now = attempt.now
        name = attempt.connection.name
        old = booked.old
        deferred = request.old is not None and any(r.what == "cancel-old"
                                                   for r in booked.repairs)
        if old is None and deferred and request.old is not None:
            # the EHR will be told by the outbox; the timeline (and outreach) follows now
            old = cancelled(request.old)
            old["meta"] = {"lastUpdated": fhir_time(now)}
        resources = [*attempt.extra, booked.appointment, *([old] if old else [])]
        start = parse_fhir_time(booked.appointment.get("start")) or attempt.start or now
        end = parse_fhir_time(booked.appointment.get("end")) or attempt.end
        with write_lock(self.engine), self.engine.begin() as conn:
            apply_batch(conn, [([r], fhir_source(name, r, fallback=now)) for r in resources],
                        now, self._identity)
            new_entry = self._entry_of(conn, name, booked.appointment_ref)
            self._write_back(conn, attempt, new_entry, booked.appointment_ref, start)
            self._repairs(conn, attempt, booked.repairs)
            if request.old is not None and booked.old is not None \
                    and booked.old.get("status") == "cancelled":
                # (a cancel owed to the outbox frees nothing yet: the waitlist hears of it
                # when the cancelled Appointment comes back from the EHR)
                self._slot_freed(conn, attempt, request, booked.old)
            conn.execute(update(bookings).where(
                bookings.c.id == attempt.booking_id, bookings.c.status == "pending",
            ).values(status="booked", method=booked.method,
                     new_appointment_ref=booked.appointment_ref, start=start, end=end,
                     error=("; ".join(f"owed: {r.what}" for r in booked.repairs) or None),
                     finished_at=max(now, self._clock())))

    @staticmethod
    def _entry_of(conn: DbConnection, connection: str, ref: str) -> str | None:
        row = conn.execute(
            select(entry_sources.c.entry_id).where(
                entry_sources.c.system == "fhir", entry_sources.c.connection == connection,
                or_(entry_sources.c.ref.like(f"{ref}/%"), entry_sources.c.ref.like(f"{ref}@%")))
            .order_by(entry_sources.c.id.desc())
        ).first()
        return str(row.entry_id) if row is not None else None

    def _write_back(self, conn: DbConnection, attempt: _Attempt, entry_id: str | None,
                    appointment_ref: str, start: datetime) -> None:
        target = write_back_connection(conn, self.settings, entry_id)
        if entry_id is None and attempt.connection.write_back:
            target = attempt.connection
        if target is None:
            return
        try:
            patient = patient_reference(conn, attempt.patient_id, target.name)
        except ValueError:
            log.warning("writeback_skipped", patient_id=attempt.patient_id,
                        connection=target.name, reason="rebooking: no patient identifier")
            return
        if target.name != attempt.connection.name:
            return  # the Appointment is known literally only in the EHR it was booked in
        resource = communication(patient=patient, appointment_ref=appointment_ref,
                                 source=attempt.source, start=start, now=attempt.now,
                                 organization=self.settings.organization.name)
        enqueue(conn, key=f"booking-{attempt.booking_id}", connection=target.name,
                resource_type="Communication", resource=resource, now=attempt.now)

    def _slot_freed(self, conn: DbConnection, attempt: _Attempt, request: BookingRequest,
                    old: Mapping[str, Any]) -> None:
        """Tell the waitlist (``integration.waitlist.slot_freed``) the old slot is free, with
        the waitlist's own key (the Slot reference, else the entry and its start), so that the
        cancellation seen again on the timeline is the same freed slot."""
        try:
            waitlist = importlib.import_module("integration.waitlist")
        except ModuleNotFoundError as exc:
            if exc.name not in ("integration.waitlist", "integration"):
                raise
            return  # not there yet
        slot_freed = getattr(waitlist, "slot_freed", None)
        start = parse_fhir_time(old.get("start"))
        if slot_freed is None or start is None or attempt.entry is None:
            return
        held = slot_refs(old)
        slot_ref = held[0] if held else None
        key_of = getattr(waitlist, "freed_key", None)
        key = (key_of(entry_id=attempt.entry.entry_id, start=start, slot_ref=slot_ref)
               if key_of is not None
               else slot_ref or f"entry:{attempt.entry.entry_id}:{start.isoformat()}")
        service = service_text(old) or (service_text(request.old_slot)
                                        if request.old_slot else "")
        slot_freed(conn, key=key, source="rebooking", connection=attempt.connection.name,
                   slot_ref=slot_ref, service=service,
                   location=self._old_location(attempt, old), start=start,
                   end=parse_fhir_time(old.get("end")), now=attempt.now,
                   min_notice=self.settings.waitlist.min_notice)

    def _old_location(self, attempt: _Attempt, old: Mapping[str, Any]) -> str:
        for participant in old.get("participant") or []:
            actor = participant.get("actor") if isinstance(participant, Mapping) else None
            ref = ref_of(actor)
            if ref and ref.startswith("Location/"):
                display = actor.get("display") if isinstance(actor, Mapping) else None
                if isinstance(display, str) and display.strip():
                    return display.strip()
                return self._locations.get(f"{attempt.connection.name}|{ref}", "")
        return ""

