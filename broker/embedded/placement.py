"""Where the embedded PostgreSQL's files live, so that the user it runs as can reach them.

PostgreSQL refuses to run as root, so run by root the embedded server runs as the
unprivileged user `pgserver` (created if missing), which must reach its binaries (inside the
virtualenv), its data directory and its socket (inside the data directory). pgsse never
changes the mode or owner of a directory it did not create: pgserver's own helper for this
opens every parent up to `/` to everyone, which would make a mode-700 home readable by all.
Instead, what that user cannot reach where it is gets a place under `/var/lib/pgsse`, a
directory pgsse creates (root's, mode 755):

- the binaries: `/var/lib/pgsse/pginstall-<hash>`, hard links to the installed files
  (copies across file systems, or of a file others may not read), laid out as in
  site-packages since the binaries find their libraries at `$ORIGIN/../../../pgserver.libs`;
  shared by every data directory;
- the data: `/var/lib/pgsse/data-<hash of BROKER_DATA_DIR>`; BROKER_DATA_DIR, when it does
  not exist yet, becomes a symbolic link to it, so paths through it keep working, and
  `data-<hash>.source` beside it names BROKER_DATA_DIR, so that `pgsse clean` can tell a
  cluster whose link is gone (a removed checkout) from one in use.

Run by any other user, the server runs as that user and every file stays where it is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import BrokerError, ConfigError
from .server_user import SERVER_USER, ServerUser

__all__ = [
    "BASE",
    "SERVER_USER",
    "Placement",
    "ServerUser",
    "installed_pginstall",
    "locate",
    "orphaned",
    "source_file",
]

BASE = Path("/var/lib/pgsse")
# What the server needs of the pgserver wheel, relative to site-packages: the build, and the
# libraries auditwheel moved out of it (the binaries' RPATH points there).
_WHEEL_PARTS = (Path("pgserver/pginstall"), Path("pgserver.libs"))
_SOURCE = "source"  # in a mirror: the site-packages it mirrors
_OTHERS_READ = stat.S_IRGRP | stat.S_IROTH
_OTHERS_EXEC = stat.S_IXGRP | stat.S_IXOTH


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the server's files are: the real data directory, the binaries, the user."""

    requested: Path  # BROKER_DATA_DIR, absolute
    data_dir: Path  # where the cluster really is
    pginstall: Path  # the directory holding bin/, lib/ and share/
    user: ServerUser | None  # run the binaries as this user; None: as this process

    @property
    def bin_dir(self) -> Path:
        return self.pginstall / "bin"

    @property
    def relocated(self) -> bool:
        return self.data_dir != self.requested

    def prepare(self) -> None:
        """Create what is missing: the binaries' mirror, the data directory, the link to it."""
        if self.user is not None and not self.pginstall.exists():
            try:
                _mirror(installed_pginstall().parent.parent, self.pginstall.parent.parent)
            except OSError as exc:
                raise BrokerError(
                    f"cannot place the PostgreSQL binaries in {self.pginstall}: {exc};"
                    " set DATABASE_URL, or run pgsse as a user other than root"
                ) from None
        try:
            if not self.data_dir.is_dir():
                _make_dirs(self.data_dir.parent)
                self.data_dir.mkdir(mode=0o700)
                if self.user is not None:
                    os.chown(self.data_dir, self.user.uid, self.user.gid)
            if self.relocated and not os.path.lexists(self.requested):
                _make_dirs(self.requested.parent)
                self.requested.symlink_to(self.data_dir, target_is_directory=True)
            if self.relocated and not source_file(self.data_dir).exists():
                source_file(self.data_dir).write_text(str(self.requested))
        except OSError as exc:
            raise ConfigError(
                f"invalid BROKER_DATA_DIR={str(self.requested)!r}: cannot create"
                f" {exc.filename or self.data_dir}: {exc.strerror or exc};"
                " choose a directory this user can write"
            ) from None


def locate(requested: Path) -> Placement:
    """Where the cluster for BROKER_DATA_DIR `requested` is or will be; creates nothing
    but the server's user."""
    requested = absolute(requested)
    pginstall = installed_pginstall()
    if os.geteuid() != 0:
        return Placement(requested, requested, pginstall, None)
    user = ServerUser.ensure()
    if not _reaches_binaries(user, pginstall):
        mirror = BASE / f"pginstall-{_digest(_fingerprint(pginstall))}"
        pginstall = mirror / _WHEEL_PARTS[0]
    if requested.is_symlink():  # a link made by an earlier run, or the user's own
        return Placement(requested, requested.resolve(), pginstall, user)
    if (requested / "PG_VERSION").exists():
        if not user.can_traverse(requested):
            raise ConfigError(
                f"invalid BROKER_DATA_DIR={str(requested)!r}: it holds a cluster that user"
                f" {user.name} cannot reach; move it to a directory others may enter,"
                " or remove it to have one created under /var/lib/pgsse"
            )
        return Placement(requested, requested, pginstall, user)
    if _can_create_for(user, requested):
        return Placement(requested, requested, pginstall, user)
    return Placement(requested, BASE / f"data-{_digest(str(requested))}", pginstall, user)


def source_file(data_dir: Path) -> Path:
    """The file beside a relocated data directory naming the BROKER_DATA_DIR it is for."""
    return data_dir.with_name(data_dir.name + ".source")


def orphaned(data_dir: Path) -> bool | None:
    """Whether the BROKER_DATA_DIR that a relocated data directory was made for no longer
    leads to it (None: not recorded, as for clusters made before the record was kept)."""
    try:
        requested = Path(source_file(data_dir).read_text())
    except OSError:
        return None
    return requested.resolve() != data_dir.resolve()


def absolute(path: Path) -> Path:
    """`path` made absolute with its parent's symbolic links resolved, not its own."""
    path = path.absolute()
    return path.parent.resolve() / path.name


def installed_pginstall() -> Path:
    """The PostgreSQL build inside the pgserver package, found without importing it (its
    import looks up runtime directories and warns)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise BrokerError("the embedded PostgreSQL needs the pgserver package; or set DATABASE_URL")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def _reaches_binaries(user: ServerUser, pginstall: Path) -> bool:
    site = pginstall.parent.parent
    parts = [pginstall / name for name in ("bin", "lib", "share")]
    parts += [site / part for part in _WHEEL_PARTS[1:] if (site / part).exists()]
    return all(user.can_traverse(part) for part in parts) and user.may(
        pginstall / "bin" / "postgres", 5
    )


def _can_create_for(user: ServerUser, requested: Path) -> bool:
    """A data directory `requested` may stay where it is: it is the user's already, or it is
    to be created (by us) below directories the user may enter."""
    if requested.exists():
        return requested.stat().st_uid == user.uid and user.can_traverse(requested)
    existing = next(parent for parent in requested.parents if parent.exists())
    return user.can_traverse(existing)


def _fingerprint(pginstall: Path) -> str:
    """Changes when pgserver is reinstalled, so a stale mirror is never used."""
    postgres = (pginstall / "bin" / "postgres").stat()
    return f"{pginstall}:{postgres.st_ino}:{postgres.st_mtime_ns}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _make_dirs(path: Path) -> None:
    """Create `path` and its missing parents, each mode 755 whatever the umask (they are
    ours, and the server's user must pass through them)."""
    missing = [p for p in [*reversed(path.parents), path] if not p.exists()]
    for directory in missing:
        try:
            directory.mkdir()
        except FileExistsError:  # created meanwhile by another process
            continue
        directory.chmod(0o755)


def _mirror(site: Path, target: Path) -> None:
    """`target`: the wheel's parts from `site`, built beside it and renamed into place, so
    that processes starting together never see half of it. Mirrors of installations that
    are gone (a removed virtualenv) are removed."""
    _make_dirs(target.parent)
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        building.chmod(0o755)
        for part in _WHEEL_PARTS:
            if (site / part).exists():
                _make_dirs((building / part).parent)
                _copy_tree(site / part, building / part)
        (building / _SOURCE).write_text(str(site))
        try:
            building.rename(target)
        except OSError:  # another process finished first; its copy is as good
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    for other in target.parent.glob("pginstall-*"):
        source = other / _SOURCE
        if source.is_file() and not Path(source.read_text()).is_dir():
            shutil.rmtree(other, ignore_errors=True)


def _copy_tree(source: Path, target: Path) -> None:
    """Directories made mode 755, files hard-linked or copied, symbolic links kept."""
    target.mkdir()
    target.chmod(0o755)
    for entry in source.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            _copy_tree(entry, target / entry.name)
        else:
            _link_or_copy(entry, target / entry.name)


def _link_or_copy(source: Path, target: Path) -> None:
    if source.is_symlink():
        target.symlink_to(os.readlink(source))
        return
    mode = source.stat().st_mode
    wanted = _OTHERS_READ | (_OTHERS_EXEC if mode & stat.S_IXUSR else 0)
    if mode & wanted == wanted:
        try:
            os.link(source, target)
            return
        except OSError:  # another file system, or hard links refused: copy
            pass
    shutil.copy2(source, target)
    target.chmod(stat.S_IMODE(mode) | wanted)
