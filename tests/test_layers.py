"""The layer order of DESIGN.md holds: every module under seqpar/ imports only its own
layer or layers below it — at module level AND inside functions (a function-level import
hides a cycle, it does not remove it).

    errors, units, tables, commands < ops < runtime < parallel < model < data < eval_config < plan
        < train < eval < stages, studies < bench < cli

Same-layer imports are allowed (a package imports its own modules).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from seqpar.tables import markdown_header, markdown_row, markdown_table


ROOT = Path(__file__).resolve().parents[1] / "seqpar"

# Bottom up. A module's layer is its first dotted component under seqpar/.
LAYERS = [
    {"errors", "units", "tables", "commands", "__init__"},
    {"ops"},
    {"runtime"},
    {"parallel"},
    {"model"},
    {"data"},
    {"eval_config"},  # the typed `eval:` section: RunConfig (train) holds it, eval runs it
    {"plan"},
    {"train"},
    {"eval"},
    {"stages", "studies"},
    {"bench"},
    {"cli"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(line, imported seqpar module) for every import in the file, at any depth."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target
            if node.module is None or target == "seqpar":  # `from . import x`, `from seqpar import x`
                for alias in node.names:
                    yield node.lineno, f"{target}.{alias.name}"


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "seqpar":
        return None
    if len(parts) == 1:
        return 0  # the package root re-exports; it is treated as the bottom (see below)
    return RANK.get(parts[1])


def upward_imports(files) -> list[str]:
    bad = []
    for path in files:
        here = _module_name(path)
        own = _layer(here)
        if here == "seqpar":  # seqpar/__init__.py: the public API, re-exports from every layer
            continue
        for line, target in _imports(path):
            there = _layer(target)
            if own is None or there is None or target == "seqpar":
                continue
            if there > own:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target} "
                           f"(layer {target.split('.')[1]} is above {here.split('.')[1]})")
    return bad


def seqpar_files():
    return sorted(ROOT.rglob("*.py"))


def test_every_layer_is_known():
    unknown = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in seqpar_files()} - set(RANK)
    assert not unknown, f"place these in LAYERS (tests/test_layers.py and the README): {unknown}"


def test_no_upward_imports():
    bad = upward_imports(seqpar_files())
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_the_check_can_fail(tmp_path, monkeypatch):
    """Self-check: a fake upward edge (parallel importing train, in a function) is caught."""
    fake = ROOT / "parallel" / "_fake_upward.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (
        "def f():\n    from ..train import loop\n" if self == fake else _read(self)))
    bad = upward_imports([fake])
    assert len(bad) == 1 and "seqpar.train" in bad[0] and "parallel/_fake_upward.py:2" in bad[0]


_read = Path.read_text


def function_level_imports(path: Path):
    """(line, source line) of imports inside a def/class body that lack a `# deferred:` reason."""
    text = path.read_text()
    lines = text.splitlines()
    out = []
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    src = lines[inner.lineno - 1]
                    if "# deferred: " not in src:
                        out.append((inner.lineno, src.strip()))
    return sorted(set(out))


def test_function_level_imports_say_why():
    bad = []
    for path in seqpar_files():
        rel = path.relative_to(ROOT).as_posix()
        bad += [f"seqpar/{rel}:{line}: {src}" for line, src in function_level_imports(path)]
    assert not bad, ("move these imports to the top of the module, or add `# deferred: <reason>` "
                     "(a heavy optional dependency):\n" + "\n".join(bad))


def test_function_level_check_can_fail(monkeypatch):
    fake = ROOT / "train" / "_fake.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (
        "def f():\n    import json\n    import deepspeed  # deferred: heavy\n" if self == fake else _read(self)))
    assert function_level_imports(fake) == [(2, "import json")]


# ----------------------------------------------------------------------------- seqpar/tables.py

def test_tables_imports_no_seqpar_module():
    assert not [t for _, t in _imports(ROOT / "tables.py") if t.startswith("seqpar")]


def test_markdown_table_alignment_and_cells():
    lines = markdown_table(["name", "n", "x"], [["a", 1, 0.5], ("b", None, "-")], align="lrr")
    assert lines == ["| name | n | x |", "|---|--:|--:|", "| a | 1 | 0.5 |", "| b | None | - |"]
    assert markdown_table(["a", "b"], [])[1] == "|---|---|"  # default: left
    assert markdown_header(["a", "b"], ["r", "l"])[1] == "|--:|---|"


def test_markdown_cells_cannot_break_the_table():
    assert markdown_row(["failed: a | b", "two\nlines", ""]) == "| failed: a \\| b | two lines |  |"


@pytest.mark.parametrize("call", [
    lambda: markdown_table(["a", "b"], [["1", "2"], ["only one"]]),
    lambda: markdown_table(["a", "b"], [["1", "2", "3"]]),
    lambda: markdown_table(["a", "b"], [], align="l"),
    lambda: markdown_table(["a", "b"], [], align="lc"),
    lambda: markdown_row(["1"], columns=2)])
def test_markdown_table_mismatch_raises(call):
    with pytest.raises(ValueError):
        call()



MAX_FUNCTION_LINES = 60


def _long_functions(paths) -> list[str]:
    long = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    return long


def test_no_function_is_longer_than_60_lines():
    """Issue 16: a function that does not fit on a screen does more than one thing."""
    assert _long_functions(sorted(ROOT.rglob("*.py"))) == []


def test_function_length_check_can_fail(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def too_long():\n{body}\n")
    assert _long_functions([tmp_path / "long.py"]) == [f"long.py:1 too_long ({MAX_FUNCTION_LINES + 1} lines)"]
