"""A network namespace the test creates, joined to ours by a veth pair, for `tc netem`.

Everything is the test's own: a namespace named for this process, a /30 link between it and
the root namespace, and any process started in it; all are removed on exit. Root is needed
(`ip netns add`); callers skip with the reason `unavailable()` gives.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

# What `tc` says when the kernel has no netem qdisc (seen on these machines).
NETEM_MISSING = "Specified qdisc kind is unknown"
REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (not root, no `ip` or `tc`), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    return None


@dataclass
class Namespace:
    """A namespace with a veth link to the root namespace: root_ip <-> inner_ip."""

    name: str = field(default_factory=lambda: f"chc-faults-{os.getpid()}")
    subnet: int = field(default_factory=lambda: os.getpid() % 250 + 1)
    _procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def outer_if(self) -> str:
        return f"chcf{os.getpid() % 100_000}o"  # interface names are at most 15 characters

    @property
    def inner_if(self) -> str:
        return f"chcf{os.getpid() % 100_000}i"

    @property
    def root_ip(self) -> str:
        return f"10.231.{self.subnet}.1"

    @property
    def inner_ip(self) -> str:
        return f"10.231.{self.subnet}.2"

    def _must(self, *args: str) -> None:
        done = _run(*args)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()}")

    def inside(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a command in the namespace."""
        return _run("ip", "netns", "exec", self.name, *args)

    def create(self) -> Namespace:
        """The namespace, its loopback, and the veth link with an address at each end."""
        self._must("ip", "netns", "add", self.name)
        self._must(
            "ip", "link", "add", self.outer_if, "type", "veth", "peer", "name", self.inner_if
        )
        self._must("ip", "link", "set", self.inner_if, "netns", self.name)
        self._must("ip", "addr", "add", f"{self.root_ip}/30", "dev", self.outer_if)
        self._must("ip", "link", "set", self.outer_if, "up")
        for cmd in (
            ("ip", "link", "set", "lo", "up"),
            ("ip", "addr", "add", f"{self.inner_ip}/30", "dev", self.inner_if),
            ("ip", "link", "set", self.inner_if, "up"),
        ):
            done = self.inside(*cmd)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} in {self.name}: {done.stderr.strip()}")
        return self

    def netem(self, *spec: str) -> subprocess.CompletedProcess[str]:
        """Set the netem qdisc on the namespace's end of the link (e.g. "delay", "300ms")."""
        return self.inside("tc", "qdisc", "replace", "dev", self.inner_if, "root", "netem", *spec)

    def clear_netem(self) -> None:
        """Remove any qdisc set by netem()."""
        self.inside("tc", "qdisc", "del", "dev", self.inner_if, "root")

    def start_proxy(self, listen: str, upstream: str) -> subprocess.Popen[str]:
        """Our TCP proxy (tests/faults/_proxy.py) inside the namespace; waits until it listens."""
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.name,
                sys.executable,
                "-m",
                "tests.faults._proxy",
                "--listen",
                listen,
                "--upstream",
                upstream,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"the proxy in {self.name} did not start: {line}")
        return proc

    def delete(self) -> None:
        """Stop our processes in it and remove the namespace (its veth end goes with it)."""
        for proc in self._procs:
            proc.kill()
            proc.wait(timeout=10)
        _run("ip", "netns", "del", self.name)
        _run("ip", "link", "del", self.outer_if)

    def __enter__(self) -> Namespace:
        try:
            return self.create()
        except BaseException:
            self.delete()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()
