"""Where the embedded server's files go, pure: what its user can reach by the modes alone."""

from __future__ import annotations

from pathlib import Path

from broker.embedded.placement import absolute


def test_a_data_dir_path_keeps_its_own_name_but_not_its_parents_links(open_dir: Path) -> None:
    (open_dir / "real").mkdir()
    (open_dir / "via").symlink_to(open_dir / "real")
    (open_dir / "real" / ".data").symlink_to(open_dir)
    resolved = absolute(open_dir / "via" / ".data")
    assert resolved == open_dir.resolve() / "real" / ".data" and resolved.is_symlink()
