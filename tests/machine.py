"""What the tests need of the machine, asked of the machine: free TCP ports, a C++ toolchain.

Ports: a port found free by binding port 0 and closing the socket is only free at that moment: another
process (another test run, another user of a shared machine) can take it before the launched
rendezvous store binds it. Where the launcher can pick the port itself, the tests let it
(`torchrun --standalone`: its store binds port 0 and hands the port to its workers); where two
launches must agree on a port beforehand (separate "nodes", srun-style tasks), they take one from
`free_port` and start again on another when the launch failed because the address was in use.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys

ATTEMPTS = 3  # launches tried before an address clash counts as a failure

# torch's TCPStore: "... code: -98, name: EADDRINUSE, message: address already in use"; Python: "[Errno 98]".
_CLASH = re.compile(r"EADDRINUSE|address already in use|Errno 98\b", re.IGNORECASE)


def free_port(prefix: list[str] | None = None) -> int:
    """A TCP port nothing listens on right now, on this host or (prefix, e.g. `ip netns exec NS`) in
    the network namespace that prefix runs commands in."""
    if prefix:
        probe = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
        out = subprocess.run([*prefix, sys.executable, "-c", probe], capture_output=True, text=True,
                             timeout=60, check=True)
        return int(out.stdout.strip())
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def port_clash(output: str) -> bool:
    """Whether a launch's output says it could not bind its port because another process had it."""
    return _CLASH.search(output) is not None


def cxx_missing() -> str | None:
    """Why torch's extension builder cannot compile C++ here (None: it can): it needs the host
    compiler ($CXX, else c++) and ninja."""
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no host C++ compiler ({cxx!r} is not on PATH)"
    if not cpp_extension.is_ninja_available():
        return "ninja not found (torch builds its C++ extensions with it)"
    return None
