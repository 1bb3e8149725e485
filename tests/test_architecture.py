"""Architecture rules, checked on the source text (``ast``; nothing is imported).

* Layering: evals -> trainer -> datasets. molscale.datasets imports neither molscale.trainer nor
  molscale.evals; molscale.trainer never imports molscale.evals.
* The module import graph of molscale has no cycle.
* Test modules share helpers through helper modules (tests/support.py, the folders' helpers), never by importing
  another test module: a test file can then be moved, renamed or deleted on its own.
* The objective and branch names ('diffusion', 'moleculejae', 'growth', 'nucleation') are compared only through
  their registries (trainer/model/objectives.py, trainer/model/branches.py), never as string literals.
* Below its entry points (evals/generate.py, evals/predict.py) evaluation reads a typed config
  (evals/eval_config.py), never argparse's namespace: no other module under evals/ imports argparse or has a
  function parameter named ``args``/``namespace`` or annotated ``Namespace``.
* No code imports the bare top-level names ``datasets``, ``trainer`` or ``evals``: the source folders
  install as molscale.datasets, molscale.trainer and molscale.evals only, so a bare name is either a
  different distribution (Hugging Face ``datasets``) or nothing at all.

Every import counts, wherever it sits: module level, inside a function (a lazy import is still a
dependency), under ``if TYPE_CHECKING:``, relative (``from . import x``), and
``importlib.import_module("molscale....")`` with a literal name.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import ROOT

SOURCE_DIRS = ("datasets", "trainer", "evals")  # installed as molscale.<dir>
PREFIX = "molscale"
# lower layers must not import higher ones: layer -> layers it must never import
FORBIDDEN = {
    "datasets": ("trainer", "evals"),
    "trainer": ("evals",),
    "evals": (),
}
BARE_NAMES = frozenset(SOURCE_DIRS)
# A test that deliberately imports a stand-in distribution named like a source folder marks the line
# with this comment; only files under tests/ may use it.
STANDIN_MARK = "# stand-in"


@dataclass(frozen=True)
class Import:
    file: str  # path relative to the checkout
    line: int
    source: str  # importing module
    target: str  # imported module, resolved to a module of the graph where possible
    raw: str  # the name as written, for messages

    def __str__(self) -> str:
        return f"{self.file}:{self.line} imports {self.raw}"


# --------------------------------------------------------------------------------------------------
# collecting


def module_name(path: Path, root: Path = ROOT) -> str:
    """datasets/shards/storage.py -> molscale.datasets.shards.storage; datasets/__init__.py -> molscale.datasets"""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PREFIX, *parts])


def source_files(root: Path = ROOT, dirs=SOURCE_DIRS) -> list[Path]:
    return sorted(p for d in dirs for p in (root / d).rglob("*.py") if "__pycache__" not in p.parts)


def _raw_imports(tree: ast.AST, module: str, is_package: bool):
    """(line, dotted name, [imported names]) for every import statement in the tree; relative imports resolved
    against ``module``. ``[imported names]`` is empty for ``import x.y``."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield node.lineno, name, [a.name for a in node.names]
        elif isinstance(node, ast.Call):  # importlib.import_module("literal") / __import__("literal")
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if (fname in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                yield node.lineno, node.args[0].value, []


def resolve(name: str, imported: list[str], modules: set[str]) -> list[str]:
    """Modules of the graph that one import statement depends on.

    ``from pkg import name`` -> pkg.name when that is a module file, else pkg; ``import a.b.c`` -> a.b.c, or
    its longest prefix that is a module (so a dangling name still points at the nearest real module).
    """
    targets = []
    if imported:
        for n in imported:
            sub = f"{name}.{n}"
            targets.append(sub if sub in modules else name)
    else:
        targets.append(name)
    out = []
    for t in targets:
        while t and t not in modules and "." in t:
            t = t.rpartition(".")[0]
        if t not in out:
            out.append(t)
    return out


def collect(files: dict[str, str], root_label: str = "") -> tuple[set[str], list[Import]]:
    """Imports of molscale modules in ``files`` ({relative path: source text})."""
    modules = {module_name(Path(p), Path(".")) for p in files}
    edges: list[Import] = []
    for rel, text in sorted(files.items()):
        path = Path(rel)
        mod = module_name(path, Path("."))
        tree = ast.parse(text, filename=rel)
        for line, name, imported in _raw_imports(tree, mod, path.name == "__init__.py"):
            if name != PREFIX and not name.startswith(PREFIX + "."):
                continue
            for target in resolve(name, imported, modules):
                raw = name if not imported else f"{name} ({', '.join(imported)})"
                edges.append(Import(rel, line, mod, target, raw))
    return modules, edges


def project_imports() -> tuple[set[str], list[Import]]:
    files = {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8") for p in source_files()}
    return collect(files)


# --------------------------------------------------------------------------------------------------
# checking


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == PREFIX else None


def direction_violations(edges: list[Import]) -> list[Import]:
    return [e for e in edges if layer(e.target) in FORBIDDEN.get(layer(e.source), ())]


def find_cycles(edges: list[Import]) -> list[list[Import]]:
    """One concrete cycle (as its list of import edges) per strongly connected component that has one
    (Tarjan's algorithm, iterative)."""
    graph: dict[str, dict[str, Import]] = {}
    for e in edges:
        graph.setdefault(e.source, {}).setdefault(e.target, e)  # first import of a target is the witness
        graph.setdefault(e.target, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        n = stack.pop()
                        on_stack.discard(n)
                        comp.append(n)
                        if n == node:
                            break
                    if len(comp) > 1 or node in graph[node]:
                        sccs.append(sorted(comp))
    cycles = []
    for comp in sccs:  # shortest cycle through the component's first module (BFS inside the component)
        members = set(comp)
        start = comp[0]
        prev: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for n in frontier:
                for m in sorted(graph[n]):
                    if m == start:
                        found = n
                        break
                    if m in members and m not in prev and m != start:
                        prev[m] = n
                        nxt.append(m)
                if found is not None:
                    break
            frontier = nxt
        path = [found]
        while path[-1] != start:
            path.append(prev[path[-1]])
        path.reverse()  # start ... found, then found -> start closes it
        cycles.append([graph[a][b] for a, b in zip(path, path[1:] + [start])])
    return cycles


def format_cycle(cycle: list[Import]) -> str:
    names = " -> ".join([cycle[0].source] + [e.target for e in cycle])
    return names + "\n" + "\n".join(f"    {e}" for e in cycle)


def bare_imports(files: dict[str, str]) -> list[str]:
    """file:line for imports of ``datasets``/``trainer``/``evals`` (absolute, top level)."""
    out = []
    for rel, text in sorted(files.items()):
        tree = ast.parse(text, filename=rel)
        lines = text.splitlines()
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call):
                f = node.func
                fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
                if (fname in ("import_module", "__import__", "find_spec") and node.args
                        and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                    names = [node.args[0].value]
            for name in names:
                if name.split(".")[0] not in BARE_NAMES:
                    continue
                line = lines[node.lineno - 1] if node.lineno <= len(lines) else ""
                if rel.startswith("tests/") and STANDIN_MARK in line:
                    continue
                out.append(f"{rel}:{node.lineno} imports {name}")
    return out


# --------------------------------------------------------------------------------------------------
# the project


def test_sources_found():
    modules, edges = project_imports()
    for d in SOURCE_DIRS:
        assert f"{PREFIX}.{d}" in modules, f"{d}/__init__.py not found under {ROOT}"
    assert len(modules) > 30 and len(edges) > 30, (len(modules), len(edges))


def test_layering():
    """evals -> trainer -> datasets, never the other way round."""
    _, edges = project_imports()
    bad = direction_violations(edges)
    assert not bad, "imports against the layering evals -> trainer -> datasets:\n" + "\n".join(map(str, bad))


def test_no_import_cycles():
    _, edges = project_imports()
    cycles = find_cycles(edges)
    text = "\n".join(format_cycle(c) for c in cycles)
    if cycles:
        print(text)
    assert not cycles, f"{len(cycles)} import cycle(s) among molscale modules:\n{text}"


def test_molscale_imports_resolve():
    """Every molscale name imported is a module (or an attribute of one) in the source folders."""
    modules, edges = project_imports()
    dangling = [e for e in edges if e.target not in modules and e.target != PREFIX]
    assert not dangling, "imports of molscale modules that do not exist:\n" + "\n".join(map(str, dangling))


REGISTERED_NAMES = {"diffusion", "moleculejae", "growth", "nucleation"}


def literal_name_comparisons(files: dict[str, str]) -> list[str]:
    """`x == "growth"`, `"diffusion" != y`, `x in ("diffusion", ...)`: comparisons with a registered name as a
    string literal (file:line)."""
    found = []
    for label, text in files.items():
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Compare):
                continue
            for operand in (node.left, *node.comparators):
                items = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                if any(isinstance(i, ast.Constant) and i.value in REGISTERED_NAMES for i in items):
                    found.append(f"{label}:{node.lineno}")
                    break
    return found


def test_objective_and_branch_names_are_compared_through_their_registries():
    files = {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8") for p in source_files()}
    bad = literal_name_comparisons(files)
    assert not bad, ("objective/branch names compared as strings (use model.objectives.Objective or "
                     "model.branches.Branch):\n" + "\n".join(bad))


def test_checker_reports_literal_name_comparisons():
    files = {"a.py": 'if cfg.objective == "moleculejae":\n    pass\nok = branch == Branch.GROWTH\n',
             "b.py": 'x = t in ("diffusion", "other")\ny = {"growth": 1}\n'}
    assert literal_name_comparisons(files) == ["a.py:1", "b.py:1"]


EVAL_ENTRY_POINTS = ("evals/generate.py", "evals/predict.py")
NAMESPACE_PARAMETERS = {"args", "namespace"}


def namespace_uses(files: dict[str, str]) -> list[str]:
    """file:line of every ``import argparse`` and every function parameter that is a command-line namespace by
    name (args, namespace) or annotation (Namespace, argparse.Namespace)."""
    found = []
    for label, text in files.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if "argparse" in names:
                    found.append(f"{label}:{node.lineno} imports argparse")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                a = node.args
                for arg in (*a.posonlyargs, *a.args, *a.kwonlyargs):
                    annotation = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                    if arg.arg in NAMESPACE_PARAMETERS or annotation.rsplit(".", 1)[-1].strip("'\"") == "Namespace":
                        found.append(f"{label}:{node.lineno} takes {arg.arg}")
    return found


def test_evaluation_below_its_entry_points_reads_a_typed_config():
    files = {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8") for p in source_files(dirs=("evals",))}
    assert set(EVAL_ENTRY_POINTS) <= set(files)
    bad = namespace_uses({k: v for k, v in files.items() if k not in EVAL_ENTRY_POINTS})
    assert not bad, ("argparse's namespace below the evaluation entry points (build an eval_config object in the "
                     "entry point and pass that):\n" + "\n".join(bad))


def test_checker_reports_namespace_uses():
    files = {"a.py": "import argparse\n\ndef run(args):\n    return args.out\n",
             "b.py": "def f(cfg: argparse.Namespace, *, ok: int = 1):\n    pass\n\ndef g(config):\n    pass\n",
             "c.py": "from argparse import ArgumentParser\nh = lambda namespace: namespace\n"}
    assert namespace_uses(files) == ["a.py:1 imports argparse", "a.py:3 takes args", "b.py:1 takes cfg",
                                     "c.py:1 imports argparse", "c.py:2 takes namespace"]


def test_modules_import_tests_only_from_helper_modules():
    """No tests/**/test_*.py imports from another test module (conftest.py, support and helper modules are fine)."""
    bad = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            bad += [f"{path.relative_to(ROOT)}: imports {name}" for name in names
                    if name.startswith("tests.") and name.rsplit(".", 1)[-1].startswith("test_")]
    assert not bad, "test modules importing other test modules (move the helper to a helper module):\n" + \
        "\n".join(bad)


def mirror_mismatches(root: Path) -> list[str]:
    """Test folders without a package of the same path, and (sub)packages without a test folder."""
    def folders(base: Path, marker: str) -> set[str]:
        return {str(p.parent.relative_to(root)) for d in SOURCE_DIRS if (base / d).is_dir()
                for p in (base / d).rglob(marker) if "__pycache__" not in p.parts}
    packages = folders(root, "__init__.py")
    tests = {p.removeprefix("tests/") for p in folders(root / "tests", "test_*.py")}
    return [f"tests/{t}: no package {t}" for t in sorted(tests - packages)] + \
        [f"{p}: no test folder tests/{p}" for p in sorted(packages - tests)]


def test_test_folders_mirror_the_packages():
    """tests/<package>/<subpackage>/ holds the tests of <package>/<subpackage>/, one folder per package."""
    assert not mirror_mismatches(ROOT), "\n".join(mirror_mismatches(ROOT))


def test_mirror_check_finds_both_kinds_of_mismatch(tmp_path):
    for rel in ("trainer/__init__.py", "trainer/model/__init__.py", "trainer/train/__init__.py",
                "tests/trainer/test_a.py", "tests/trainer/model/test_b.py", "tests/trainer/loop/test_c.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    assert mirror_mismatches(tmp_path) == ["tests/trainer/loop: no package trainer/loop",
                                           "trainer/train: no test folder tests/trainer/train"]


def test_no_bare_top_level_imports():
    """``import datasets`` / ``from trainer...`` / ``import evals`` appear nowhere in the code or the tests."""
    files = {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8")
             for p in source_files(ROOT, (*SOURCE_DIRS, "tests"))}
    files.update({p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8") for p in ROOT.glob("*.py")})
    bad = bare_imports(files)
    assert not bad, ("imports of the bare names datasets/trainer/evals (use molscale.datasets etc.; a test "
                     f"that means a stand-in distribution marks the line '{STANDIN_MARK}'):\n" + "\n".join(bad))


# --------------------------------------------------------------------------------------------------
# the checker itself: each rule fails on a synthetic tree that breaks it


SYNTHETIC_OK = {
    "datasets/__init__.py": "",
    "datasets/base.py": "import os\n",
    "datasets/shards/__init__.py": "",
    "datasets/shards/io.py": "from molscale.datasets import base\n",
    "trainer/__init__.py": "",
    "trainer/model.py": "from molscale.datasets.shards.io import thing\n",
    "evals/__init__.py": "",
    "evals/run.py": "import molscale.trainer.model\nfrom molscale.datasets.shards import io\n",
}


def test_checker_accepts_clean_tree():
    modules, edges = collect(SYNTHETIC_OK)
    assert "molscale.datasets.shards" in modules and "molscale.datasets.shards.io" in modules
    pairs = {(e.source, e.target) for e in edges}
    assert pairs == {
        ("molscale.datasets.shards.io", "molscale.datasets.base"),  # from pkg import module -> pkg.module
        ("molscale.trainer.model", "molscale.datasets.shards.io"),  # from module import attr -> module
        ("molscale.evals.run", "molscale.trainer.model"),
        ("molscale.evals.run", "molscale.datasets.shards.io"),
    }
    assert not direction_violations(edges)
    assert not find_cycles(edges)


def test_checker_reports_wrong_direction_lazy_import():
    files = dict(SYNTHETIC_OK)
    files["datasets/base.py"] = "import os\n\n\ndef f():\n    from molscale.evals import run\n    return run\n"
    files["trainer/model.py"] += "\n\ndef g():\n    import molscale.evals.run\n"
    _, edges = collect(files)
    bad = sorted(map(str, direction_violations(edges)))
    assert bad == ["datasets/base.py:5 imports molscale.evals (run)", "trainer/model.py:5 imports molscale.evals.run"]


def test_checker_reports_cycle_through_function_level_and_relative_imports():
    files = dict(SYNTHETIC_OK)
    # base -> shards.io (lazy, relative) and shards.io -> base: a cycle of two
    files["datasets/base.py"] = "def f():\n    from .shards import io\n    return io\n"
    cycles = find_cycles(collect(files)[1])
    assert len(cycles) == 1
    text = format_cycle(cycles[0])
    assert text.splitlines()[0] == "molscale.datasets.base -> molscale.datasets.shards.io -> molscale.datasets.base"
    assert "datasets/base.py:2 imports molscale.datasets.shards (io)" in text
    assert "datasets/shards/io.py:1 imports molscale.datasets (base)" in text


def test_checker_reports_longer_cycle_and_self_import():
    files = {
        "evals/__init__.py": "",
        "evals/a.py": "import molscale.evals.b\n",
        "evals/b.py": "from molscale.evals.c import x\n",
        "evals/c.py": "def f():\n    import importlib\n    return importlib.import_module('molscale.evals.a')\n",
        "evals/d.py": "from molscale.evals import d\n",
    }
    cycles = find_cycles(collect(files)[1])
    heads = sorted(format_cycle(c).splitlines()[0] for c in cycles)
    assert heads == ["molscale.evals.a -> molscale.evals.b -> molscale.evals.c -> molscale.evals.a",
                     "molscale.evals.d -> molscale.evals.d"]


def test_checker_reports_bare_names():
    files = {
        "trainer/x.py": "import datasets\nfrom evals.protocol import metrics\nimport datasetsx\n",
        "evals/y.py": "def f():\n    from trainer import main\n",
        "tests/test_z.py": "import datasets  # stand-in\nimport trainer\n",
        "evals/z.py": "import datasets  # stand-in\n",  # the mark is for tests only
    }
    assert bare_imports(files) == [
        "evals/y.py:2 imports trainer",
        "evals/z.py:1 imports datasets",
        "tests/test_z.py:2 imports trainer",
        "trainer/x.py:1 imports datasets",
        "trainer/x.py:2 imports evals.protocol",
    ]


@pytest.mark.parametrize("rel, name", [
    ("datasets/__init__.py", "molscale.datasets"),
    ("datasets/__main__.py", "molscale.datasets.__main__"),
    ("trainer/train/config.py", "molscale.trainer.train.config"),
    ("evals/protocol/__init__.py", "molscale.evals.protocol"),
])
def test_module_name(rel, name):
    assert module_name(ROOT / rel) == name
