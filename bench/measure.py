"""What the benchmarks share: percentiles, a free loopback port for a server under test, each run's figures and
their medians, the table of medians against their targets, paced debits for acknowledgement latency, and a
process's CPU read from /proc."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import statistics
from pathlib import Path
from typing import Any


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


async def paced_debits(ledger: Any, rate: int, seconds: float, wallets: int) -> tuple[list[float], float]:
    """Debits of 1 LUC sent at `rate`/s for `seconds` (each on its schedule, not waiting for the previous one) to
    wallets agent-0..agent-(wallets-1): each one's acknowledgement latency in ms from when it was due, and the rate
    achieved.

    Only the debits in flight are kept, as a server keeps no finished request (against keeping every task until the
    end, alternated runs measured no difference in p99 on this machine: the choice is for fidelity, not speed)."""
    loop = asyncio.get_running_loop()
    rng = random.Random(2)
    n = int(rate * seconds)
    samples: list[float] = []
    in_flight: set[asyncio.Task[None]] = set()

    async def one(i: int, due: float) -> None:
        await ledger.debit(f"agent-{rng.randrange(wallets)}", 1, idempotency_key=f"l{i}", reason="bench")
        samples.append((loop.time() - due) * 1000)

    start = loop.time()
    for i in range(n):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i, due))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    while in_flight:
        await asyncio.gather(*in_flight)
    return samples, n / (loop.time() - start)


def proc_stat(pid: int | str) -> list[str]:
    """A process's /proc/<pid>/stat fields after its command name (so `[11]` is utime, `[12]` stime, `[1]` ppid)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_cpu(pid: int) -> float:
    """Seconds of CPU (user + system, every thread) the process has used so far."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
