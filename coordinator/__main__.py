"""`python -m coordinator` runs the `chc` CLI (used to start the hub process)."""

from coordinator.cli import main

main()
