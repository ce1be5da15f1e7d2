"""The package's metadata as an index shows it: a description that reads well away from the
repository, classifiers that agree with `requires-python`, no address that leads nowhere."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def project() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        table: dict[str, Any] = tomllib.load(file)["project"]
    return table


def test_the_index_readme_has_no_link_that_breaks_away_from_the_repository() -> None:
    readme = ROOT / project()["readme"]
    text = readme.read_text(encoding="utf-8")
    assert text.count("\n") > 10 and "pip install pgsse" in text
    targets = re.findall(r"\]\(([^)\s]+)", text) + re.findall(r"<((?!!--)[^>\s]+)>", text)
    targets += re.findall(r'(?:href|src)="([^"]+)"', text)
    relative = [t for t in targets if not re.match(r"https?://|mailto:", t)]
    assert relative == [], f"{readme.name} links to {relative}"
    assert "make " not in text, "make targets exist only in a checkout"


def test_classifiers_agree_with_requires_python_and_the_licence() -> None:
    meta = project()
    classifiers = meta["classifiers"]
    oldest = meta["requires-python"].removeprefix(">=")
    assert f"Programming Language :: Python :: {oldest}" in classifiers
    assert "Programming Language :: Python :: 3 :: Only" in classifiers
    # The licence is the SPDX expression; a licence classifier beside it is refused by PEP 639.
    assert meta["license"] == "MIT"
    assert not [c for c in classifiers if c.startswith("License ::")]
    assert "MIT License" in (ROOT / "LICENSE").read_text(encoding="utf-8")


def test_the_description_stands_alone_and_no_url_is_a_placeholder() -> None:
    meta = project()
    description = meta["description"]
    assert len(description) <= 100 and "/" not in description and "README" not in description
    for name, url in meta.get("urls", {}).items():
        assert url.startswith("https://"), name
        assert not re.search(r"example|OWNER|your-|<|>", url, re.IGNORECASE), (name, url)
