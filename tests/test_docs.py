"""The documentation that ships in docs/: every page the README promises, every link
resolving, and a configuration page that lists every setting as the code has it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from keystile import Keystile, KeystileSettings
from keystile.settings import env_name, settings_table

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
PAGES = [
    "README.md",
    "key-format.md",
    "errors.md",
    "headers.md",
    "cors.md",
    "ip-rules.md",
    "usage.md",
    "alerts.md",
    "management.md",
    "console.md",
    "configuration.md",
    "observability.md",
    "failure-modes.md",
    "security.md",
]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """A heading's anchor, as GitHub makes it."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_every_page_ships_and_the_readme_links_the_index() -> None:
    assert sorted(p.name for p in DOCS.glob("*.md")) == sorted(PAGES)
    assert "(docs/README.md)" in (ROOT / "README.md").read_text()
    index = (DOCS / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"({page})" in index, f"the index does not link {page}"


@pytest.mark.parametrize("page", [ROOT / "README.md", *(DOCS / p for p in PAGES)], ids=str)
def test_every_link_resolves(page: Path) -> None:
    """Each relative link names a file of the repository, and each #anchor a heading of
    the page it points at."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # https://, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert anchor in anchors(linked), f"{page.name}: no heading for {target}"


def test_the_configuration_page_lists_every_setting_as_the_code_has_it() -> None:
    """The settings table of docs/configuration.md is the one made from KeystileSettings
    (name, variable, default, what is allowed, meaning) — and names every setting."""
    text = (DOCS / "configuration.md").read_text()
    table = text.split("-->\n", 1)[1].split("<!-- end of the settings table -->", 1)[0]
    assert table == settings_table()
    for name in KeystileSettings.model_fields:
        assert f"| `{name}` | `{env_name(name)}` |" in table


def test_the_settings_table_shows_the_defaults_the_code_uses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each default in the table is what a Keystile built with no setting uses."""
    for name in KeystileSettings.model_fields:
        monkeypatch.delenv(env_name(name), raising=False)
    gate = Keystile(store="memory://")
    rows = settings_table().splitlines()[2:]
    assert len(rows) == len(KeystileSettings.model_fields)
    for row in rows:
        name, _, default = (c.strip(" `") for c in row.strip("|").split("|")[:3])
        value: Any = getattr(gate.settings, name)
        expected = "unset" if value is None else str(value)
        assert default.replace("_", "").strip('"') == expected.replace("_", ""), name


def test_the_readme_configuration_example_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration\n", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace: dict[str, Any] = {}
    exec(block, namespace)
    settings = namespace["gate"].settings
    assert (settings.namespace, settings.cache_ttl, settings.rate_limit_failure) == (
        "shop",
        5.0,
        "deny",
    )
