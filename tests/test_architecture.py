"""ARCHITECTURE.md stays true: every package and module it names exists, and its state-machine block is what the
code's transition tables say (rendered here; a mismatch prints the block to paste)."""

from __future__ import annotations

import importlib
import re
from enum import Enum
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
PACKAGE = ROOT / "aims_billing_mcp"

MACHINES = (
    ("store/ledger.py", "HoldStatus", "TRANSITIONS"),
    ("store/metering.py", "EventStatus", "TRANSITIONS"),
    ("store/x402.py", "QuoteStatus", "TRANSITIONS"),
    ("store/commerce.py", "SessionStatus", "TRANSITIONS"),
    ("store/prepaid.py", "PrepaidStatus", "TRANSITIONS"),
    ("store/acp.py", "CheckoutStatus", "TRANSITIONS"),
    ("store/acp.py", "OrderStatus", "ORDER_TRANSITIONS"),
    ("store/webhooks.py", "EventState", "EVENT_TRANSITIONS"),
    ("store/webhooks.py", "SubscriptionStatus", "STATUS_TRANSITIONS"),
    ("store/connect.py", "AccountStatus", "ACCOUNT_TRANSITIONS"),
    ("store/connect.py", "SplitStatus", "SPLIT_TRANSITIONS"),
)


def word(state: Enum) -> str:
    return state.name.lower() if isinstance(state.value, int) else str(state.value)


def render(module: str, enum: str, table: str) -> str:
    found = importlib.import_module("aims_billing_mcp." + module.removesuffix(".py").replace("/", "."))
    transitions: dict[Enum, frozenset[Enum]] = getattr(found, table)
    assert set(transitions) == set(getattr(found, enum)), f"{table} must list every {enum}"
    everything = frozenset(transitions)
    groups: dict[frozenset[Enum] | None, list[Enum]] = {}
    for state, targets in transitions.items():
        if targets:  # None: every other state
            other = targets == everything - {state} and len(targets) > 4
            groups.setdefault(None if other else targets, []).append(state)
    parts = [f"{', '.join(word(s) for s in states)} → "
             f"{'any other state' if targets is None else ', '.join(sorted(word(t) for t in targets))}"
             for targets, states in groups.items()]
    final = [word(state) for state, targets in transitions.items() if not targets]
    if final:
        parts.append(f"{', '.join(final)} final")
    return f"- `{module}` `{enum}` (`{table}`): {'; '.join(parts)}"


def test_every_module_and_package_it_names_exists() -> None:
    named = set(re.findall(r"`((?:aims_billing_mcp/)?(?:store|services|tools|sandbox|migrations)?/?[\w/]+\.py)`",
                           DOC)) | set(re.findall(r"`(aims_billing_mcp/[\w/]*)`", DOC))
    missing = [path for path in sorted(named)
               if not (ROOT / path).exists() and not (PACKAGE / path).exists()
               and not any((PACKAGE / part / path).exists() for part in ("services", "store", "tools"))]
    assert len(named) > 20 and missing == []


def test_the_state_machine_block_is_rendered_from_the_transition_tables() -> None:
    block = DOC.split("<!-- machines:start -->\n", 1)[1].split("<!-- machines:end -->", 1)[0]
    expected = "\n".join(render(*machine) for machine in MACHINES) + "\n"
    assert block == expected, f"paste this between the machines markers of ARCHITECTURE.md:\n{expected}"


def test_only_the_store_talks_to_a_database_driver() -> None:
    """The storage seam (ARCHITECTURE.md): no module outside `store/` imports sqlite3 or psycopg (the embedded
    sandbox, which plays Stripe, keeps its own SQLite file)."""
    import ast

    drivers = {"sqlite3", "psycopg", "psycopg_pool"}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in ("store", "sandbox"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{relative}: {name}" for name in names if name.split(".")[0] in drivers]
    assert offenders == []
