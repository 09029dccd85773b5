"""Driving worker processes for the cross-process reliability tests (ledger, metering, x402): releasing several at
once onto one database, and killing one with SIGKILL partway through its acknowledgements."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

from tests.support.zygote import spawn


def start_together(commands: list[list[str]]) -> list[Any]:
    """Start every worker (forked from the preloaded zygote: tests/support/zygote.py), wait until each prints `ready`
    (loaded and connected), then release them all at once with `go`, so they contend for the one write lock rather
    than run one after another."""
    processes = [spawn(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for command in commands]
    for process in processes:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    return processes


def run_together(commands: list[list[str]], *, timeout: float) -> list[str]:
    """`start_together`, then each one's stdout; a worker that fails fails the test with its stderr."""
    processes = start_together(commands)
    outputs = [process.communicate(timeout=timeout) for process in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
    return [out for out, _ in outputs]


def rest_of(process: Any) -> tuple[str, str]:
    """What a killed process still had in its pipes, read through the same buffered streams `readline()` used
    (`communicate()` reads the pipes' descriptors and would drop what readline() had read ahead, leaving a torn first
    line); nothing writes any more, so reading stdout to its end before stderr cannot block."""
    assert process.stdout is not None and process.stderr is not None
    rest, err = process.stdout.read(), process.stderr.read()
    process.wait(timeout=30)
    return rest, err


def kill_midway(command: list[str], after_lines: int, *, label: str,
                within: float = 30) -> tuple[list[str], list[str]]:
    """Run a worker that prints one line per acknowledged write, SIGKILL it after `after_lines` of them (or `within`
    seconds), and return the lines read before the kill and those it had written by then (the last may be cut)."""
    process = spawn(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    before: list[str] = []
    deadline = time.monotonic() + within
    try:
        while len(before) < after_lines and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            before.append(line)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        rest, err = rest_of(process)
    assert process.returncode == -signal.SIGKILL, err
    assert before, f"{label}: the worker acknowledged nothing before the kill: {err}"
    return before, rest.splitlines()
