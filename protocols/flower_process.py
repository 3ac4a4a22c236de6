"""Running Flower's programs as supervised child processes, on the hub and on a node.

Flower's SuperLink and SuperNode cannot run in a thread (they install signal handlers) and
start their own helpers by name (flower-superexec, flwr-serverapp, flwr-clientapp), so each
runs as a child in its own process group with a controlled environment: the venv's bin first
on PATH, telemetry and update checks off, and FLWR_HOME in a folder of the run, never the
user's home.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from queries.errors import ChcError

# How much of a child's log a FlowerError quotes: enough to show Flower's own error.
TAIL_LINES = 25


class FlowerError(RuntimeError, ChcError):
    """A Flower process (SuperLink, SuperNode or the flwr CLI) failed or did not answer."""

    status_name = "UNAVAILABLE"


class FlowerStartError(FlowerError):
    """A Flower process did not start, or did not start listening, in time."""


def venv_bin() -> Path:
    """The folder of this interpreter's console scripts (flwr, flower-superlink, ...)."""
    return Path(sys.executable).parent


def flower_env(
    home: Path, *, path_first: Sequence[Path] = (), extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a Flower child: its own FLWR_HOME, no telemetry, helpers on PATH."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # A venv activated in the parent shell would point Flower's helpers at another tree.
    env.pop("VIRTUAL_ENV", None)
    path = [str(p) for p in path_first] + [str(venv_bin()), env.get("PATH", "")]
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=os.pathsep.join(p for p in path if p),
    )
    if extra:
        env.update(extra)
    return env


def free_port() -> int:
    """A TCP port free on loopback now (another process may take it before it is bound)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last lines of a log file, or a note that it is empty or missing."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join(kept) if kept else f"(empty log {path})"


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read (0600), e.g. a shared secret or a payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


# prctl(PR_SET_PDEATHSIG): Linux sends the child this signal when its parent dies.
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: be sent SIGTERM if the parent dies, however it dies.

    A node or hub killed outright (SIGKILL, an OOM kill) runs no cleanup, and its Flower
    children, in their own process groups, would live on: a SuperNode still answering for a
    node that is gone. On Linux the kernel stops them instead; elsewhere this does nothing,
    and the service manager's process tracking has to.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Started:
    """A start()/stop() pair usable as a context manager (stopped however the block ends)."""

    def start(self) -> None:
        """Start it (subclasses)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop it (subclasses)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class FlowerChild:
    """One Flower program run as a child process, in its own process group, logging to a file.

    The group matters: a SuperNode's SuperExec starts a ClientApp process per message and a
    SuperLink starts the ServerApp; stopping the group stops them too.
    """

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log = log
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id, None before start."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the program; raise FlowerStartError if it cannot be executed at all."""
        if self._proc is not None:
            raise FlowerError(f"{self.name} was already started")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log.open("ab")
        try:
            self._proc = subprocess.Popen(  # noqa: S603 - argv built by us, no shell
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            self._log_file.close()
            raise FlowerStartError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from None

    def returncode(self) -> int | None:
        """The exit code if the child has exited, else None (also None before start)."""
        return self._proc.poll() if self._proc is not None else None

    def running(self) -> bool:
        """Whether the child was started and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def signal_group(self, signum: int) -> None:
        """Send signum to the child's whole process group (ignored once it is gone)."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signum)

    def stop(self, grace_s: float = 8.0) -> None:
        """SIGTERM the group, then SIGKILL it if it has not exited within grace_s."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            # SIGTERM lets a SuperNode deactivate itself, so the SuperLink stops sending to it
            # at once rather than after its heartbeat window (up to a minute).
            self.signal_group(signal.SIGTERM)
            try:
                self._proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self._proc.wait(timeout=grace_s)
        # The leader may be gone while helpers it started linger in the group.
        self.signal_group(signal.SIGKILL)
        self._close_log()

    def kill(self) -> None:
        """SIGKILL the group at once (a crash, for tests and emergencies)."""
        if self._proc is None:
            return
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=10)
        self._close_log()

    def log_tail(self, lines: int = TAIL_LINES) -> str:
        """The end of the child's log, for error messages."""
        if self._log_file is not None:
            self._log_file.flush()
        return tail(self.log, lines)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def wait_listening(child: FlowerChild, port: int, timeout_s: float) -> None:
    """Wait until something accepts connections on 127.0.0.1:port, or raise FlowerStartError.

    Fails early, with the end of the child's log, if the child exits first.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        code = child.returncode()
        if code is not None:
            raise FlowerStartError(
                f"{child.name} exited with code {code} before listening on port {port}; "
                f"the end of its log ({child.log}):\n{child.log_tail()}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise FlowerStartError(
                f"{child.name} did not listen on port {port} within {timeout_s:g} s; "
                f"the end of its log ({child.log}):\n{child.log_tail()}"
            )
        time.sleep(0.1)
