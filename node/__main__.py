"""`python -m node` runs the node CLI (used by `chc demo` to start node processes)."""

from node.cli import main

main()
