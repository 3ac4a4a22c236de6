"""`python _harden.py CMD ARGS...`: exec CMD with what chc-node.service asks systemd for.

MemoryDenyWriteExecute=yes as the kernel's own rule (PR_SET_MDWE with
PR_MDWE_REFUSE_EXEC_GAIN, Linux 6.3+: no mapping may be writable and executable, or become
executable), NoNewPrivileges=yes (PR_SET_NO_NEW_PRIVS) and UMask=0077; both prctl settings
are kept across exec, so CMD and its children run under them. Exits 97 if the kernel
refuses them.
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def main() -> None:
    """Apply the settings, then replace this process with sys.argv[1:]."""
    libc = ctypes.CDLL(None, use_errno=True)
    for option, value in ((PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN), (PR_SET_NO_NEW_PRIVS, 1)):
        if libc.prctl(option, value, 0, 0, 0) != 0:
            print(f"prctl({option}) refused: errno {ctypes.get_errno()}", file=sys.stderr)
            sys.exit(97)
    os.umask(0o077)
    os.execv(sys.argv[1], sys.argv[1:])  # noqa: S606 - an exec wrapper, no shell wanted


if __name__ == "__main__":
    main()
