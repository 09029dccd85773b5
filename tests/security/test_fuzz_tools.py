"""Fuzz every registered tool from its own inputSchema: wrong types, extremes, huge and odd strings, unknown keys and
deep nesting. For every call: a result or a clean isError naming a field or a state; never an internal error, never
a protocol error; a refused call changes no table but audit_log. A new tool is covered without a new test.

The default run is short (AIMS_FUZZ_EXAMPLES examples per tool, 8 by default: about 300 calls); `-m slow` runs
AIMS_FUZZ_SLOW_EXAMPLES (200) per tool.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client
from mcp.types import CallToolResult

from aims_billing_mcp.app import build_server
from aims_billing_mcp.sandbox import create_app
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.tools import TOOLS
from tests.conftest import table_digests

EXAMPLES = int(os.environ.get("AIMS_FUZZ_EXAMPLES", "8"))
SLOW_EXAMPLES = int(os.environ.get("AIMS_FUZZ_SLOW_EXAMPLES", "200"))
TOOL_NAMES = [spec.name for spec in TOOLS]

HOSTILE_NUMBERS = [0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 10**15, 10**15 + 1, 10**30,
                   0.5, 3.0, -0.0, 1e308, float("nan"), float("inf"), float("-inf")]
HOSTILE_STRINGS = ["", " ", "7", "-1", "true", "null", "x" * 10_000, "é" * 5_000, "\x00", "a\x00b", "\ud800",
                   "\udfff tail", "\u202eevil", "\u200b", "cus_" + "9" * 300, "sk_test_" + "a" * 24,
                   "'; DROP TABLE agent_wallets; --", "../../etc/passwd", "{}", "[]", "cus_\n", "0x" + "f" * 40,
                   "https://example.com/" + "a" * 3000, "\U0001f600" * 100]
HUGE_STRING = "y" * 1_000_000


def deep(levels: int) -> Any:
    value: Any = "bottom"
    for i in range(levels):
        value = {"a": value} if i % 2 else [value]
    return value


HOSTILE_SHAPES = [None, True, False, [], {}, [1, "a", None], {"k": "v"}, {"k": {"k": {"k": 1}}}, deep(40), deep(100),
                  {str(i): "v" for i in range(100)}, ["v"] * 1000]

hostile = st.one_of(st.sampled_from(HOSTILE_NUMBERS), st.sampled_from(HOSTILE_STRINGS),
                    st.sampled_from(HOSTILE_SHAPES), st.integers(), st.text(max_size=50),
                    st.just(HUGE_STRING))


def plausible(schema: dict[str, Any], name: str) -> st.SearchStrategy[Any]:
    """A value of roughly the right type and range, so calls reach past validation into the services."""
    options = schema.get("anyOf") or schema.get("oneOf")
    if options:
        return st.one_of([plausible(option, name) for option in options])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "integer":
        low = schema.get("minimum", schema.get("exclusiveMinimum", -5) + 1 if "exclusiveMinimum" in schema else -5)
        high = schema.get("maximum", low + 5000)
        return st.integers(min_value=int(low), max_value=int(min(high, low + 10**6)))
    if kind == "number":
        return st.floats(min_value=schema.get("minimum"), max_value=schema.get("maximum"), allow_nan=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(plausible(schema.get("items", {}), name), max_size=3)
    if kind == "object":
        return st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)
    prefix = {"customer": "cus_", "price": "price_", "product": "prod_", "session": "aps_", "hold": "hold_",
              "quote": "q_"}
    start = next((p for key, p in prefix.items() if key in name), "")
    return st.builds(lambda tail: start + tail, st.sampled_from(["fuzz", "fuzz-agent", "alice", "x1", "team_1"]))


def arguments(schema: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A third each: every required parameter plausible (optional ones sometimes), so calls reach the services;
    the same with one parameter hostile; and chaos (each parameter absent, plausible or hostile, maybe an unknown
    key)."""
    properties: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    defs = schema.get("$defs", {})

    def resolve(prop: dict[str, Any]) -> dict[str, Any]:
        ref = prop.get("$ref")
        return defs.get(ref.rsplit("/", 1)[-1], {}) if isinstance(ref, str) else prop

    good = {name: plausible(resolve(prop), name) for name, prop in properties.items()}
    valid = st.fixed_dictionaries({name: good[name] for name in required},
                                  optional={name: good[name] for name in properties if name not in required})

    def one_bad(args: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
        return {**args, name: value}

    names = sorted(properties) or ["zzz"]
    spoiled = st.builds(one_bad, valid, st.sampled_from(names), hostile)
    unknown = st.dictionaries(st.sampled_from(["amout", "zzz", "__proto__", "customer_id "]), hostile, max_size=1)
    chaos = st.builds(lambda args, extra: {**args, **extra},
                      st.fixed_dictionaries({}, optional={n: st.one_of(good[n], hostile) for n in properties}),
                      unknown)
    return st.one_of(valid, spoiled, chaos)  # type: ignore[arg-type]


@dataclass
class Fuzzer:
    portal: BlockingPortal
    client: Client
    db: Path
    sandbox: Any
    counts: Counter[str] = field(default_factory=Counter)

    def fingerprint(self) -> dict[str, str]:
        return table_digests(self.db)

    def call(self, tool: str, args: dict[str, Any]) -> CallToolResult:
        before = self.fingerprint()
        result: CallToolResult = self.portal.call(self.client.call_tool, tool, args)
        self.sandbox.webhooks.drain(timeout=10)  # events a successful call caused land before the next snapshot
        self.counts["calls"] += 1
        if result.is_error:
            self.counts["clean errors"] += 1
            changed = {t for t, digest in self.fingerprint().items() if before.get(t) != digest}
            assert not changed, f"{tool} refused but changed {changed}: {args!r:.300}"
        else:
            self.counts["results"] += 1
        return result


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzer]:
    folder = tmp_path_factory.mktemp("fuzz")
    db = folder / "billing.db"
    app = create_app(db_path=":memory:")
    config = Settings(_env_file=None, aims_billing_db=db, aims_billing_flush_interval_seconds=0,  # type: ignore[call-arg]
                      aims_billing_p2p_agents=3)
    server = build_server(config, sandbox_app=app, retry_delay_scale=0.0)
    with start_blocking_portal() as portal:
        client = portal.wrap_async_context_manager(Client(server))
        with client as connected:
            fuzz = Fuzzer(portal, connected, db, app.state.sandbox)
            yield fuzz
            print(f"\nfuzz: {dict(fuzz.counts)}")
    app.state.sandbox.close()


def assert_clean(tool: str, args: dict[str, Any], result: CallToolResult) -> None:
    if not result.is_error:
        assert isinstance(result.structured_content, dict)
        return
    assert isinstance(result.structured_content, dict), result.content
    if "x402Version" in result.structured_content and result.structured_content.get("accepts"):
        return  # an x402 challenge (PaymentRequired): the paid tool's answer to a call without a payment
    error = result.structured_content.get("error")
    assert isinstance(error, dict), result.structured_content
    text = result.content[0].text if result.content else ""  # type: ignore[union-attr]
    assert "internal error" not in text, f"{tool}({args!r:.300}) -> {text}"
    assert error["code"] != "billing_error", f"{tool}({args!r:.300}) -> {text}"
    if error["code"] == "invalid_input":
        assert error.get("param"), f"{tool}: an invalid-input error must name its field: {text}"


def fuzz_tool(fuzzer: Fuzzer, tool: str, examples: int) -> None:
    schema = next(spec for spec in json.loads((Path(__file__).parents[2] / "tools.json").read_text())["tools"]
                  if spec["name"] == tool)["inputSchema"]

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(arguments(schema))
    def run(args: dict[str, Any]) -> None:
        assert_clean(tool, args, fuzzer.call(tool, args))

    run()


@pytest.mark.parametrize("tool", TOOL_NAMES)
def test_every_tool_answers_hostile_arguments_cleanly_and_a_refusal_writes_nothing(fuzzer: Fuzzer,
                                                                                   tool: str) -> None:
    fuzz_tool(fuzzer, tool, EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("tool", TOOL_NAMES)
def test_every_tool_survives_a_long_fuzz_run(fuzzer: Fuzzer, tool: str) -> None:
    fuzz_tool(fuzzer, tool, SLOW_EXAMPLES)
