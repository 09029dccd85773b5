"""`python -S tests/support/forked.py ZYGOTE_SOCKET -m module args...`: run a command forked from a test process's
zygote (tests/support/zygote.py) where a library insists on starting a program itself, as the MCP SDK's
`stdio_client` does: this small program (standard library only, no site packages; the request and its sending are
zygote.py's) hands its own stdin, stdout and stderr to the forked child, passes SIGTERM and SIGINT on to it, and
exits with its status. The child is the same `python -m ...` run as a fresh interpreter would do, without importing
the SDKs again (about a second of CPU).
`zygote.stdio_command` builds the command line."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from zygote import request_for, send_request  # beside this file (sys.path[0]): standard library only


def main(argv: list[str]) -> int:
    path, *interpreter_args = argv
    request = request_for(interpreter_args)
    if request is None:
        raise SystemExit(f"forked.py runs a script, -m module or -c command, not {interpreter_args}")
    reader = send_request(path, request, [0, 1, 2]).makefile("rb")
    pid = int(reader.readline())
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda number, _frame: pass_on(pid, number))
    quiet = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the child has them: this process keeps no end of the pipes open
        os.dup2(quiet, fd)
    line = reader.readline().decode()
    return int(line.split()[1]) if line.startswith("exit ") else 1


def pass_on(pid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it has just exited: its status follows
        os.kill(pid, number)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
