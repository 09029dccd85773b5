"""Shared fixtures: an in-memory sandbox, settings on a temporary database, and an MCP client connected in memory
to the real server (real gateway, real SDK, real SQLite): tests call tools by name, exactly as an agent does."""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from mcp import Client
from mcp.types import CallToolResult
from starlette.applications import Starlette

from aims_billing_mcp.acp_http import acp_routes
from aims_billing_mcp.app import BillingServer, build_server
from aims_billing_mcp.http_transport import loopback_socket, uvicorn_server
from aims_billing_mcp.redact import forget_secrets
from aims_billing_mcp.sandbox import Sandbox, create_app
from aims_billing_mcp.services.acp import AcpService
from aims_billing_mcp.services.commerce import PaymentSessionService
from aims_billing_mcp.services.fulfilment import Fulfilment
from aims_billing_mcp.services.ledger import LedgerService
from aims_billing_mcp.services.prepaid import PrepaidSubscriptions
from aims_billing_mcp.services.subscriptions import SubscriptionService
from aims_billing_mcp.services.tiers import Pricing
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.state import AppState, acp_seller, open_state
from aims_billing_mcp.store import Store
from aims_billing_mcp.stripe_gateway import StripeGateway, StripeRequest, build_gateway


def pytest_configure(config: pytest.Config) -> None:
    """The controller (not an xdist worker) writes the bytecode every process would otherwise compile again, before
    the workers start (tests/support/precompile.py), and puts the run's temporary files in memory when it can."""
    if not hasattr(config, "workerinput"):
        from tests.support.precompile import precompile

        precompile(config, workers=int(config.getoption("numprocesses", None) or 0))
        in_memory_basetemp(config)


MEMORY_TMP = Path("/dev/shm")
MEMORY_NEEDED = 4 * 2**30  # a whole run writes ~600 MB there (databases, PostgreSQL clusters), removed at its end


def in_memory_basetemp(config: pytest.Config) -> None:
    """Every test's tmp_path (its SQLite databases, the PostgreSQL clusters) on a tmpfs instead of the disk, when
    the machine has one with room and nobody chose `--basetemp`: each commit, checkpoint and close is a write to the
    file system, and on these VMs' disks they made the suite ~10% slower. A directory of the run's own (runs side by
    side do not meet), removed when the run ends."""
    if config.option.basetemp or not os.access(MEMORY_TMP, os.W_OK):
        return
    if shutil.disk_usage(MEMORY_TMP).free < MEMORY_NEEDED:
        return
    run = Path(tempfile.mkdtemp(prefix="aims-billing-pytest-", dir=MEMORY_TMP))
    config.option.basetemp = str(run / "t")
    config.add_cleanup(lambda: shutil.rmtree(run, ignore_errors=True))


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run under anyio's plugin (`pytestmark = pytest.mark.anyio`), which keeps an async fixture's
    setup and teardown in one task, as the MCP client's cancel scopes require."""
    return "asyncio"


@pytest.fixture(autouse=True, scope="session")
def output_validators_shared_across_sessions() -> Iterator[None]:
    """The MCP client compiles a tool's output schema (a metaschema check, then a validator: ~10 ms) once per
    session, and the suite opens a session per test: ~2,000 compilations of the same few dozen schemas. So the
    compiled validator is shared, keyed by the schema's JSON; every result is still validated against its tool's
    schema exactly as before. If the SDK renames the method, setattr raises and every test says so."""
    from mcp.client.session import ClientSession

    compile_one = ClientSession._output_schema_validator
    compiled: dict[str, Any] = {}

    def shared(session: ClientSession, name: str, output_schema: dict[str, Any]) -> Any:
        key = json.dumps(output_schema, sort_keys=True)
        if key not in compiled:
            compiled[key] = compile_one(session, name, output_schema)
        return compiled[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ClientSession, "_output_schema_validator", shared)
        yield


@pytest.fixture(autouse=True, scope="session")
def output_schemas_read_from_the_in_memory_server() -> Iterator[None]:
    """A client validates each structured result against its tool's output schema, which it learns by listing the
    server's tools before the first call of a session: with ~50 tools and their schemas that listing costs ~12 ms
    (serialized by the server, validated by the client), once per session, ~1,000 sessions. A client connected in
    memory to a server object is given that server's declared output schemas when it connects instead (the very
    values the listing carries: MCPServer.list_tools copies `output_schema`); every result is still validated
    against them, and a tool they lack still makes the client list. Tests of the listing call list_tools as before.
    If the SDK renames what this reads, setattr or the attribute access fails and every test says so."""
    from mcp.server.mcpserver import MCPServer

    enter = Client.__aenter__

    async def entered(self: Client) -> Client:
        connected = await enter(self)
        if isinstance(self.server, MCPServer):
            connected.session._tool_output_schemas.update(
                {tool.name: tool.output_schema for tool in self.server._tool_manager.list_tools()})
        return connected

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Client, "__aenter__", entered)
        yield


@pytest.fixture(autouse=True, scope="session")
def one_tls_context_for_every_http_client() -> Iterator[None]:
    """httpx (and the SDK's fork, httpx2) builds a TLS context for every client, loading the CA bundle: about 20 ms
    of CPU, paid even by a client that only speaks plain HTTP to a loopback test server, and the suite makes
    hundreds (py-spy: 8% of its time). Clients with the default settings share one context here, as the product's
    webhook deliveries do (services/acp_webhooks.py); any other setting builds its own."""
    import httpx
    import httpx._transports.default as httpx_transports
    import httpx2._transports.default as httpx2_transports

    shared = httpx.create_ssl_context()
    originals = [(module, module.create_ssl_context) for module in (httpx_transports, httpx2_transports)]

    def sharing(original: Callable[..., Any]) -> Callable[..., Any]:
        def create(verify: Any = True, cert: Any = None, trust_env: bool = True) -> Any:
            if verify is True and cert is None and trust_env:
                return shared
            return original(verify=verify, cert=cert, trust_env=trust_env)
        return create

    for module, original in originals:
        module.create_ssl_context = sharing(original)  # type: ignore[attr-defined]
    yield
    for module, original in originals:
        module.create_ssl_context = original  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def skip_slow_unless_selected(request: pytest.FixtureRequest) -> None:
    """Slow variants (`@pytest.mark.slow`) run only when asked for (`-m slow`): the suite's default run has no
    marker filter, so the README's one test command stays quick."""
    if request.node.get_closest_marker("slow") and "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("a long reliability run: select it with -m slow")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may see the developer's or CI's Stripe key or settings, nor a .env in the working directory."""
    for name in list(os.environ):
        if name.startswith(("STRIPE_", "AIMS_BILLING_", "AIMS_X402_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def forget_configured_secrets() -> Iterator[None]:
    """Secrets one test's settings registered for masking by value (redact.py) do not mask the next test's output."""
    yield
    forget_secrets()


class Clock:
    """A clock the test moves by hand: services take `clock=` so time-based rules are tested without sleeping."""

    def __init__(self, now: float | None = None) -> None:
        self.now = float(int(time.time()) if now is None else now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database migrated once per session (per xdist worker): a test's database starts as a copy of it, a file
    copy instead of running every migration again (~0.1 s a time). It is made by the same Store() a test would
    run, so a broken migration still fails every test that opens a store."""
    path = tmp_path_factory.mktemp("migrated") / "template.db"
    Store(path).close()  # closing checkpoints the WAL into the file: the copy is the whole database
    return path


def copy_of(template: Path, path: Path) -> Path:
    """`path`, a copy of the migrated template unless a database is already there."""
    if not path.exists():
        shutil.copyfile(template, path)
    return path


@functools.cache
def _process_template() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="aims-template-"))
    atexit.register(shutil.rmtree, folder, True)
    Store(folder / "template.db").close()
    return folder / "template.db"


def migrated_copy(path: Path | str) -> Path:
    """`path`, a copy of a database migrated once per process, for code that cannot take the `migrated_db` fixture
    (each example of a hypothesis test, a state machine): a file copy instead of every migration per example."""
    return copy_of(_process_template(), Path(path))


@pytest.fixture
def store(tmp_path: Path, migrated_db: Path) -> Iterator[Store]:
    """A migrated store on a temporary file (reader and writer need a file, not :memory:)."""
    s = Store(copy_of(migrated_db, tmp_path / "store.db"))
    yield s
    s.close()


@pytest.fixture
def sandbox_app() -> Iterator[Any]:
    app = create_app(db_path=":memory:")
    yield app
    app.state.sandbox.close()


@pytest.fixture
def sandbox(sandbox_app: Any) -> Sandbox:
    return sandbox_app.state.sandbox  # type: ignore[no-any-return]


@pytest.fixture
def make_settings(tmp_path: Path, migrated_db: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"aims_billing_db": tmp_path / "billing.db"}
        if "aims_billing_db" not in overrides:  # a database a test names itself starts as it says (empty, damaged)
            copy_of(migrated_db, values["aims_billing_db"])
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


@pytest.fixture
def make_server(make_settings: Callable[..., Settings], sandbox_app: Any) -> Callable[..., BillingServer]:
    def make(**overrides: Any) -> BillingServer:
        return build_server(make_settings(**overrides), sandbox_app=sandbox_app, retry_delay_scale=0.0)

    return make


@pytest.fixture
def server(make_server: Callable[..., BillingServer]) -> BillingServer:
    """The server with default settings, for tests that need it beside a client (e.g. to give a customer a tier)."""
    return make_server()


@pytest.fixture
async def prices(make_settings: Callable[..., Settings], sandbox_app: Any) -> dict[str, str]:
    """setup-stripe run against the test's sandbox: tier id -> price id (found by lookup key, env not set)."""
    from aims_billing_mcp.services.stripe_setup import setup_stripe

    gateway = build_gateway(make_settings(), sandbox_app=sandbox_app, retry_delay_scale=0)
    setup = await setup_stripe(gateway, Pricing.load())
    await gateway.close()
    return {r.tier: r.price for r in setup.paid if r.price}


@pytest.fixture
async def client(make_server: Callable[..., BillingServer]) -> AsyncIterator[Client]:
    async with Client(make_server()) as connected:
        yield connected


@dataclass
class CommerceStack:
    """Payment sessions on the sandbox, from the graph state.py builds; ACP sellers are built on top of it."""

    state: AppState

    @property
    def store(self) -> Store:
        return self.state.store

    @property
    def gateway(self) -> StripeGateway:
        return self.state.gateway

    @property
    def ledger(self) -> LedgerService:
        return self.state.ledger

    @property
    def pricing(self) -> Pricing:
        return self.state.pricing

    @property
    def payments(self) -> PaymentSessionService:
        return self.state.commerce

    @property
    def subscriptions(self) -> SubscriptionService:
        return self.state.subscriptions

    @property
    def prepaid(self) -> PrepaidSubscriptions:
        return self.state.prepaid

    @property
    def fulfilment(self) -> Fulfilment:
        return self.state.fulfilment

    def seller(self, api_keys: set[str], **options: Any) -> AcpService:
        """An ACP seller over these payments (the one their fulfilment settles orders with from now on)."""
        return acp_seller(self.state, api_keys=api_keys, **options)

    @asynccontextmanager
    async def acp_seller(self, api_key: str, **options: Any) -> AsyncIterator[tuple[httpx.AsyncClient, AcpService]]:
        """An ACP seller over these payments, its REST routes reached in process at https://seller.test."""
        acp = self.seller({api_key}, **options)
        app = Starlette(routes=acp_routes(lambda: SimpleNamespace(acp=acp)))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://seller.test") as http:
            yield http, acp


@asynccontextmanager
async def commerce_stack(settings: Settings, sandbox_app: Any, store: Store, *,
                         buyer_wallet: bool = True) -> AsyncIterator[CommerceStack]:
    """The stack on `store` with any number of wallets per customer and, by default, an open wallet for agent
    `buyer` (customer cus_team) to credit."""
    async with open_state(settings, sandbox_app=sandbox_app, store=store, retry_delay_scale=0,
                          agent_limit=lambda _customer: None) as state:
        if buyer_wallet:
            await state.ledger.create_wallet("buyer", "cus_team", None, "open-buyer")
        try:
            yield CommerceStack(state)
        finally:
            await state.prepaid.drain()


async def paid_outside(gateway: StripeGateway, payment_intent: str) -> dict[str, Any]:
    """The buyer's own client confirms the PaymentIntent with a test Visa (not our confirm tool): what Stripe says.
    Our side hears of it only by re-reading it or by its webhook."""
    confirmed: dict[str, Any] = (await gateway.send(StripeRequest(
        "post", f"/v1/payment_intents/{payment_intent}/confirm", {"payment_method": "pm_card_visa"}))).data
    return confirmed


async def record_paid(store: Store, payments: PaymentSessionService, payment_intent: str,
                      gateway: StripeGateway) -> None:
    """A payment made outside our tools and recorded (its fulfilment written: a tier's subscription queued), with
    nothing started yet: the state a crash right after the recording leaves."""
    pi = await paid_outside(gateway, payment_intent)
    await store.write(lambda conn: payments.apply_payment_intent(conn, pi))


class PromptlyStopped(uvicorn.Server):
    """The same server (its config, app, lifespan and graceful shutdown), stopped as soon as it is told: uvicorn's
    own loop looks at `should_exit` every 0.1 s and its shutdown then sleeps 0.1 s for connections to finish, ~0.15 s
    per served test (135 of them) spent waiting. Here the loop waits on an event, and shutdown waits for the open
    connections themselves to close (each was asked to, as uvicorn does) instead of a fixed 0.1 s."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.stop = anyio.Event()
        self.ready = anyio.Event()  # set once it listens (uvicorn only sets `started`, a flag to poll)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.ready.set()

    async def main_loop(self) -> None:
        await self.on_tick(0)  # the Date and Server headers, as uvicorn's first tick sets them
        await self.stop.wait()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        with anyio.fail_after(5):
            while self.server_state.connections or self.server_state.tasks:
                await anyio.sleep(0.001)
        for server in self.servers:
            await server.wait_closed()
        await self.lifespan.shutdown()


@asynccontextmanager
async def serving_on_loopback(make: Callable[[int], uvicorn.Server], *, start_within: float = 20) -> AsyncIterator[str]:
    """A uvicorn server (built by `make` for the port) on a free loopback port; yields its base URL, then stops it.
    The socket is bound before the server is built, so no two tests can race for a port."""
    sock = loopback_socket(0)
    port = sock.getsockname()[1]
    web = PromptlyStopped(make(port).config)
    with sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: web.serve(sockets=[sock]))
            with anyio.fail_after(start_within):
                await web.ready.wait()
            yield f"http://127.0.0.1:{port}"
            web.should_exit = True
            web.stop.set()


def serving_app(app: Any, *, start_within: float = 20) -> AbstractAsyncContextManager[str]:
    """A bare ASGI app (a test's receiver or facilitator) on a free loopback port; yields its base URL."""
    return serving_on_loopback(lambda _port: uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off")),
                               start_within=start_within)


def serving_http(server: BillingServer, *, token: str | None = None) -> AbstractAsyncContextManager[str]:
    """The server's HTTP app (MCP at /mcp, webhooks, x402) on a free loopback port; yields its base URL."""
    return serving_on_loopback(lambda port: uvicorn_server(server, host="127.0.0.1", port=port, token=token))


async def queued_together(store: Any, writes: Iterable[Coroutine[Any, Any, Any]], *, settle: float = 0,
                          return_exceptions: bool = False) -> list[Any]:
    """The outcomes of `writes` (coroutines that each queue a write of `store`), run while a job of its own holds
    the writer, so every one of them is queued before the writer takes the next batch: they reach it together."""
    gate = threading.Event()
    blocker = store.submit(lambda conn: gate.wait(5))
    pending = [asyncio.ensure_future(write) for write in writes]
    await asyncio.sleep(settle)  # each runs to its queued write
    gate.set()
    outcomes = await asyncio.gather(*pending, return_exceptions=return_exceptions)
    assert blocker.result() is True  # the hold ended because it was released, not by its timeout
    return outcomes


def ok(result: CallToolResult) -> dict[str, Any]:
    """The structured result of a call that must have succeeded."""
    assert not result.is_error, result.content
    assert isinstance(result.structured_content, dict)
    return result.structured_content


def error_of(result: CallToolResult) -> dict[str, Any]:
    """The structured error of a call that must have failed, with its text for the agent."""
    assert result.is_error, result.structured_content
    assert isinstance(result.structured_content, dict), result.content
    err: dict[str, Any] = result.structured_content["error"]
    err["text"] = result.content[0].text  # type: ignore[union-attr]
    return err


def table_digests(db: Path | str, *, skip: tuple[str, ...] = ("audit_log", "sqlite_sequence")) -> dict[str, str]:
    """A digest of every table but `skip`, read through its own connection: what a refused call must not change."""
    import hashlib
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                  if row[0] not in skip]
        return {table: hashlib.sha256(repr(conn.execute(f'SELECT * FROM "{table}"').fetchall()).encode())
                .hexdigest() for table in tables}
    finally:
        conn.close()


# --- PostgreSQL (issue 15): one throwaway cluster per test session, a fresh migrated database per test ----------


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    from tests.support.pg import Cluster

    started = Cluster().start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def postgres_url(pg_cluster: Any) -> Iterator[str]:
    """A database of its own at the code's schema, empty, for one test; given back after it, emptied, for a later
    one (a database whose schema the test changed is dropped instead: tests/support/pg.py `give_back`)."""
    url = str(pg_cluster.fresh_database())
    yield url
    pg_cluster.give_back(url)


@pytest.fixture
def open_postgres_store(postgres_url: str) -> Iterator[Callable[..., Any]]:
    """`open_postgres_store(writers=, pool_size=)`: one more PostgresStore on the test's database (one of several
    "servers" sharing it), each closed after the test."""
    from aims_billing_mcp.store import PostgresStore

    opened: list[Any] = []

    def open_store(*, writers: int = 1, pool_size: int = 2) -> Any:
        opened.append(PostgresStore(postgres_url, writers=writers, pool_size=pool_size))
        return opened[-1]

    yield open_store
    for store in opened:
        store.close()


@pytest.fixture
def two_instances(open_postgres_store: Callable[..., Any]) -> tuple[Any, Any]:
    """Two "servers": two PostgresStore on one database, each with its own writer and pool."""
    return open_postgres_store(), open_postgres_store()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The store under test, on each backend: the axis the aggregates' contract tests (tests/store/test_*.py) run
    along; a PostgreSQL database of its own per test."""
    if request.param == "postgres":
        from aims_billing_mcp.store import PostgresStore

        store: Any = PostgresStore(request.getfixturevalue("postgres_url"), writers=2, pool_size=2)
    else:  # a copy of the migrated template, as the `store` fixture's
        store = Store(copy_of(request.getfixturevalue("migrated_db"), tmp_path / "store.db"))
    yield store
    store.close()


@pytest.fixture
def write(backend: Any) -> Callable[[Callable[[Any], Any]], Any]:
    """The backend's synchronous write: `write(job)` runs `job(tx)` in its writer's next transaction (the same `?`
    statement texts on both backends: store/postgres_sql.py)."""
    return backend.write_sync  # type: ignore[no-any-return]
