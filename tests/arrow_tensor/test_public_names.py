"""The public surface holds: nodes and examples use public names, messages name real ones."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import arrow_tensor as at
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(at.__file__).resolve().parent
PUBLIC_MODULES = {
    "arrow_tensor",
    "arrow_tensor.batching",
    "arrow_tensor.config",
    "arrow_tensor.node",
    "arrow_tensor.pool",
    "arrow_tensor.testing",
}
USER_CODE = sorted([*ROOT.glob("nodes/*/*.py"), *ROOT.glob("examples/**/*.py")])


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) of every import of arrow_tensor in ``path`` (name None: the module)."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.startswith("arrow_tensor")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("arrow_tensor"):
            found += [(node.module, a.name) for a in node.names]
    return found


def test_there_is_user_code_to_check() -> None:
    assert len(USER_CODE) >= 8
    assert all(_imports(p) for p in USER_CODE if p.name == "main.py")


@pytest.mark.parametrize("path", USER_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_nodes_and_examples_import_only_public_names(path: Path) -> None:
    for module, name in _imports(path):
        full = module if name is None else f"{module}.{name}"
        if full in PUBLIC_MODULES:
            continue  # a public module itself (from arrow_tensor import testing)
        assert module in PUBLIC_MODULES, f"{path.name} imports the private module {module}"
        exported = importlib.import_module(module).__all__
        assert name in exported, f"{path.name} imports {name!r}, not in {module}.__all__"


def _strings() -> list[tuple[Path, str]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append((path, node.value))
    return out


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_messages_and_docstrings_name_only_names_that_exist() -> None:
    named = {  # in prose: a string that is only a dotted name is a logger or namespace
        (path.name, m.rstrip("."))
        for path, text in _strings()
        if not re.fullmatch(r"[\w.]+", text)
        for m in re.findall(r"\barrow_tensor(?:\.\w+)+", text)
    }
    assert named, "the scan found no names at all"
    missing = sorted((where, name) for where, name in named if not _resolves(name))
    assert missing == []


def test_every_setting_a_message_names_is_read_somewhere() -> None:
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    read = set(re.findall(r"""(?:setting|get)\(\s*["'](ARROW_TENSOR_\w+)""", source))
    named = {m for _, text in _strings() for m in re.findall(r"\bARROW_TENSOR_[A-Z_]+\b", text)}
    assert read, "no setting is read?"
    assert named - read == set(), "settings named in messages but read nowhere"


def test_architecture_names_only_notes_and_modules_that_exist() -> None:
    text = (PACKAGE.parents[1] / "ARCHITECTURE.md").read_text()
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    notes = {" ".join(n.split()) for n in re.findall(r"Note \[[^\]]+\]", text)} - {"Note [...]"}
    assert notes, "ARCHITECTURE.md points to no Note"
    assert {n for n in notes if n not in source} == set()
    modules = {m for m in re.findall(r"`(_[a-z_]+)`", text)}
    files = {p.stem for p in PACKAGE.rglob("_*.py")}
    assert modules - files - {"_errors"} <= {"_EXECUTORS"}
