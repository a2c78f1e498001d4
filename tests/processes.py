"""Process helpers for the launcher and failover tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def server_processes(pid: int) -> Iterable[int]:
    """PIDs in process group ``pid`` (server + python stubs)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == pid:
                out.append(int(entry.name))
        except (ProcessLookupError, PermissionError):
            continue
    return out
