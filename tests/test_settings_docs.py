"""Pins the generated settings docs to the table in `drain_provider.config`.

- The committed env.example is exactly `render_env_example()`, names every setting, and, with
  its placeholder secrets filled in, configures exactly the defaults (its commented-out lines
  too, once uncommented).
- Every `Settings` field read from the environment has exactly one table entry.
- README's settings block (once its markers are in) is `render_settings_markdown()`.
- `python -m drain_provider.devtools.settings_docs` rewrites stale files, leaves a README
  without markers alone, and `--check` exits 1 naming the stale file.
"""

from __future__ import annotations

import dataclasses
import io
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from dotenv import dotenv_values

from drain_provider.config import (
    PRICE_PATTERN,
    SETTINGS,
    Section,
    Settings,
    load_settings,
    render_env_example,
    render_settings_markdown,
)
from drain_provider.devtools.settings_docs import END, START, main, splice_readme

ROOT = Path(__file__).resolve().parents[1]
ENV_EXAMPLE = ROOT / "env.example"
README = ROOT / "README.md"

KEY_HEX = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
OPENAI_KEY = "sk-test-docs-0123456789"
REQUIRED = {"PROVIDER_PRIVATE_KEY": "0x" + KEY_HEX, "OPENAI_API_KEY": OPENAI_KEY}

# Fields that no environment variable sets: only code building `Settings` (the tests) changes them.
# contracts: derived from three; routing: the catalog, read from MODELS_FILE (or derived)
NOT_FROM_ENVIRONMENT = {"claim_receipt_timeout", "contracts", "routing"}


def env_example_values(*, uncomment: bool) -> dict[str, str]:
    """env.example as .env would read it, the placeholder secrets filled in; with `uncomment`,
    the `# NAME=value` lines of table settings count as set too."""
    text = ENV_EXAMPLE.read_text()
    if uncomment:
        names = "|".join(s.name for s in SETTINGS)
        text = re.sub(rf"^# ((?:{names})=.+)$", r"\1", text, flags=re.MULTILINE)
    values = {k: v for k, v in dotenv_values(stream=io.StringIO(text)).items() if v is not None}
    return {**values, **REQUIRED}


# --- env.example -----------------------------------------------------------------------------


def test_env_example_is_generated() -> None:
    assert ENV_EXAMPLE.read_text() == render_env_example(), "run: python -m drain_provider.devtools.settings_docs"


@pytest.mark.parametrize("name", [s.name for s in SETTINGS])
def test_env_example_names_every_setting(name: str) -> None:
    assert re.search(rf"^(# )?{name}=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE)


def test_env_example_shows_the_placeholders_and_examples() -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    for line in ("PROVIDER_PRIVATE_KEY=0x...", "OPENAI_API_KEY=sk-...", "CHAIN_ID=137", "PORT=3000"):
        assert line in lines
    for line in ("PRICE_GPT4O_INPUT=7500", "PRICE_GPT4O_OUTPUT=22500", "CLAIM_THRESHOLD=10000000"):
        assert line in lines
    assert "# LEDGER_SYNC=FULL" in lines
    assert all(len(line) <= 100 for line in lines)


@pytest.mark.parametrize("uncomment", [False, True], ids=["as shipped", "every line uncommented"])
def test_env_example_configures_the_defaults(uncomment: bool) -> None:
    assert load_settings(env_example_values(uncomment=uncomment)) == load_settings(REQUIRED)


# --- the table -------------------------------------------------------------------------------


def test_every_environment_field_has_exactly_one_entry() -> None:
    field_names = {f.name for f in dataclasses.fields(Settings)}
    counts = Counter(s.field for s in SETTINGS)
    assert set(counts) <= field_names, "a table entry names no Settings field"
    assert set(counts) == field_names - NOT_FROM_ENVIRONMENT
    assert [field for field, n in counts.items() if n != 1] == []


def test_names_and_aliases_are_unique() -> None:
    names = [name for s in SETTINGS for name in (s.name, *s.aliases)]
    assert len(names) == len(set(names))
    assert {"STORAGE_PATH"} == {alias for s in SETTINGS for alias in s.aliases}


def test_every_entry_documents_its_default() -> None:
    for s in SETTINGS:
        assert s.default is not None or s.default_doc, s.name
        assert s.help.strip() and "\n" not in s.help, s.name


def test_table_is_grouped_by_section() -> None:
    """The renderers order by section; a table in the same order reads like the docs."""
    sections = [s.section for s in SETTINGS]
    assert sections == sorted(sections, key=list(Section).index)


# --- README ----------------------------------------------------------------------------------


def assert_mentions_every_setting(table: str) -> None:
    for s in SETTINGS:
        assert f"`{s.name}`" in table
    for name in PRICE_PATTERN:
        assert f"`{name}`" in table
    rows = table.splitlines()
    assert rows[0] == "| variable | default | what it does |"
    assert len(rows) == 2 + len(SETTINGS) + 1


def test_markdown_mentions_every_setting() -> None:
    assert_mentions_every_setting(render_settings_markdown())


def test_markdown_has_no_html_outside_code() -> None:
    """`<MODEL>` outside a code span would be swallowed as an HTML tag."""
    prose = re.sub(r"`[^`]*`", "", render_settings_markdown())
    assert "<" not in prose and ">" not in prose


def test_readme_settings_block() -> None:
    readme = README.read_text()
    spliced = splice_readme(readme, render_settings_markdown())
    if spliced is None:  # the markers are not in yet: the table must still cover everything
        assert_mentions_every_setting(render_settings_markdown())
    else:
        assert spliced == readme, "run: python -m drain_provider.devtools.settings_docs"
        block = readme[readme.index(START) + len(START) : readme.index(END)]
        assert block == "\n" + render_settings_markdown()


# --- the generator ---------------------------------------------------------------------------

MARKED_README = f"# x\n\nbefore\n\n{START}\nold table\n{END}\n\nafter\n"


def test_splice_needs_both_markers_in_order() -> None:
    assert splice_readme("no markers", "T\n") is None
    assert splice_readme(f"{START} only", "T\n") is None
    assert splice_readme(f"{END}\n{START}", "T\n") is None
    assert splice_readme(f"a{START}old{END}b", "T\n") == f"a{START}\nT\n{END}b"


def test_generator_rewrites_stale_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "env.example").write_text("stale\n")
    (tmp_path / "README.md").write_text(MARKED_README)
    assert main(["--check"], root=tmp_path) == 1
    assert capsys.readouterr().err.strip() == (
        "out of date: env.example, README.md (run python -m drain_provider.devtools.settings_docs)"
    )
    assert main([], root=tmp_path) == 0
    assert (tmp_path / "env.example").read_text() == render_env_example()
    readme = (tmp_path / "README.md").read_text()
    assert readme == f"# x\n\nbefore\n\n{START}\n{render_settings_markdown()}{END}\n\nafter\n"
    assert main(["--check"], root=tmp_path) == 0


def test_generator_leaves_a_readme_without_markers_alone(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# x\n")
    assert main([], root=tmp_path) == 0
    assert (tmp_path / "README.md").read_text() == "# x\n"
    assert (tmp_path / "env.example").read_text() == render_env_example()


def test_check_names_only_the_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "env.example").write_text(render_env_example())
    (tmp_path / "README.md").write_text(MARKED_README)
    assert main(["--check"], root=tmp_path) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "README.md" in err and "env.example" not in err
    assert (tmp_path / "README.md").read_text() == MARKED_README  # --check changes nothing


def test_check_passes_on_this_repository() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "drain_provider.devtools.settings_docs", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (0, "")
