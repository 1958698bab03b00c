"""The repository stands alone: nothing in it cites a file it does not contain."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Built from pieces so that this file does not match itself.
CITATIONS = re.compile("THEORY" + r"\.md|\.\./" + "shared|shared/" + "seeds")


def test_no_file_cites_team_notes_outside_the_repository():
    offenders = []
    for folder in ("pyro_jc", "tests", "examples", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".rst", ".md", ".txt", ".toml", ".cfg"):
                continue
            if "_build" in path.parts:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if CITATIONS.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    for name in ("README.md", "pyproject.toml", "Makefile"):
        if CITATIONS.search((ROOT / name).read_text()):
            offenders.append(name)
    assert not offenders, "\n".join(offenders)
