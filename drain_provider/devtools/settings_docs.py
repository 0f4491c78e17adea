"""Rewrite env.example and the README's settings table from `config.SETTINGS`.

    python -m drain_provider.devtools.settings_docs          # rewrite what is out of date
    python -m drain_provider.devtools.settings_docs --check  # exit 1 if anything is (for CI)

Both files are generated so that adding a setting to the table is the whole job: nobody has to
remember to document it twice. The README is only touched between its two markers, and not at
all until someone puts them there.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..config import render_env_example, render_settings_markdown

ROOT = Path(__file__).resolve().parents[2]
START = "<!-- settings:start -->"
END = "<!-- settings:end -->"


def splice_readme(readme: str, table: str) -> str | None:
    """`readme` with `table` between the markers, or None when it lacks them (in that order)."""
    start = readme.find(START)
    end = readme.find(END, start + len(START)) if start >= 0 else -1
    if end < 0:
        return None
    return f"{readme[: start + len(START)]}\n{table}{readme[end:]}"


def expected_files(root: Path) -> dict[Path, str]:
    """Each generated file's path under `root` and the text it should have."""
    expected = {root / "env.example": render_env_example()}
    readme = root / "README.md"
    if readme.is_file():
        spliced = splice_readme(readme.read_text(encoding="utf-8"), render_settings_markdown())
        if spliced is not None:
            expected[readme] = spliced
    return expected


def stale_files(expected: dict[Path, str]) -> list[Path]:
    return [path for path, text in expected.items() if not path.is_file() or path.read_text(encoding="utf-8") != text]


def main(argv: Sequence[str] | None = None, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(prog="python -m drain_provider.devtools.settings_docs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is out of date")
    args = parser.parse_args(argv)
    expected = expected_files(root)
    stale = stale_files(expected)
    if args.check:
        if stale:
            names = ", ".join(path.name for path in stale)
            print(f"out of date: {names} (run python -m drain_provider.devtools.settings_docs)", file=sys.stderr)
            return 1
        return 0
    for path in stale:
        path.write_text(expected[path], encoding="utf-8")
        print(f"rewrote {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
