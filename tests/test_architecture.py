"""The layout draws the architecture: import contracts and module sizes (issue 13).

* The import-linter contracts in pyproject.toml ([tool.importlinter]) hold on the real
  tree: tools -> node | client -> core -> wire, core imports no sockets, threads,
  clocks, logging or subprocesses, wire imports no other package of ours, the client
  never imports the daemon.
* They can fail: a throwaway copy of the three packages with ONE wrong import added is
  reported as breaking the contract it should (the real tree is never touched: the copy
  is put first on PYTHONPATH of a ``lint-imports`` subprocess).
* No module is over MAX_MODULE_LINES lines unless docs/ARCHITECTURE.md lists it under
  a heading "Over-long modules".
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import importlinter  # noqa: F401  (the `test` extra: pip install -e '.[test]')
import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
# Where each root package lives in the repository (see [tool.setuptools] package-dir).
PACKAGE_DIRS = {
    "snapshotd": ROOT / "snapshotd",
    "snapshotd_client": ROOT / "client" / "snapshotd_client",
    "snapshotd_tools": ROOT / "tools" / "snapshotd_tools",
}
MAX_MODULE_LINES = 550
SIZE_CHECKED_DIRS = ("snapshotd", "client", "tools")
LINT_TIMEOUT_S = 60


def contract_names() -> dict[str, str]:
    """id -> name of every contract in pyproject.toml."""
    cfg = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]
    return {c["id"]: c["name"] for c in cfg["contracts"]}


def lint_imports(pythonpath: list[Path], cwd: Path) -> tuple[int, str, set[str], set[str]]:
    """Run the contracts of pyproject.toml against the packages found first on
    ``pythonpath``: (exit status, output, ids of kept contracts, ids of broken ones)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath))
    proc = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
         "--no-cache", "--no-logo", str(PYPROJECT)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=LINT_TIMEOUT_S)
    out = proc.stdout + proc.stderr
    kept, broken = set(), set()
    for cid, name in contract_names().items():
        if re.search(rf"^{re.escape(name)} KEPT$", out, re.M):
            kept.add(cid)
        if re.search(rf"^{re.escape(name)} BROKEN$", out, re.M):
            broken.add(cid)
    return proc.returncode, out, kept, broken


def test_contracts_hold_on_the_real_tree():
    # The real tree, whatever is installed: the repository's folders come first.
    rc, out, kept, broken = lint_imports(
        [ROOT, ROOT / "client", ROOT / "tools"], cwd=ROOT)
    assert not broken and rc == 0, out
    assert kept == set(contract_names()), out


# (module to edit, line to add, contracts it must break, import chain the report names)
WRONG_IMPORTS = {
    "core-imports-socket": (
        "snapshotd/core/placement.py", "import socket",
        {"core-pure"}, "snapshotd.core.placement -> socket"),
    "core-imports-threading": (
        "snapshotd/core/protocol.py", "import threading",
        {"core-pure"}, "snapshotd.core.protocol -> threading"),
    "core-imports-node": (
        "snapshotd/core/ledger.py", "from snapshotd.node import metrics",
        {"core-below", "layers"}, "snapshotd.core.ledger -> snapshotd.node.metrics"),
    "client-imports-node": (
        "snapshotd_client/transport.py", "from snapshotd.node import store",
        {"client-not-node", "layers"}, "snapshotd_client.transport -> snapshotd.node.store"),
    "client-imports-tools": (
        "snapshotd_client/__init__.py", "import snapshotd_tools.cli",
        {"client-not-node", "layers"}, "snapshotd_client -> snapshotd_tools.cli"),
    "wire-imports-core": (
        "snapshotd/wire/limits.py", "import snapshotd.core",
        {"wire-alone", "layers"}, "snapshotd.wire.limits -> snapshotd.core"),
    "node-imports-client": (
        "snapshotd/node/metrics.py", "import snapshotd_client.transport",
        {"layers"}, "snapshotd.node.metrics -> snapshotd_client.transport"),
}


@pytest.fixture(scope="module")
def _clean_copy(tmp_path_factory) -> Path:
    """One copy of the three packages (source only), copied again per case below."""
    base = tmp_path_factory.mktemp("tree")
    for name, src in PACKAGE_DIRS.items():
        shutil.copytree(src, base / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return base


@pytest.mark.parametrize("case", sorted(WRONG_IMPORTS))
def test_a_wrong_import_breaks_its_contract(case, _clean_copy, tmp_path):
    rel, line, must_break, chain = WRONG_IMPORTS[case]
    tree = tmp_path / "tree"
    shutil.copytree(_clean_copy, tree)
    module = tree / rel
    assert module.is_file(), f"{rel} is gone from the tree: pick another module for {case}"
    module.write_text(module.read_text() + f"\n{line}  # deliberately wrong ({case})\n")

    rc, out, _kept, broken = lint_imports([tree], cwd=tmp_path)
    assert rc != 0, f"{case}: no contract broke\n{out}"
    assert must_break <= broken, (
        f"{case}: expected {sorted(must_break)} broken, got {sorted(broken)}\n{out}")
    assert chain in out, f"{case}: the report does not name {chain!r}\n{out}"


def test_the_copy_is_what_gets_checked(_clean_copy, tmp_path):
    """PYTHONPATH really points the linter at the copy: a module that exists only there is
    reported."""
    tree = tmp_path / "tree"
    shutil.copytree(_clean_copy, tree)
    probe = tree / "snapshotd" / "core" / "_probe_only_in_copy.py"
    probe.write_text('"""probe"""\nimport socket\n')
    rc, out, _kept, broken = lint_imports([tree], cwd=tmp_path)
    assert rc != 0 and "core-pure" in broken, out
    assert "snapshotd.core._probe_only_in_copy -> socket" in out, out


# -- module sizes ---------------------------------------------------------------------------
def allowed_long_modules(doc: str) -> set[str]:
    """Paths (with a folder, ending in .py) named under a heading "Over-long modules"
    (any level), up to the next heading: in a list, a table or prose. None when the
    heading is absent."""
    allowed: set[str] = set()
    inside = fenced = False
    for raw in doc.splitlines():
        if raw.lstrip().startswith(("```", "~~~")):
            fenced = not fenced  # a '#' line in a code block is no heading
        heading = None if fenced else re.match(r"^#+\s+(.*?)\s*#*\s*$", raw)
        if heading:
            inside = heading.group(1).strip().lower().startswith("over-long modules")
            continue
        if inside:
            allowed.update(re.findall(r"[\w.-]+(?:/[\w.-]+)+\.py\b", raw))
    return allowed


def is_allowed(rel: str, allowed: set[str]) -> bool:
    """``rel`` (repository-relative) is listed, in full or by its trailing path."""
    return any(rel == a or rel.endswith("/" + a) for a in allowed)


def test_allowed_long_modules_parser():
    doc = ("# A\n- `x/ignored.py`\n## Over-long modules\n\nSome text naming y.py and "
           "`tools/c.py`.\n- `snapshotd/node/a.py` (being split, issue 13)\n* tools/b.py: why\n"
           "| `node/cluster/node.py` | 1170 |\n```\n# not a heading\n```\n- snapshotd/e.py\n"
           "## Next\n- `snapshotd/d.py`\n")
    allowed = allowed_long_modules(doc)
    assert allowed == {"tools/c.py", "snapshotd/node/a.py", "tools/b.py", "node/cluster/node.py",
                       "snapshotd/e.py"}
    assert is_allowed("snapshotd/node/cluster/node.py", allowed)
    assert not is_allowed("snapshotd/node/b.py", allowed)
    assert not is_allowed("x/ignored.py", allowed)
    assert allowed_long_modules("# Architecture\n- snapshotd/a.py\n") == set()


def test_no_module_is_over_long():
    doc = ROOT / "docs" / "ARCHITECTURE.md"
    allowed = allowed_long_modules(doc.read_text() if doc.is_file() else "")
    too_long = {}
    for top in SIZE_CHECKED_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if "/_proto/" in rel or "__pycache__" in rel:
                continue  # generated code
            with path.open("rb") as f:
                lines = sum(1 for _ in f)
            if lines > MAX_MODULE_LINES and not is_allowed(rel, allowed):
                too_long[rel] = lines
    assert not too_long, (
        f"modules over {MAX_MODULE_LINES} lines, not listed under 'Over-long modules' in "
        f"docs/ARCHITECTURE.md: {too_long}")


def test_every_package_is_in_the_wheel():
    """A sub-package missing from [tool.setuptools] packages works in the editable dev
    install and is absent from a wheel (``pip install .``): snapshotd.node.peer, core.sim and
    snapshotd_client.integrations were, and a daemon installed from a wheel could not start."""
    listed = set(tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for root, where in PACKAGE_DIRS.items():
        for init in where.rglob("__init__.py"):
            rel = init.parent.relative_to(where).parts
            if "__pycache__" not in rel:
                found.add(".".join((root, *rel)))
    assert found - listed == set(), f"packages not in pyproject's [tool.setuptools] packages: {sorted(found - listed)}"
    assert listed - found == set(), f"listed packages with no __init__.py: {sorted(listed - found)}"
