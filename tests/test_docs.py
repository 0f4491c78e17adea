"""The documentation is part of the product: these tests keep it true (Datasette's test_docs.py
is the model).

- Every error code of `api.errors.ERRORS` is in the README, in docs/PROTOCOL.md and in the
  `/v1/docs` a running provider serves; every code is raised somewhere, and every code raised is
  in the table.
- Every setting of `config.SETTINGS` is in env.example and in the README.
- Every rule of docs/DESIGN.md, "Rules of money", is pinned by a test marked
  `@pytest.mark.rule(N)`, and no marker names a rule that does not exist.
- Every repository file the code, the tests and the docs cite exists, and none cites the design
  or protocol documents outside docs/.
- The runtime does not import `devtools` (only the `dev` command does).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from helpers import REPO, Provider

from drain_provider.api.errors import ERRORS, HTTP_CODES
from drain_provider.config import SETTINGS

PACKAGE = REPO / "drain_provider"
README = (REPO / "README.md").read_text()
PROTOCOL = (REPO / "docs" / "PROTOCOL.md").read_text()
DESIGN = (REPO / "docs" / "DESIGN.md").read_text()
ERROR_CLASSES = {"ApiError", "PaymentError", "Refusal"}  # the code is the first argument


def python_files(*roots: Path) -> Iterator[Path]:
    for root in roots:
        yield from sorted(path for path in root.rglob("*.py") if ".venv" not in path.parts)


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _error_subclass_bodies(tree: ast.Module) -> set[int]:
    """The nodes inside classes derived from our error classes (their super().__init__ calls
    carry a code too, as InsufficientFunds does)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(_name(base) in ERROR_CLASSES for base in node.bases):
            inside |= {id(child) for child in ast.walk(node)}
    return inside


def raised_codes() -> dict[str, Path]:
    """Error codes passed to our error classes anywhere in the package, and where."""
    found: dict[str, Path] = {}
    for path in python_files(PACKAGE):
        tree = ast.parse(path.read_text())
        in_subclass = _error_subclass_bodies(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func)
            candidates: list[ast.expr] = []
            if name in ERROR_CLASSES or (name == "__init__" and id(node) in in_subclass):
                candidates = node.args[:1]
            elif name == "RequestError":
                candidates = node.args[1:2] + [k.value for k in node.keywords if k.arg == "code"]
            for arg in candidates:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found[arg.value] = path
    return found


# --- error codes ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", ERRORS)
def test_every_error_code_is_in_the_readme_and_the_protocol(code: str) -> None:
    assert f"`{code}`" in README, f"README.md's error table lacks {code}"
    assert f"| `{code}` |" in PROTOCOL, f"docs/PROTOCOL.md's error table lacks {code}"


async def test_every_error_code_is_in_the_served_docs(provider: Provider) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{provider.url}/docs") as response:
        text = await response.text()
    missing = [code for code in ERRORS if not re.search(rf"\b{code}\b", text)]
    assert not missing, f"/v1/docs lacks {missing}"


def test_every_code_raised_is_in_the_table() -> None:
    raised = raised_codes()
    assert {"voucher_required", "invalid_nonce", "model_not_supported"} <= set(raised)  # the scan works
    unknown = {code: str(path) for code, path in raised.items() if code not in ERRORS}
    assert not unknown, f"raised but not in api/errors.py ERRORS: {unknown}"


@pytest.mark.parametrize("code", ERRORS)
def test_every_code_in_the_table_is_used(code: str) -> None:
    """A code only the table knows is dead: a client can never see it. Codes reach clients by
    our error classes, or as aiohttp's own 404, 405 and 413."""
    assert code in set(raised_codes()) | set(HTTP_CODES.values()), f"{code} is in ERRORS but nothing raises it"


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_every_setting_is_in_env_example_and_the_readme(setting: object) -> None:
    env_example = (REPO / "env.example").read_text()
    for name in (setting.name, *setting.aliases):  # type: ignore[attr-defined]
        assert re.search(rf"^#? ?{name}=", env_example, re.MULTILINE) or name in env_example
        assert f"`{name}`" in README, f"README.md does not document {name}"


# --- rules of money -------------------------------------------------------------------------


def design_rules() -> dict[int, str]:
    section = DESIGN.split("## Rules of money", 1)[1].split("\n## ", 1)[0]
    return {int(n): title for n, title in re.findall(r"^(\d+)\. \*\*(.+?)\*\*", section, re.MULTILINE)}


def rule_markers() -> dict[int, list[str]]:
    """rule number -> the tests marked with it."""
    marked: dict[int, list[str]] = {}
    for path in python_files(REPO / "tests"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for decorator in node.decorator_list:
                if (
                    isinstance(decorator, ast.Call)
                    and _name(decorator.func) == "rule"
                    and decorator.args
                    and isinstance(decorator.args[0], ast.Constant)
                    and isinstance(decorator.args[0].value, int)
                ):
                    marked.setdefault(decorator.args[0].value, []).append(f"{path.name}::{node.name}")
    return marked


def test_design_lists_the_rules_in_order() -> None:
    rules = design_rules()
    assert list(rules) == list(range(1, len(rules) + 1)) and len(rules) >= 9


@pytest.mark.parametrize("rule", sorted(design_rules()))
def test_every_rule_is_pinned_by_a_test(rule: int) -> None:
    assert rule_markers().get(rule), f"no test is marked @pytest.mark.rule({rule}): {design_rules()[rule]}"


def test_every_rule_marker_names_a_rule() -> None:
    unknown = {n: tests for n, tests in rule_markers().items() if n not in design_rules()}
    assert not unknown, f"markers for rules docs/DESIGN.md does not have: {unknown}"


# --- citations and imports --------------------------------------------------------------------

CITED_FILE = re.compile(r"(?<![\w./-])((?:docs|tests|drain_provider|bench|contrib)/[\w./-]*\w\.(?:py|md|sol|json|js))")
BARE_DOC = re.compile(r"(?<![\w/.-])(DESIGN|PROTOCOL)\.md")


def cited_sources() -> Iterator[Path]:
    yield from python_files(PACKAGE, REPO / "tests", REPO / "bench")
    yield from sorted(PACKAGE.rglob("*.sol"))
    yield from [REPO / "README.md", REPO / "CHANGELOG.md", REPO / "env.example", REPO / "bench" / "README.md"]
    yield REPO / "RELIABILITY.md"
    yield from sorted((REPO / "docs").glob("*.md"))


def test_cited_files_exist() -> None:
    missing = [
        f"{source.relative_to(REPO)} cites {cited}"
        for source in cited_sources()
        for cited in CITED_FILE.findall(source.read_text())
        if "<" not in cited and not (REPO / cited).exists()
    ]
    assert not missing, missing


def test_design_and_protocol_are_cited_where_they_are() -> None:
    """They live in docs/; a bare DESIGN.md or PROTOCOL.md points outside the repository."""
    bare = [
        f"{source.relative_to(REPO)}: {match}"
        for source in cited_sources()
        if source != Path(__file__)  # this file names them to look for them
        for match in BARE_DOC.findall(source.read_text())
    ]
    assert not bare, bare


def test_the_runtime_does_not_import_devtools() -> None:
    offenders = []
    for path in python_files(PACKAGE):
        if "devtools" in path.parts or path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and "devtools" in (node.module or ""):
                offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders
