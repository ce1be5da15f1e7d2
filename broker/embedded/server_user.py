"""The unprivileged user the embedded PostgreSQL runs as when pgsse runs as root, and what
that user may reach by the modes of the directories on the way (PostgreSQL refuses to run as
root; `placement.py` decides where its files go from what this says)."""

from __future__ import annotations

import pwd
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import BrokerError

__all__ = ["SERVER_USER", "ServerUser"]

SERVER_USER = "pgserver"


@dataclass(frozen=True, slots=True)
class ServerUser:
    """The unprivileged user the server runs as when pgsse runs as root."""

    name: str
    uid: int
    gid: int

    @classmethod
    def ensure(cls, name: str = SERVER_USER) -> ServerUser:
        """The user `name`, created (a system user, no home, no login) if missing."""
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            command = ["useradd", "--system", "--user-group", "--no-create-home"]
            command += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]
            try:
                subprocess.run(command, check=True, capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.SubprocessError) as exc:
                raise BrokerError(
                    f"cannot create user {name!r} for the embedded PostgreSQL (it refuses to"
                    f" run as root): {exc}; create it, or set DATABASE_URL"
                ) from None
            entry = pwd.getpwnam(name)
        return cls(name, entry.pw_uid, entry.pw_gid)

    def can_traverse(self, path: Path) -> bool:
        """Whether this user may search every directory from `/` down to `path`, checked
        both along the path as written and along its resolved form (symbolic links)."""
        chains = {path.absolute(), path.resolve()}
        for chain in chains:
            for directory in [*reversed(chain.parents), chain]:
                if directory.exists() and directory.is_dir() and not self.may(directory, 1):
                    return False
        return True

    def may(self, path: Path, bits: int) -> bool:
        """Whether this user has `bits` (4 read, 2 write, 1 execute) on `path` by its mode."""
        info = path.stat()
        if info.st_uid == self.uid:
            shift = 6
        elif info.st_gid == self.gid:
            shift = 3
        else:
            shift = 0
        return info.st_mode >> shift & bits == bits
