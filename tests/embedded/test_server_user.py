"""The embedded server's user, pure: what it may reach by the modes of files and directories."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.embedded.server_user import ServerUser

NOBODY_ELSE = ServerUser("pgsse-test", uid=4242, gid=4242)  # owns nothing here


@pytest.mark.parametrize(
    ("mode", "reachable"),
    [(0o700, False), (0o750, False), (0o701, True), (0o711, True), (0o755, True)],
)
def test_a_directory_is_crossed_only_with_execute_for_others(
    open_dir: Path, mode: int, reachable: bool
) -> None:
    middle = open_dir / "home"
    (middle / "app").mkdir(parents=True)
    middle.chmod(mode)
    assert NOBODY_ELSE.can_traverse(middle / "app" / "data") is reachable
    assert NOBODY_ELSE.can_traverse(open_dir)  # the parents alone are open


def test_a_link_is_crossed_only_if_both_its_way_and_its_target_are_open(open_dir: Path) -> None:
    closed, open_ = open_dir / "closed", open_dir / "open"
    (closed / "data").mkdir(parents=True)
    open_.mkdir()
    (open_ / "link").symlink_to(closed / "data")
    (closed / "link").symlink_to(open_)
    closed.chmod(0o700)
    assert not NOBODY_ELSE.can_traverse(open_ / "link")  # the target is behind `closed`
    assert not NOBODY_ELSE.can_traverse(closed / "link")  # the way there is closed
    assert NOBODY_ELSE.can_traverse(open_)


def test_modes_are_read_for_the_owner_the_group_then_others(open_dir: Path) -> None:
    target = open_dir / "file"
    target.write_text("x")
    target.chmod(0o604)
    assert NOBODY_ELSE.may(target, 4) and not NOBODY_ELSE.may(target, 2)
    me = ServerUser("me", uid=target.stat().st_uid, gid=target.stat().st_gid)
    assert me.may(target, 6) and not me.may(target, 1)
