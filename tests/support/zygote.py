"""Worker processes forked from a preloaded interpreter, for the multi-process tests.

A worker (`python tests/support/x402_worker.py ...`, `python -m aims_billing_mcp ...`) spends about a second of
CPU importing the SDKs (mcp, stripe, pydantic, eth-account, x402, psycopg) before it does anything, and the suite
starts dozens of them on a 2-core machine. So each test process keeps one *zygote*: a Python process that has
imported those modules once and forks a child per worker (as gunicorn's `--preload` does). The child is a real,
separate OS process with its own pid, pipes, environment, working directory, database connections and signals (a
SIGKILL or SIGSTOP hits it alone); it then runs the same script or module as `__main__`, exactly as the interpreter
would. Only the imports are shared, and the zygote imports nothing that opens a file, a socket or a thread.

`spawn()` takes the same arguments as `subprocess.Popen` (the subset the tests use) and answers an object with
Popen's interface (`pid`, `stdin`/`stdout`/`stderr`, `poll`, `wait`, `communicate`, `kill`, `returncode`); a
command it cannot run that way (another program, other interpreter options) goes to `subprocess.Popen` itself.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import io
import json
import os
import runpy
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any

PIPE, DEVNULL, STDOUT = subprocess.PIPE, subprocess.DEVNULL, subprocess.STDOUT
PRELOAD = ("aims_billing_mcp.app", "aims_billing_mcp.cli", "aims_billing_mcp.state", "aims_billing_mcp.sandbox",
           "aims_billing_mcp.store", "aims_billing_mcp.services.x402", "eth_account", "psycopg", "psycopg_pool",
           "x402.mechanisms.evm.exact.facilitator", "httpx", "uvicorn")
ROOT = Path(__file__).resolve().parents[2]


# --- the zygote process ----------------------------------------------------------------------------------------


def serve(path: str) -> None:
    """Import PRELOAD, listen on the Unix socket `path`, fork a child per request, and report each child's exit
    status on its request's connection. Exits when its parent (the test process) closes its stdin."""
    for name in PRELOAD:
        with contextlib.suppress(ImportError):  # preloading only saves time: a child imports what it needs anyway
            importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, socket.socket] = {}
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "request")
    selector.register(wake_read, selectors.EVENT_READ, "exited")
    selector.register(0, selectors.EVENT_READ, "parent")
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        for key, _ in selector.select():
            if key.data == "parent" and not os.read(0, 4096):
                return  # the test process is gone
            if key.data == "exited":
                _drain(wake_read)
                _report_exits(children)
            if key.data == "request":
                conn, _ = listener.accept()
                request, fds = _receive(conn)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:  # the child: nothing of the zygote's but its imports
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    selector.close()
                    for sock in (listener, conn, *children.values()):
                        sock.close()
                    for fd in (wake_read, wake_write):
                        os.close(fd)
                    _run_child(request, fds)  # never returns
                for fd in fds:
                    os.close(fd)
                children[pid] = conn
                conn.sendall(f"{pid}\n".encode())
                _report_exits(children)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _report_exits(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(OSError):  # the test stopped waiting for it
                conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
            conn.close()


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
        more = conn.recv(1 << 16)
        if not more:
            raise ConnectionError("the request was cut short")
        data += more
    request: dict[str, Any] = json.loads(data[4:4 + struct.unpack("!I", data[:4])[0]])
    return request, list(fds)


def _run_child(request: dict[str, Any], fds: list[int]) -> None:
    """Become the worker: its stdio, environment and directory, then its `__main__`; exit as the interpreter
    would (atexit handlers run, stdio flushed), with its status."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            if fd != target:
                os.dup2(fd, target)
        for fd in set(fds):
            if fd > 2:
                os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        unbuffered = request["unbuffered"] or bool(os.environ.get("PYTHONUNBUFFERED"))
        sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8",
                                      write_through=unbuffered)
        sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)), encoding="utf-8",
                                      errors="backslashreplace", line_buffering=True)
        code = _main(request["mode"], request["target"], request["args"])
    except SystemExit as exit_:
        code = _exit_code(exit_)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _main(mode: str, target: str, args: list[str]) -> int:
    try:
        if mode == "script":
            sys.argv = [target, *args]
            sys.path[0] = str(Path(target).resolve().parent)
            runpy.run_path(target, run_name="__main__")
        elif mode == "module":
            sys.argv = [target, *args]
            sys.path[0] = os.getcwd()
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = ["-c", *args]
            sys.path[0] = ""
            exec(compile(target, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as exit_:
        return _exit_code(exit_)
    return 0


def _exit_code(exit_: SystemExit) -> int:
    if exit_.code is None:
        return 0
    if isinstance(exit_.code, int):
        return exit_.code
    print(exit_.code, file=sys.stderr)
    return 1


# --- the test side -----------------------------------------------------------------------------------------------


class Zygote:
    """This test process's zygote: started on first use, stopped when the test process exits."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="aims-zygote-")
        self.path = os.path.join(self.folder, "z.sock")
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"from tests.support.zygote import serve; serve({self.path!r})"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.process.stdout is not None
        ready = self.process.stdout.readline()
        assert ready == b"ready\n", f"the zygote did not start: {ready!r}"
        atexit.register(self.stop)

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        for name in os.listdir(self.folder):
            os.unlink(os.path.join(self.folder, name))
        os.rmdir(self.folder)


@functools.cache
def zygote() -> Zygote:
    return Zygote()


class Forked:
    """A worker forked by the zygote, with `subprocess.Popen`'s interface."""

    def __init__(self, args: list[str], request: dict[str, Any], *, stdin: Any, stdout: Any, stderr: Any,
                 text: bool) -> None:
        self.args = args
        self.returncode: int | None = None
        self.stdin: IO[Any] | None = None
        self.stdout: IO[Any] | None = None
        self.stderr: IO[Any] | None = None
        theirs: list[int] = []
        to_close: list[int] = []
        ours: list[int | None] = []
        for number, spec in enumerate((stdin, stdout, stderr)):
            mine: int | None = None
            if spec == PIPE:
                read, write = os.pipe()
                child, mine = (read, write) if number == 0 else (write, read)
                to_close.append(child)
            elif spec == DEVNULL:
                child = os.open(os.devnull, os.O_RDWR)
                to_close.append(child)
            elif spec == STDOUT and number == 2:
                child = theirs[1]
            elif spec is None:
                child = number
            elif isinstance(spec, int):
                child = spec
            else:
                child = spec.fileno()
            theirs.append(child)
            ours.append(mine)
        self._buffer = b""
        try:
            self._conn = send_request(zygote().path, request, theirs)
            self.pid = int(self._line(None))
        finally:
            for fd in to_close:
                os.close(fd)
        for number, fd in enumerate(ours):
            if fd is None:
                continue
            binary: IO[Any] = open(fd, "wb" if number == 0 else "rb")  # noqa: SIM115 (its caller closes it)
            stream: IO[Any] = binary
            if text:
                stream = io.TextIOWrapper(binary, encoding="utf-8", write_through=number == 0)  # type: ignore[arg-type]
            setattr(self, ("stdin", "stdout", "stderr")[number], stream)

    def _line(self, timeout: float | None) -> str:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout or 0)
                self._conn.settimeout(left)
            else:
                self._conn.settimeout(None)
            try:
                more = self._conn.recv(4096)
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout or 0) from None
            if not more:
                raise ConnectionError("the zygote closed the connection")
            self._buffer += more
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.wait(timeout=0.0001)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            line = self._line(timeout)
            assert line.startswith("exit "), line
            self.returncode = int(line.split()[1])
            self._conn.close()
        return self.returncode

    def communicate(self, input: Any = None, timeout: float | None = None) -> tuple[Any, Any]:
        if self.stdin is not None:
            try:
                if input:
                    self.stdin.write(input)
                self.stdin.close()
            except BrokenPipeError:
                pass
        results: dict[str, Any] = {}
        readers = [threading.Thread(target=lambda name=name, stream=stream: results.__setitem__(name, stream.read()),
                                    daemon=True)
                   for name, stream in (("out", self.stdout), ("err", self.stderr)) if stream is not None]
        for reader in readers:
            reader.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()) + 1)
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        return results.get("out"), results.get("err")

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def __enter__(self) -> Forked:
        return self

    def __exit__(self, *_: Any) -> None:
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        self.wait()


def spawn(args: list[str], *, stdin: Any = None, stdout: Any = None, stderr: Any = None, text: bool = False,
          env: dict[str, str] | None = None, cwd: Any = None) -> Any:
    """`subprocess.Popen(args, ...)`, forked from the zygote when `args` runs this interpreter on a script, a
    module (`-m`) or a command (`-c`), optionally with `-u`."""
    request = request_for(args[1:], env=env, cwd=cwd) if args and args[0] == sys.executable else None
    if request is None:
        return subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=stderr, text=text, env=env, cwd=cwd)
    return Forked(list(args), request, stdin=stdin, stdout=stdout, stderr=stderr, text=text)


def request_for(interpreter_args: list[str], *, env: dict[str, str] | None = None,
                cwd: Any = None) -> dict[str, Any] | None:
    """What the zygote is asked to run for `python <interpreter_args>`: a script, a module (`-m`) or a command
    (`-c`), optionally after `-u`; None for anything else (another option: run it as a real interpreter)."""
    rest, unbuffered = list(interpreter_args), False
    if rest and rest[0] == "-u":
        unbuffered, rest = True, rest[1:]
    if not rest or (rest[0].startswith("-") and rest[0] not in ("-m", "-c")) or (rest[0] in ("-m", "-c")
                                                                                 and len(rest) < 2):
        return None
    if rest[0] in ("-m", "-c"):
        mode, target, tail = ("module" if rest[0] == "-m" else "command"), rest[1], rest[2:]
    else:
        mode, target, tail = "script", str(Path(rest[0]).resolve()), rest[1:]
    return {"mode": mode, "target": target, "args": tail, "unbuffered": unbuffered,
            "env": dict(os.environ if env is None else env), "cwd": str(cwd if cwd is not None else os.getcwd())}


def send_request(path: str, request: dict[str, Any], fds: list[int]) -> socket.socket:
    """Connect to the zygote listening at `path` and hand it `request` with the child's stdin, stdout and stderr
    (`fds`); its answers (the child's pid, then `exit <status>`) come back on the returned connection, a line each."""
    payload = json.dumps(request).encode()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        socket.send_fds(conn, [struct.pack("!I", len(payload)) + payload], fds)
    except BaseException:
        conn.close()
        raise
    return conn


def stdio_command(args: list[str]) -> tuple[str, list[str]]:
    """The command and arguments that run `args` (`[sys.executable, "-m", module, ...]`) forked from this test
    process's zygote, for a library that starts the program itself (the MCP SDK's `stdio_client`): a small
    launcher hands it its stdio and signals (tests/support/forked.py)."""
    assert args[0] == sys.executable and args[1] in ("-m", "-c"), args
    return sys.executable, ["-S", str(Path(__file__).with_name("forked.py")), zygote().path, *args[1:]]


def run(args: list[str], *, capture_output: bool = False, text: bool = False, timeout: float | None = None,
        env: dict[str, str] | None = None, cwd: Any = None, input: Any = None, stdin: Any = None,
        check: bool = False) -> subprocess.CompletedProcess[Any]:
    """`subprocess.run(args, ...)` through `spawn`."""
    pipe = subprocess.PIPE if capture_output else None
    process = spawn(args, stdin=subprocess.PIPE if input is not None else stdin, stdout=pipe, stderr=pipe, text=text,
                    env=env, cwd=cwd)
    try:
        out, err = process.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    done = subprocess.CompletedProcess(args, process.returncode, out, err)
    if check:
        done.check_returncode()
    return done
