"""Print a pip constraints file pinning every dependency pyproject.toml declares to its floor.

    python .ci/minimums.py > minimums.txt && pip install -c minimums.txt -e '.[test]'

Every requirement of [project] dependencies and of every extra becomes ``name==floor`` (its
environment marker kept), so the suite runs on exactly the versions the package claims to
support. A requirement without a ``>=`` floor, or two different floors for one package, is
an error: a floor that is not declared cannot be tested.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# name, optional [extras], version specifiers, optional ; marker (PEP 508, without URLs).
REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*"
    r"(?P<specs>[^;]*?)\s*(?:;\s*(?P<marker>.+?))?\s*$"
)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def floors(pyproject: Path) -> dict[str, tuple[str, str | None]]:
    """Each declared package (normalised name) -> (floor, marker)."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    own = _normal(project["name"])
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements.extend(extra)
    found: dict[str, tuple[str, str | None]] = {}
    for requirement in requirements:
        match = REQUIREMENT.match(requirement)
        if match is None:
            raise SystemExit(f"minimums: cannot read the requirement {requirement!r}")
        name = _normal(match["name"])
        if name == own:  # an extra naming the package's other extras
            continue
        floor = [s.strip()[2:].strip() for s in match["specs"].split(",") if ">=" in s]
        if len(floor) != 1:
            raise SystemExit(f"minimums: {requirement!r} declares no single '>=' floor")
        before = found.get(name)
        if before is not None and before[0] != floor[0]:
            raise SystemExit(f"minimums: {name} has two floors, {before[0]} and {floor[0]}")
        found[name] = (floor[0], match["marker"])
    return found


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    for name, (floor, marker) in sorted(floors(root / "pyproject.toml").items()):
        sys.stdout.write(f"{name}=={floor}" + (f"; {marker}" if marker else "") + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
