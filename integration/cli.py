"""The ``careloop`` command line.

Every command builds the settings once (environment + ``CARELOOP_CONFIG``) and passes them down.
A bad setting or bad input ends the command with one line on stderr and a non-zero status:
1 for bad input (a message that failed), 2 for bad settings or usage, 3 when a service
(database, broker, peer) cannot be reached.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from integration.logs import configure_logging
from integration.settings import Settings, SettingsError, load_settings

EXIT_BAD_INPUT = 1
EXIT_BAD_SETTINGS = 2
EXIT_UNAVAILABLE = 3


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"careloop: error: {message}", err=True)
    sys.exit(code)


def _settings(**overrides: Any) -> Settings:
    try:
        settings = load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        _fail(str(exc), EXIT_BAD_SETTINGS)
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _check_templates(settings: Settings) -> None:
    """Render every pathway template now: a broken one stops the start, with file and line."""
    if not settings.pathways:
        return
    from integration.outreach.templates import TemplateCatalog, TemplateProblem

    catalog = TemplateCatalog(
        settings.outreach.templates_dir,
        default_language=settings.default_language,
        max_sms_segments=settings.outreach.max_sms_segments,
    )
    try:
        catalog.check(settings.pathways, settings.outreach.languages)
    except TemplateProblem as exc:
        _fail(str(exc), EXIT_BAD_SETTINGS)


def _engine(settings: Settings) -> Any:
    from sqlalchemy.exc import OperationalError

    from integration.db import create_db_engine, ping

    engine = create_db_engine(settings.database_url)
    try:
        ping(engine)
    except OperationalError as exc:
        _fail(f"the database cannot be reached: {str(exc.orig).splitlines()[0]}", EXIT_UNAVAILABLE)
    return engine


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="careloop")
def main() -> None:
    """careloop: FHIR-native integration middleware for patient engagement.

    Settings come from CARELOOP_* environment variables and the TOML file named by
    CARELOOP_CONFIG (see the README's settings reference).
    """


# -- serve, worker, beat ----------------------------------------------------------------------
@main.command()
@click.option("--host", help="HTTP address [CARELOOP_HTTP_HOST, 127.0.0.1].")
@click.option("--port", type=int, help="HTTP port [CARELOOP_HTTP_PORT, 8000].")
@click.option("--mllp-port", type=int, help="MLLP port [CARELOOP_MLLP_PORT, 2575].")
@click.option("--mllp-host", help="MLLP address [CARELOOP_MLLP_HOST, 127.0.0.1].")
@click.option("--upgrade/--no-upgrade", default=True, show_default=True,
              help="Apply database migrations before serving.")
def serve(
    host: str | None, port: int | None, mllp_port: int | None, mllp_host: str | None,
    upgrade: bool,
) -> None:
    """Run the API and the MLLP listener (and the worker, when no broker is configured)."""
    settings = _settings(http_host=host, http_port=port, mllp_port=mllp_port, mllp_host=mllp_host)
    _check_templates(settings)
    if upgrade:
        _upgrade(settings)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(settings))


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        return None
    return uvloop.new_event_loop


async def _serve(settings: Settings) -> None:
    import uvicorn

    from integration.api import create_app
    from integration.console.users import first_admin
    from integration.runtime import Runtime

    runtime = Runtime(settings)
    admin_password = first_admin(runtime.engine)  # a first start: someone must sign in
    app = create_app(runtime)
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        server_header=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.05)
        bound = server.servers[0].sockets[0].getsockname() if server.servers else None
        http_port = bound[1] if bound else settings.http_port
        http = f"http://{settings.http_host}:{http_port}"
        assert runtime.mllp_address is not None
        mllp_host, mllp_port = runtime.mllp_address
        worker = (
            "celery via " + settings.broker_url.split("@")[-1]
            if settings.broker_url
            else ("in-process" if settings.inprocess_worker else "off")
        )
        click.echo(
            f"careloop is running\n"
            f"  API       {http}  (docs {http}/docs)\n"
            f"  MLLP      {mllp_host}:{mllp_port}"
            f"{' (TLS)' if settings.mllp_tls_cert else ''}\n"
            f"  database  {_safe_url(settings.database_url)}\n"
            f"  worker    {worker}\n"
            f"  console   {http}/console"
            + (f"  (first start: user admin, password {admin_password}, shown only now; "
               f"`careloop users create` adds people)" if admin_password else "")
            + "\nStop with Ctrl-C.",
            err=True,
        )

    task = asyncio.create_task(announce())
    await server.serve()
    task.cancel()
    if not server.started:
        _fail(
            f"could not listen on {settings.http_host}:{settings.http_port} (port in use?)",
            EXIT_UNAVAILABLE,
        )


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@main.command()
@click.option("--queues", "-Q", default="intake,outreach,fhir,writeback", show_default=True,
              help="Comma-separated queues to consume: intake, outreach, fhir, writeback. "
                   "'timeline' is another name for intake: the timeline is written in the "
                   "same transaction as processing, so it has no queue of its own.")
@click.option("--concurrency", "-c", type=int, default=2, show_default=True)
def worker(queues: str, concurrency: int) -> None:
    """Run a Celery worker (needs CARELOOP_BROKER_URL)."""
    from integration.tasks import make_celery, resolve_queues, run_worker, worker_argv

    try:
        names = resolve_queues(queues)
    except ValueError as exc:
        _fail(str(exc), EXIT_BAD_SETTINGS)
    settings = _settings()
    if not settings.broker_url:
        _fail("CARELOOP_BROKER_URL is not set: a worker needs a broker", EXIT_BAD_SETTINGS)
    _check_templates(settings)
    _engine(settings)
    app = make_celery(settings)
    run_worker(app, worker_argv(names, concurrency, settings.log_level))


@main.command()
@click.option("--schedule", type=click.Path(dir_okay=False), default="var/celerybeat-schedule",
              show_default=True, help="Where beat keeps its schedule state.")
def beat(schedule: str) -> None:
    """Run the periodic sweeper for multi-process deployments (needs CARELOOP_BROKER_URL)."""
    settings = _settings()
    if not settings.broker_url:
        _fail("CARELOOP_BROKER_URL is not set: beat needs a broker", EXIT_BAD_SETTINGS)
    from integration.tasks import make_celery

    Path(schedule).parent.mkdir(parents=True, exist_ok=True)
    app = make_celery(settings)
    app.start(["beat", "--schedule", schedule, "--loglevel", settings.log_level.upper()])


# -- db ----------------------------------------------------------------------------------------
@main.group()
def db() -> None:
    """Database schema."""


def _upgrade(settings: Settings) -> None:
    from sqlalchemy.exc import OperationalError

    from integration.db import upgrade

    try:
        upgrade(settings.database_url)
    except OperationalError as exc:
        _fail(f"the database cannot be reached: {str(exc.orig).splitlines()[0]}", EXIT_UNAVAILABLE)


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply migrations up to the newest."""
    settings = _settings()
    _upgrade(settings)
    click.echo(f"database {_safe_url(settings.database_url)} is up to date")


# -- hl7 ---------------------------------------------------------------------------------------
@main.group()
def hl7() -> None:
    """Send and convert HL7 v2 messages."""


def _read_inputs(files: Sequence[str]) -> tuple[list[tuple[str, bytes]], int]:
    """The messages in ``files`` (``-`` is stdin), and how many files could not be read.

    A file that cannot be read or holds no HL7 message gets one line on stderr; the others are
    still used, so one stray file in a glob does not stop a whole send.
    """
    from mappings.er7 import ER7Error, split_messages

    out: list[tuple[str, bytes]] = []
    bad = 0
    for name in files:
        try:
            data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
            messages = split_messages(data)
        except OSError as exc:
            click.echo(f"{name}: {exc.strerror}", err=True)
            bad += 1
            continue
        except ER7Error as exc:
            click.echo(f"{name}: {exc}", err=True)
            bad += 1
            continue
        if not messages:
            click.echo(f"{name}: no HL7 message found", err=True)
            bad += 1
            continue
        out += [(f"{name}#{i}", m) for i, m in enumerate(messages, start=1)]
    return out, bad


@hl7.command("send")
@click.argument("files", nargs=-1, required=True)
@click.option("--to", "target", required=True, metavar="HOST:PORT", help="MLLP listener.")
@click.option("--tls", is_flag=True, help="Use TLS.")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False),
              help="CA bundle to verify the server (implies --tls).")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False),
              help="Client certificate for mutual TLS (implies --tls).")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), help="Client key.")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for each ACK.")
def hl7_send(
    files: Sequence[str], target: str, tls: bool, ca: str | None, cert: str | None,
    key: str | None, timeout: float,
) -> None:
    """Send messages over MLLP and print each ACK.

    FILE may hold several messages (and batches); '-' reads stdin. Exits 1 when any message
    is not acknowledged AA/CA.
    """
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        _fail(f"--to {target!r} is not HOST:PORT", EXIT_BAD_SETTINGS)
    messages, unreadable = _read_inputs(files)
    ssl_context = None
    if tls or ca or cert:
        import ssl

        ssl_context = ssl.create_default_context(cafile=ca)
        if cert:
            ssl_context.load_cert_chain(cert, key)
    ok = asyncio.run(_send_all(host, int(port), messages, ssl_context, timeout))
    sys.exit(0 if ok and not unreadable else EXIT_BAD_INPUT)


async def _send_all(
    host: str, port: int, messages: list[tuple[str, bytes]], ssl_context: Any, timeout: float
) -> bool:
    from adapters.mllp import AckMismatch, MLLPClient
    from mappings.er7 import ER7Error, decode, read_header

    try:
        client = await MLLPClient.connect(host, port, ssl_context=ssl_context, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        _fail(f"cannot connect to {host}:{port}: {exc}", EXIT_UNAVAILABLE)
    all_ok = True
    counts: dict[str, int] = {}
    async with client:
        for name, raw in messages:
            try:
                control_id = read_header(decode(raw)).control_id.encode("latin-1", "replace")
            except ER7Error:
                control_id = b""
            try:
                ack = await client.send(raw, control_id, timeout=timeout)
            except AckMismatch as exc:
                click.echo(f"{name}: {exc}", err=True)
                all_ok = False
                counts["no ACK"] = counts.get("no ACK", 0) + 1
                if "closed" in str(exc):
                    break
                continue
            text = ack.decode("utf-8", "replace").replace("\r", "\n").strip()
            code = _msa_code(ack)
            counts[code or "??"] = counts.get(code or "??", 0) + 1
            all_ok &= code in ("AA", "CA")
            click.echo(f"# {name} -> {code or '??'}\n{text}\n")
    summary = ", ".join(f"{n} {code}" for code, n in sorted(counts.items()))
    click.echo(f"sent {sum(counts.values())} of {len(messages)} messages: {summary}", err=True)
    return all_ok


def _msa_code(ack: bytes) -> str:
    for line in ack.replace(b"\n", b"\r").split(b"\r"):
        if line.startswith(b"MSA") and len(line) > 3:
            return line.split(line[3:4])[1].decode("ascii", "replace").strip()
    return ""


@hl7.command("convert")
@click.argument("files", nargs=-1, required=True)
@click.option("--ndjson", is_flag=True,
              help="One compact Bundle per line instead of indented JSON.")
@click.option("--no-validate", is_flag=True,
              help="Skip FHIR validation of the produced resources (faster previews).")
def hl7_convert(files: Sequence[str], ndjson: bool, no_validate: bool) -> None:
    """Print the FHIR R4 resources each message maps to, as a Bundle (type collection) per
    message.

    FILE may hold several messages (and batches); '-' reads stdin. Times without an offset are
    read in the sender's time zone from the settings. Exits 1, with one line per bad message on
    stderr, when any message cannot be converted.
    """
    import json

    from integration.conversion import ContextFactory
    from mappings import MappingError, convert
    from mappings.er7 import ER7Error, decode, read_header

    settings = _settings()
    contexts = ContextFactory(settings, validate=not no_validate)
    inputs, failed = _read_inputs(files)
    now = datetime.now(UTC)
    for name, raw in inputs:
        try:
            text = decode(raw)
            conversion = convert(text, context=contexts.for_header(read_header(text), now))
        except (MappingError, ER7Error) as exc:
            location = getattr(exc, "location", "")
            click.echo(f"{name}: {location + ': ' if location else ''}{exc}", err=True)
            failed += 1
            continue
        bundle = conversion.bundle()
        if ndjson:
            click.echo(json.dumps(bundle, separators=(",", ":"), ensure_ascii=False))
        else:
            click.echo(json.dumps(bundle, indent=2, ensure_ascii=False))
        for warning in conversion.warnings:
            click.echo(f"{name}: warning: {warning}", err=True)
    if failed:
        sys.exit(EXIT_BAD_INPUT)


@hl7.command("validate")
@click.argument("files", nargs=-1, required=True)
def hl7_validate(files: Sequence[str]) -> None:
    """Check messages strictly against the HL7 v2 standard's structures (hl7apy).

    Slower than conversion and stricter than careloop's intake, which accepts what real feeds
    send; use it to tell a sender what to fix. Exits 1 when any message has problems.
    """
    from mappings import validate_strict

    inputs, problems = _read_inputs(files)
    for name, raw in inputs:
        found = validate_strict(raw)
        if not found:
            click.echo(f"{name}: ok")
        for problem in found:
            click.echo(f"{name}: {problem}")
        problems += bool(found)
    if problems:
        sys.exit(EXIT_BAD_INPUT)


# -- replay and inbox --------------------------------------------------------------------------
def _parse_since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        _fail(f"--since {value!r} is not an ISO 8601 date or time", EXIT_BAD_SETTINGS)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@main.command()
@click.option("--status", default="failed", show_default=True,
              type=click.Choice(["failed", "processed", "received"]),
              help="Which stored rows to reprocess.")
@click.option("--since", help="Only rows received at or after this ISO 8601 time.")
@click.option("--id", "ids", type=int, multiple=True, help="Only these inbox ids (repeatable).")
def replay(status: str, since: str | None, ids: tuple[int, ...]) -> None:
    """Reprocess stored inbox rows, with a progress bar."""
    settings = _settings()
    engine = _engine(settings)
    from rich.progress import Progress

    from integration.conversion import ContextFactory
    from integration.pipeline import process_message, requeue

    contexts = ContextFactory(settings)
    selected = requeue(engine, status=status, since=_parse_since(since), ids=ids or None)
    if not selected:
        click.echo("nothing to replay")
        return
    outcomes: dict[str, int] = {}
    with Progress(transient=False) as progress:
        bar = progress.add_task(f"replaying {len(selected)} messages", total=len(selected))
        for inbox_id in selected:
            outcome = process_message(
                engine, inbox_id, max_attempts=settings.max_attempts, contexts=contexts
            )
            key = outcome.status if outcome else "skipped"
            outcomes[key] = outcomes.get(key, 0) + 1
            progress.advance(bar)
    click.echo(", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())))


@main.group()
def inbox() -> None:
    """Stored messages."""


@inbox.command("list")
@click.option("--status", help="received, processed, failed or rejected.")
@click.option("--type", "message_type", help="Message type, e.g. ADT^A01 or ADT.")
@click.option("--control-id", help="MSH-10.")
@click.option("--limit", type=int, default=50, show_default=True)
def inbox_list(
    status: str | None, message_type: str | None, control_id: str | None, limit: int
) -> None:
    """List stored messages, newest first: id, received, source, type, control id, status,
    error."""
    from sqlalchemy import select

    from integration.models import inbox as table

    settings = _settings()
    engine = _engine(settings)
    query = select(
        table.c.id, table.c.received_at, table.c.source, table.c.message_type,
        table.c.control_id, table.c.status, table.c.ack_code, table.c.last_error,
    ).order_by(table.c.id.desc()).limit(limit)
    if status:
        query = query.where(table.c.status == status)
    if message_type:
        if "^" in message_type:
            query = query.where(table.c.message_type == message_type.upper())
        else:
            query = query.where(table.c.message_type.like(message_type.upper() + "%"))
    if control_id:
        query = query.where(table.c.control_id == control_id)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    click.echo(f"{'ID':>8}  {'RECEIVED':<19}  {'SOURCE':<5}  {'TYPE':<8}  {'CONTROL ID':<20}  "
               f"{'STATUS':<9}  ACK  ERROR")
    for r in rows:
        received = r.received_at.strftime("%Y-%m-%d %H:%M:%S") if r.received_at else ""
        error = (r.last_error or "").replace("\n", " ")[:60]
        click.echo(f"{r.id:>8}  {received:<19}  {r.source:<5}  {r.message_type:<8}  "
                   f"{r.control_id[:20]:<20}  {r.status:<9}  {r.ack_code:<3}  {error}")


@inbox.command("show")
@click.argument("inbox_id", type=int)
def inbox_show(inbox_id: int) -> None:
    """One stored message with its ACK and, only here, the raw message."""
    from sqlalchemy import select

    from integration.models import inbox as table

    settings = _settings()
    engine = _engine(settings)
    with engine.connect() as conn:
        row = conn.execute(select(table).where(table.c.id == inbox_id)).first()
    if row is None:
        _fail(f"no inbox row {inbox_id}", EXIT_BAD_INPUT)
    for name in ("id", "source", "peer", "sender", "message_type", "control_id", "version",
                 "status", "ack_code", "attempts", "last_error", "received_at", "processed_at"):
        click.echo(f"{name + ':':<14}{getattr(row, name)}")
    click.echo("\nraw:")
    click.echo(bytes(row.raw).decode("utf-8", "replace").replace("\r", "\n").rstrip())
    if row.ack:
        click.echo("\nack sent:")
        click.echo(row.ack.replace("\r", "\n").rstrip())
    if row.app_ack:
        click.echo("\napplication ack:")
        click.echo(row.app_ack.replace("\r", "\n").rstrip())


# -- keys -------------------------------------------------------------------------------------
@main.group()
def keys() -> None:
    """careloop's signing keys for SMART Backend Services."""


@keys.command("generate")
@click.option("--alg", type=click.Choice(["ES384", "RS384"]), default="ES384", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Private key file "
              "[KEYS_DIR/careloop.pem, or careloop-KID.pem when that exists].")
def keys_generate(alg: str, out: str | None) -> None:
    """Make a signing key pair; its public JWK is served at /.well-known/jwks.json.

    Older keys stay published until removed, so a rotation never locks careloop out.
    """
    from adapters.fhir import SigningKeyError
    from integration.keys import JWKSFile

    settings = _settings()
    jwks = JWKSFile(settings.keys_dir / "jwks.json")
    target = Path(out) if out else settings.keys_dir / "careloop.pem"
    rotated = False
    if out is None and target.exists():
        target = settings.keys_dir / "careloop-next.pem"
        rotated = True
    try:
        key = jwks.generate(alg, target)
    except SigningKeyError as exc:
        _fail(str(exc), EXIT_BAD_SETTINGS)
    if rotated:
        final = settings.keys_dir / f"careloop-{key.kid[:16]}.pem"
        target.rename(final)
        target = final
    click.echo(
        f"kid:         {key.kid}\nalgorithm:   {key.alg}\nprivate key: {target}\n"
        f"public JWKS: {settings.base_url.rstrip('/')}/.well-known/jwks.json "
        f"({jwks.path}, {len(jwks.read()['keys'])} key(s) published)"
    )


@keys.command("remove")
@click.argument("kid")
def keys_remove(kid: str) -> None:
    """Stop publishing a key (the end of a rotation). The private key file is left alone."""
    from integration.keys import JWKSFile

    settings = _settings()
    if not JWKSFile(settings.keys_dir / "jwks.json").remove(kid):
        _fail(f"no published key with kid {kid}", EXIT_BAD_INPUT)
    click.echo(f"key {kid} is no longer published")


# -- clients -----------------------------------------------------------------------------------
@main.group()
def clients() -> None:
    """API clients (interface engines, vendor apps)."""


class _GreedyOption(click.Option):
    """An option that takes every value up to the next option: ``--scopes a b c``."""

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        for name in self.opts:
            opt = parser._long_opt.get(name) or parser._short_opt.get(name)
            if opt is None:
                continue
            original = opt.process

            def process(value: Any, state: Any, _orig: Any = original) -> None:
                values = [value]
                while state.rargs and not state.rargs[0].startswith("-"):
                    values.append(state.rargs.pop(0))
                for item in values:
                    _orig(item, state)

            opt.process = process


@clients.command("create")
@click.argument("name")
@click.option("--scopes", required=True, multiple=True, cls=_GreedyOption,
              help="timeline.read, outreach.read, hl7.write, admin (repeat or space-separate).")
@click.option("--jwks", "jwks_file", type=click.Path(exists=True, dir_okay=False),
              help="The client's public keys (JWKS JSON) for private_key_jwt; no secret then.")
def clients_create(name: str, scopes: tuple[str, ...], jwks_file: str | None) -> None:
    """Register an API client; prints its id and (unless --jwks) its secret, once."""
    import json

    from integration.clients import ClientRegistry

    settings = _settings()
    engine = _engine(settings)
    wanted = [s for group in scopes for s in group.replace(",", " ").split()]
    jwks = None
    if jwks_file:
        try:
            jwks = json.loads(Path(jwks_file).read_text())
        except (OSError, ValueError) as exc:
            _fail(f"{jwks_file}: not a JWKS JSON file ({exc})", EXIT_BAD_SETTINGS)
        for key in jwks.get("keys", []) if isinstance(jwks, dict) else []:
            if any(k in key for k in ("d", "p", "q")):
                _fail(f"{jwks_file}: holds a private key; register the public keys only",
                      EXIT_BAD_SETTINGS)
    try:
        client_id, secret = ClientRegistry(engine).create(name, wanted, jwks=jwks)
    except ValueError as exc:
        _fail(str(exc), EXIT_BAD_SETTINGS)
    if secret:
        click.echo(f"client_id: {client_id}\nsecret:    {secret}\n"
                   "Keep the secret now: it is stored hashed and cannot be shown again.")
    else:
        click.echo(f"client_id: {client_id}\n"
                   f"authenticates with private_key_jwt; token endpoint "
                   f"{settings.base_url.rstrip('/')}/oauth/token")


@clients.command("disable")
@click.argument("client_id")
def clients_disable(client_id: str) -> None:
    """Disable an API client; its requests are refused from now on."""
    from integration.clients import ClientRegistry

    settings = _settings()
    if not ClientRegistry(_engine(settings)).disable(client_id):
        _fail(f"no client {client_id}", EXIT_BAD_INPUT)
    click.echo(f"client {client_id} disabled")



# -- outreach ------------------------------------------------------------------------------------
@main.group()
def outreach() -> None:
    """Outreach: what the pathways would send."""


@outreach.command("preview")
@click.argument("patient_id")
@click.option("--at", "at", help="Plan as of this time (ISO 8601; default now).")
def outreach_preview(patient_id: str, at: str | None) -> None:
    """Print what would be sent to PATIENT_ID, when, on which channel, in which language, and
    why not where a step is skipped. Plans on the current data; writes nothing."""
    from zoneinfo import ZoneInfo

    from integration.identity import resolve_id
    from integration.outreach.state import OutreachConfig, load_snapshot
    from integration.outreach.views import preview

    settings = _settings()
    engine = _engine(settings)
    now = datetime.now(UTC)
    if at:
        try:
            now = datetime.fromisoformat(at)
        except ValueError:
            _fail(f"--at {at!r} is not an ISO 8601 date or time", EXIT_BAD_SETTINGS)
        now = now if now.tzinfo else now.replace(tzinfo=UTC)
    config = OutreachConfig.from_settings(settings)
    with engine.connect() as conn:
        survivor = resolve_id(conn, patient_id)
        if survivor is None:
            _fail(f"no patient {patient_id}", EXIT_BAD_INPUT)
        lines = preview(conn, config, survivor, now)
        recipient = load_snapshot(conn, config, [], now).recipient(config, survivor)
    zone = recipient.timezone if isinstance(recipient.timezone, ZoneInfo) else ZoneInfo("UTC")
    click.echo(f"patient {survivor}" + (f" (merged from {patient_id})"
                                        if survivor != patient_id else ""))
    if not settings.pathways:
        click.echo("no pathways configured ([[pathways]] in CARELOOP_CONFIG)")
        return
    if not lines:
        click.echo("nothing to plan: no current appointment, visit, order or care plan")
    for line in lines:
        when = (line.due_at.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z")
                if line.due_at else "-")
        stored = f" [stored: {line.stored}]" if line.stored else ""
        head = f"{line.pathway} step {line.step} · {line.summary}"
        if line.outcome == "send":
            how = f"{line.channel}, {line.language}, template {line.template}"
            note = f" ({line.reason})" if line.reason else ""
            click.echo(f"  SEND  {when:<22} {how}{note}\n        {head}{stored}")
        else:
            click.echo(f"  SKIP  {'':<22} {line.reason}\n        {head}{stored}")


@main.group()
def subscriptions() -> None:
    """FHIR Subscriptions at the EHR connections."""


@subscriptions.command("ensure")
def subscriptions_ensure() -> None:
    """Create, repair, renew or reactivate the Subscriptions of every [[connections]] entry.

    Idempotent: a second run only keeps. Prints one line per connection and resource type;
    exits 1 when any of them failed (the others still ran).
    """
    import asyncio

    from integration.fhir_subscribe import ensure_subscriptions

    settings = _settings()
    if not settings.connections:
        _fail("no [[connections]] are configured", EXIT_BAD_SETTINGS)
    engine = _engine(settings)
    try:
        lines = asyncio.run(ensure_subscriptions(engine, settings))
    finally:
        engine.dispose()
    for line in lines:
        click.echo(str(line))
    if any(line.action == "error" for line in lines):
        sys.exit(1)


# -- write-back ---------------------------------------------------------------------------------
@main.group()
def writeback() -> None:
    """The write-back outbox: Communications, AppointmentResponses, Tasks and Appointment
    updates owed to the EHRs."""


@writeback.command("list")
@click.option("--status", type=click.Choice(["pending", "sending", "failed", "written"]),
              help="Only rows in this state.")
@click.option("--limit", type=int, default=50, show_default=True)
def writeback_list(status: str | None, limit: int) -> None:
    """List outbox rows, newest first: id, key, connection, type, state, attempts, next try,
    and the EHR reference once written or the error of the last try."""
    from sqlalchemy import select

    from integration.models import ehr_outbox as table

    settings = _settings()
    engine = _engine(settings)
    query = select(
        table.c.id, table.c.key, table.c.connection, table.c.resource_type, table.c.operation,
        table.c.status, table.c.attempts, table.c.next_attempt_at, table.c.ehr_ref,
        table.c.last_error,
    ).order_by(table.c.id.desc()).limit(limit)
    if status:
        query = query.where(table.c.status == status)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    click.echo(f"{'ID':>8}  {'KEY':<32}  {'CONNECTION':<14}  {'TYPE':<19}  {'STATUS':<7}  "
               f"{'TRIES':>5}  {'NEXT TRY':<19}  REFERENCE / ERROR")
    for r in rows:
        kind = r.resource_type + (" (update)" if r.operation == "update" else "")
        when = (r.next_attempt_at.strftime("%Y-%m-%d %H:%M:%S")
                if r.status == "pending" and r.next_attempt_at else "")
        said = r.ehr_ref or (r.last_error or "").replace("\n", " ")[:80]
        click.echo(f"{r.id:>8}  {r.key[:32]:<32}  {r.connection[:14]:<14}  {kind[:19]:<19}  "
                   f"{r.status:<7}  {r.attempts:>5}  {when:<19}  {said}")


@writeback.command("replay")
@click.option("--id", "ids", type=int, multiple=True,
              help="Only these outbox ids (repeatable); failed or waiting rows.")
@click.option("--failed", is_flag=True, help="Every failed row.")
def writeback_replay(ids: tuple[int, ...], failed: bool) -> None:
    """Write rows again: failed ones (a rejection fixed at the EHR or in the configuration),
    or waiting ones now rather than after their backoff. The running service (or the
    writeback queue's workers) writes them; written rows are never written twice."""
    from integration.writeback import replay

    if not ids and not failed:
        _fail("name rows with --id or use --failed", EXIT_BAD_SETTINGS)
    settings = _settings()
    engine = _engine(settings)
    try:
        count = replay(engine, ids=list(ids) or None, failed=failed)
    finally:
        engine.dispose()
    if not count:
        click.echo("nothing to replay")
        return
    click.echo(f"{count} row{'s' if count != 1 else ''} will be written again")


# -- the patient page ----------------------------------------------------------------------------
@main.group()
def portal() -> None:
    """The patient page: signed links for patients."""


@portal.command("link")
@click.argument("patient_id")
@click.option("--ttl", default="P7D", show_default=True,
              help="How long the link works (ISO 8601 duration, e.g. P7D or PT12H).")
def portal_link(patient_id: str, ttl: str) -> None:
    """Print a link to PATIENT_ID's own page (opened with their date of birth), to send to
    the patient's own address. A merged patient's link names the surviving patient."""
    from datetime import timedelta

    from integration.delivery import link_signer
    from integration.identity import resolve_id
    from integration.outreach.pathways import parse_offset

    try:
        lifetime = parse_offset(ttl)
    except ValueError as exc:
        _fail(f"--ttl: {exc}", EXIT_BAD_SETTINGS)
    if lifetime <= timedelta(0):
        _fail("--ttl must be positive", EXIT_BAD_SETTINGS)
    settings = _settings()
    engine = _engine(settings)
    try:
        with engine.connect() as conn:
            survivor = resolve_id(conn, patient_id)
    finally:
        engine.dispose()
    if survivor is None:
        _fail(f"no patient {patient_id}", EXIT_BAD_INPUT)
    click.echo(link_signer(settings).url("p", survivor, now=datetime.now(UTC), ttl=lifetime))


# -- retention and data protection ----------------------------------------------------------
@main.command()
@click.option("--dry-run", is_flag=True, help="Count what would be removed; remove nothing.")
@click.option("--batch", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="Rows removed per transaction.")
def purge(dry_run: bool, batch: int) -> None:
    """Remove what is past the [retention] periods: processed messages, resources, finished
    touches, channel events, written outbox rows and audit events. Unprocessed rows are never
    removed. Prints a table of what was (or would be) removed; the run is an audit event."""
    from integration.retention import SETTING_OF, TABLES
    from integration.retention import purge as run_purge

    settings = _settings()
    engine = _engine(settings)
    try:
        counts = run_purge(engine, settings, batch=batch, dry_run=dry_run)
    finally:
        engine.dispose()
    click.echo(f"{'TABLE':<18}  {'RETENTION':<12}  {'WOULD REMOVE' if dry_run else 'REMOVED':>12}")
    for table in TABLES:
        period = getattr(settings.retention, SETTING_OF[table])
        kept = _iso_duration(period) if period is not None else "forever"
        click.echo(f"{table:<18}  {kept:<12}  {counts[table]:>12}")
    if not settings.retention.any_set():
        click.echo("no [retention] period is set: everything is kept")


def _iso_duration(period: Any) -> str:
    seconds = int(period.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    time = "".join(f"{n}{u}" for n, u in ((hours, "H"), (minutes, "M"), (secs, "S")) if n)
    return f"P{days}D" + (f"T{time}" if time else "") if days else f"PT{time or '0S'}"


@main.command()
@click.option("--patient", "patient_id", required=True, help="careloop patient id (a merged "
              "id exports the surviving patient).")
@click.option("--out", type=click.Path(dir_okay=False, writable=True),
              help="Write to this file instead of stdout.")
def export(patient_id: str, out: str | None) -> None:
    """Write everything careloop holds about one patient as NDJSON (one JSON object per line,
    with a "type"), for an access request. The export is recorded in the audit log."""
    import getpass

    from integration.export import UnknownPatient, write_export
    from integration.identity import resolve_id

    settings = _settings()
    engine = _engine(settings)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    try:
        with engine.connect() as conn:
            if resolve_id(conn, patient_id) is None:
                raise UnknownPatient(patient_id)
        if out:
            with open(out, "w", encoding="utf-8") as fh:
                counts = write_export(engine, patient_id, fh, actor=f"cli:{user}")
        else:
            counts = write_export(engine, patient_id, sys.stdout, actor=f"cli:{user}")
    except UnknownPatient:
        _fail(f"no patient {patient_id}", EXIT_BAD_INPUT)
    except OSError as exc:
        _fail(f"{out}: {exc.strerror}", EXIT_BAD_INPUT)
    finally:
        engine.dispose()
    if out:
        total = sum(counts.values())
        click.echo(f"{total} record{'s' if total != 1 else ''} written to {out}", err=True)


# -- console users -------------------------------------------------------------------------------
@main.group()
def users() -> None:
    """People who sign in to the web console (not API clients)."""


@users.command("create")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(["admin", "operator", "viewer"]),
              help="viewer sees counts and statuses; operator also replays; admin all.")
@click.option("--phi", is_flag=True,
              help="May see patient data (raw messages, resources, timelines); every such "
                   "view is recorded in the audit log.")
@click.option("--password-stdin", is_flag=True,
              help="Read the password from stdin (first line) instead of generating one.")
def users_create(name: str, role: str, phi: bool, password_stdin: bool) -> None:
    """Add a console user; prints a generated password once (unless --password-stdin)."""
    from integration.console.users import UserExists, create_user

    password = None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    settings = _settings()
    engine = _engine(settings)
    try:
        password = create_user(engine, name, role, password, phi=phi)
    except UserExists as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    except ValueError as exc:
        _fail(str(exc), EXIT_BAD_SETTINGS)
    finally:
        engine.dispose()
    label = f"{role}, with PHI access" if phi else role
    if password_stdin:
        click.echo(f"user {name} created ({label})")
    else:
        click.echo(f"user:     {name} ({label})\npassword: {password}\n"
                   "Keep the password now: it is stored hashed and cannot be shown again.")


@users.command("disable")
@click.argument("name")
def users_disable(name: str) -> None:
    """Disable a console user; their sessions end at once."""
    from integration.console.users import disable_user

    engine = _engine(_settings())
    try:
        done = disable_user(engine, name)
    finally:
        engine.dispose()
    if not done:
        _fail(f"no user {name}", EXIT_BAD_INPUT)
    click.echo(f"user {name} disabled")


if __name__ == "__main__":  # pragma: no cover
    main()
