"""A node's ledger on a disk that fills up, or that turns read-only under the running node.

Charge before release: a node that cannot record a charge must release nothing. The ledger
is put on a filesystem the test mounts (a small tmpfs; an ext4 image on a loop device, whose
errors=remount-ro behaviour turns it read-only under the live node, as a failing disk does:
a tmpfs cannot be remounted read-only while the node holds its ledger open for writing).
Queries through the hub must get a partial result naming the node, with nothing released
there; once the disk is repaired queries work again, and the ledger verifies.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from coordinator.analyst.client import Federation
from coordinator.local import synth
from coordinator.local.federation import ANALYST_NAME, LocalFederation, NodeSetup
from queries.results import NodeStatus
from queries.spec import Query
from tests.faults._invariants import (
    DEADLINE_MARGIN_S,
    Receipt,
    check_all,
    check_budget_matches_ledgers,
    ledger_bodies,
    receipts,
    released,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

VICTIM = "nwc"
OTHER = "nenc"
DEADLINE_S = 3.0
QUERY = Query(view="persons", rho=0.001, group_by=("sex",))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def _unmount(point: Path) -> None:
    if _run("umount", str(point)).returncode != 0:
        _run("umount", "-l", str(point))  # busy: detach it anyway, never leave it mounted


@contextmanager
def _mounted(point: Path, *mount_args: str) -> Iterator[Path]:
    """Mount (as root) at point for the block; skip with the reason if that cannot be done."""
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem for the ledger needs root")
    point.mkdir(parents=True, exist_ok=True)
    done = _run("mount", *mount_args, str(point))
    if done.returncode != 0:
        pytest.skip(f"cannot mount {' '.join(mount_args)}: {done.stderr.strip()}")
    try:
        yield point
    finally:
        _unmount(point)


def _federation(root: Path, ledger_dir: Path) -> LocalFederation:
    folders = synth.generate_federation(2_000, root / "data", seed=13)
    setups = tuple(
        NodeSetup(name=name, omop=folders[name], total_rho=1e3, max_rho_per_query=1.0)
        for name in (OTHER, VICTIM)
    )
    return LocalFederation(
        workdir=root,
        nodes=setups,
        deadline_ms=int(DEADLINE_S * 1000),
        ledger_dirs={VICTIM: ledger_dir},
    )


class Analyst:
    """Sends queries and keeps what was received."""

    def __init__(self, fed: LocalFederation) -> None:
        self.fed = fed
        self.received: list[Receipt] = []

    def victim_status(self) -> tuple[NodeStatus, str]:
        """Send one query; the victim's status and message (the other node must answer)."""
        with Federation(self.fed.hub_address, self.fed.analyst_identity) as client:
            started = time.monotonic()
            result = client.query(QUERY, deadline_s=DEADLINE_S)
            assert time.monotonic() - started <= DEADLINE_S + DEADLINE_MARGIN_S
        self.received += receipts(result, ANALYST_NAME)
        statuses = {o.node: o for o in result.nodes}
        assert statuses[OTHER].status is NodeStatus.OK, statuses[OTHER]
        return statuses[VICTIM].status, statuses[VICTIM].message

    def refused_with_nothing_released(self, queries: int) -> list[str]:
        """Send queries; each must be refused at the victim, with nothing released there."""
        ledger = self.fed.ledger_path(VICTIM)
        before = len(released(ledger_bodies(ledger)))
        messages = []
        for _ in range(queries):
            status, message = self.victim_status()
            assert status in (NodeStatus.REFUSED, NodeStatus.ERROR), (status, message)
            assert message
            messages.append(message)
        assert not [r for r in self.received[-queries:] if r.node == VICTIM]
        assert len(released(ledger_bodies(ledger))) == before  # nothing charged meanwhile
        return messages

    def check(self) -> None:
        check_all(self.fed, self.received)
        check_budget_matches_ledgers(self.fed, self.fed.analyst_identity, ANALYST_NAME)


def _fill(folder: Path) -> Path:
    """Write a file until the filesystem is full (to the last byte); return it."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    written = 0
    try:
        for size in (65_536, 4096, 512, 1):  # unbuffered, down to the last block's bytes
            while True:
                try:
                    written += os.write(fd, b"\0" * size)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    assert written > 0
    return filler


def test_full_ledger_disk_refuses_and_releases_nothing(tmp_path: Path) -> None:
    tmpfs = ("-t", "tmpfs", "-o", "size=4m", "tmpfs")
    with _mounted(tmp_path / "ledger", *tmpfs) as disk, _federation(tmp_path, disk) as fed:
        analyst = Analyst(fed)
        assert analyst.victim_status()[0] is NodeStatus.OK
        filler = _fill(disk)
        analyst.refused_with_nothing_released(5)
        filler.unlink()  # space again: the node records and releases as before
        assert analyst.victim_status()[0] is NodeStatus.OK
        analyst.check()
        # Restarted, the node opens its ledger, checks it and serves again.
        fed.restart_node(VICTIM)
        assert analyst.victim_status()[0] is NodeStatus.OK
        analyst.check()


def test_full_ledger_disk_refusal_says_why(tmp_path: Path) -> None:
    """The analyst is told the node could not record the charge, so nothing was released."""
    tmpfs = ("-t", "tmpfs", "-o", "size=4m", "tmpfs")
    with _mounted(tmp_path / "ledger", *tmpfs) as disk, _federation(tmp_path, disk) as fed:
        analyst = Analyst(fed)
        assert analyst.victim_status()[0] is NodeStatus.OK
        _fill(disk)
        (message,) = analyst.refused_with_nothing_released(1)
        assert "ledger" in message, message
        assert "internal error" not in message, message


def _ext4_device(point: Path) -> str:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(point):
            return Path(fields[0]).name
    raise AssertionError(f"{point} is not mounted")


def test_read_only_ledger_disk_refuses_and_releases_nothing(tmp_path: Path) -> None:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 (e2fsprogs) is not installed")
    image = tmp_path / "ledger.img"
    with image.open("wb") as f:
        f.truncate(16 * 1024 * 1024)
    made = _run("mkfs.ext4", "-q", "-F", str(image))
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
    point = tmp_path / "ledger"
    options = ("-o", "loop,errors=remount-ro", str(image))
    with _mounted(point, *options) as disk, _federation(tmp_path, disk) as fed:
        analyst = Analyst(fed)
        assert analyst.victim_status()[0] is NodeStatus.OK
        trigger = Path("/sys/fs/ext4") / _ext4_device(disk) / "trigger_fs_error"
        if not trigger.exists():
            pytest.skip(f"this kernel has no {trigger} to turn ext4 read-only under a writer")
        # An ext4 error with errors=remount-ro: the kernel makes the filesystem read-only
        # under the running node, as it does when a disk fails.
        trigger.write_text("chc fault test\n")
        assert "emergency_ro" in Path("/proc/mounts").read_text() or not os.access(disk, os.W_OK)
        analyst.refused_with_nothing_released(5)

        def repair() -> None:
            # The node is stopped: check the filesystem and mount it read-write again.
            _unmount(disk)
            _run("e2fsck", "-f", "-y", str(image))
            again = _run("mount", *options, str(disk))
            assert again.returncode == 0, again.stderr

        fed.restart_node(VICTIM, while_down=repair)
        assert analyst.victim_status()[0] is NodeStatus.OK
        analyst.check()
