"""The house rules that keep itr readable, checked on the source: no import circle in itr/ (imports inside
functions count too: a circle held open by a late import is still a circle), the schema and the registry are
leaves, no module over 400 lines, no function over 80 (docs/architecture.md is the map)."""
import ast
import re

from conftest import ROOT

PACKAGE = ROOT / "itr"


def _modules():
    """itr's modules by name; shards/ is itr.shards (setup.py installs it there)."""
    out = {}
    for base, prefix in ((PACKAGE, ("itr",)), (ROOT / "shards", ("itr", "shards"))):
        for p in sorted(base.rglob("*.py")):
            parts = prefix + p.relative_to(base).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(mods):
    """Module -> the itr modules it imports anywhere in its source."""
    def owner(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {owner(a.name) for a in node.names if a.name.startswith("itr")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("itr"):
                deps |= {owner(f"{node.module}.{a.name}") if f"{node.module}.{a.name}" in mods else owner(node.module)
                         for a in node.names}
        graph[name] = deps - {name, None}
    return graph


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_in_itr():
    graph = _imports(_modules())
    assert len(graph) > 40 and "itr.train" in graph and "itr.models.scan" in graph
    assert graph["itr.data.sources"] >= {"itr.shards.precomp"} and "itr.shards.writer" in graph["itr.shards.precomp"]
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_schema_and_the_registry_import_no_model_code():
    graph = _imports(_modules())
    assert graph["itr.registry"] == set()
    assert graph["itr.schema"] <= {"itr.errors", "itr.registry"}
    assert not any(d.startswith(("itr.models", "itr.modules")) for d in graph["itr.config"] - {"itr.modules.losses"})


def test_no_module_over_400_lines_and_no_function_over_80():
    long_modules, long_functions = [], []
    for name, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > 400:
            long_modules.append(f"{name} ({text.count(chr(10))} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append(f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long_modules == [] and long_functions == []


def test_the_architecture_map_names_files_that_exist():
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:itr|shards|benchmarks)/[\w/]+\.py)`", text))
    assert len(named) > 20
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert missing == [], missing



def _repeated_blocks(root, folders, window=6):
    """Blocks of ``window`` identical code lines (stripped; blank lines, comments and lone closing brackets
    skipped; short or import-only blocks ignored) that occur in more than one place under ``folders``."""
    seen = {}
    for path in sorted(f for folder in folders for f in (root / folder).rglob("*.py")):
        lines = [(i + 1, s.strip()) for i, s in enumerate(path.read_text().splitlines())]
        lines = [(i, s) for i, s in lines if s and not s.startswith("#") and s not in (")", "]", "}", '"""', "),")]
        for k in range(len(lines) - window + 1):
            block = tuple(s for _, s in lines[k:k + window])
            if sum(map(len, block)) >= 120 and not all(s.startswith(("import ", "from ")) for s in block):
                seen.setdefault(block, []).append(f"{path.relative_to(root)}:{lines[k][0]}")
    return [places for places in seen.values() if len(places) > 1]


def test_no_block_of_six_identical_lines_repeated_in_the_package():
    assert _repeated_blocks(ROOT, ["itr", "shards"]) == []


def test_the_repeat_check_finds_a_copied_block(tmp_path):
    body = "".join(f"    value_{i} = compute_something(argument_{i}, other_{i})\n" for i in range(6))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text(f"def f():\n{body}")
    (tmp_path / "pkg" / "b.py").write_text(f"def g():\n    # a comment\n\n{body}")
    assert _repeated_blocks(tmp_path, ["pkg"]) == [["pkg/a.py:2", "pkg/b.py:4"]]
