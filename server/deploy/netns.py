"""Run a command in a network namespace of its own that has only the loopback interface.

Ray's processes talk over the machine's external address even when told 127.0.0.1; inside such
a namespace there is no other address, so every byte of a local cluster stays on loopback. The
cluster tests and benchmark run this way (`python -m server.deploy.netns CMD ...`); they refuse
to start a cluster anywhere else (`loopback_only()`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

NET_DEVICES = Path("/proc/self/net/dev")  # per network namespace (/sys/class/net is not, unless remounted)


def interfaces() -> set[str]:
    lines = NET_DEVICES.read_text().splitlines()[2:]  # two header lines, then "  name: counters"
    return {line.split(":", 1)[0].strip() for line in lines if ":" in line}


def loopback_only() -> bool:
    """True when this process's network namespace has no interface but `lo`."""
    try:
        return interfaces() == {"lo"}
    except OSError:
        return False


def namespaced(command: list[str]) -> list[str]:
    """`command` inside a new network namespace with loopback up (a user namespace too when not root)."""
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--net", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *command]


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m server.deploy.netns COMMAND [ARG...]", file=sys.stderr)
        return 2
    if loopback_only():
        os.execvp(argv[0], argv)
    os.execvp("unshare", namespaced(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
