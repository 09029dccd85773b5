"""What the benchmarks share: percentiles, a free loopback port for a server under test, each run's figures and
their medians, and the table of medians against their targets."""

from __future__ import annotations

import socket
import statistics


def percentile(samples: list[float], q: float) -> float:
    """The nearest-rank q-quantile of the samples (q = 0.5 for p50, 0.99 for p99)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def print_checks(checks: list[tuple[str, float, str, bool | None]], *, width: int) -> None:
    """One line per figure: label, value, its target (if any) and whether the target was met."""
    for label, value, target, ok in checks:
        verdict = "" if ok is None else ("  met" if ok else "  MISSED")
        print(f"  {label:<{width}} {value:>12,.2f}  {target:<10}{verdict}")


def print_run(run: int, figures: dict[str, float]) -> None:
    """One run's figures as they come in (the raw values behind the medians)."""
    print(f"run {run + 1}: " + ", ".join(f"{k}={v:,.2f}" for k, v in figures.items()), flush=True)


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the runs."""
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}
