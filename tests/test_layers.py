"""Import layers: no module imports a higher layer, and no import cycle between modules.

The order (docs/ARCHITECTURE.md, "Layers"), lowest first:

    base < specs < config < data < metrics < preprocess < models < losses < train
         < evaluate < study < report < driver < cli

``specs`` are the light registries the config schema is generated from and validated
against (preprocessing methods, gene encoders, projection heads, image presets, losses):
they sit below ``config`` and never import torch. ``study`` is what trials and the Tune
run are made of; ``report`` (``hescape.study.report``) reads a study's results and writes
its report; ``driver`` (``hescape.study.driver``, ``hescape.study.api`` and the package
``hescape.study``) runs a study and calls the report, so neither a trial nor the report can
reach back into the driver. A module may import its own layer and
the ones below. Checked two ways:

- statically (AST, every module): every ``import`` of a hescape module, inside functions
  too (a lazy upward import is still an upward dependency), outside ``if TYPE_CHECKING:``;
  names taken from a package with lazy exports resolve to the submodule that defines them;
  plus no cycle among module-level imports;
- statically, the imports that are not import statements: every ``Ref("hescape.x:attr")``
  target and every ``importlib.import_module("hescape.x")`` (an f-string counts by its
  constant prefix, ``f"hescape.cli.{group}"`` -> ``hescape.cli``) is held to the same order,
  with one exception by design: a spec (the ``specs`` layer) may name, through ``Ref``, the
  builder of its own package (``hescape.models.spec`` -> ``hescape.models.gene``);
- at run time (subprocess, the light layers): every module of a layer imports with every
  higher layer blocked by a meta-path finder, and without torch / timm / scanpy / scvi.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hescape"

# lowest first; "x.*" = x and everything below it; an exact name beats a pattern and a
# longer pattern beats a shorter one
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("hescape", "hescape.registry", "hescape.lazy", "hescape.atomic", "hescape.paths",
              "hescape.diskfull", "hescape.tracking", "hescape.raystart", "hescape.endpoints")),
    ("specs", ("hescape.preprocess", "hescape.preprocess.spec", "hescape.preprocess.expression",
               "hescape.preprocess.methods.*", "hescape.models", "hescape.models.spec",
               "hescape.models.presets", "hescape.losses", "hescape.losses.spec")),
    ("config", ("hescape.config", "hescape.config_schema")),
    ("data", ("hescape.data.*",)),
    ("metrics", ("hescape.metrics.*",)),
    ("preprocess", ("hescape.preprocess.*",)),
    ("models", ("hescape.models.*",)),
    ("losses", ("hescape.losses.*",)),
    ("train", ("hescape.train.*",)),
    ("evaluate", ("hescape.evaluate.*",)),
    ("study", ("hescape.study.*",)),
    ("report", ("hescape.study.report.*",)),
    ("driver", ("hescape.study", "hescape.study.api", "hescape.study.driver")),
    ("cli", ("hescape.cli.*",)),
)
NAMES = [name for name, _ in LAYERS]
LIGHT = NAMES[: NAMES.index("preprocess") + 1]  # importable without torch
HEAVY = ("torch", "timm", "scanpy", "scvi")


def layer_of(module: str) -> int:
    """Index of ``module``'s layer (ValueError when no pattern covers it)."""
    best: tuple[int, int] | None = None  # (specificity, layer)
    for i, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if pattern.endswith(".*"):
                stem = pattern[:-2]
                hit = module == stem or module.startswith(stem + ".")
                score = len(stem)
            else:
                hit, score = module == pattern, 10_000
            if hit and (best is None or score > best[0]):
                best = (score, i)
    if best is None:
        raise ValueError(f"{module}: in no layer of tests/test_layers.py; add it to LAYERS")
    return best[1]


@cache
def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


@cache
def lazy_table(package: str) -> dict[str, str]:
    """``{name: submodule}`` of a package's lazy exports (``lazy_exports(__name__, {...})``
    or an ``_EXPORTS = {...}`` table), else {}."""
    path = modules().get(package)
    if path is None or path.name != "__init__.py":
        return {}
    for node in ast.walk(ast.parse(path.read_text())):
        table = None
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "lazy_exports":
            table = node.args[1] if len(node.args) > 1 else None
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_EXPORTS"
                                                  for t in node.targets):  # fmt: skip
            table = node.value
        if isinstance(table, ast.Dict):
            return {k.value: f"{package}.{v.value}" for k, v in zip(table.keys, table.values)}
    return {}


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """hescape modules an import statement loads (lazy exports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "hescape"]
    base = node.module or ""
    if node.level:
        package = module if modules()[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    if base.split(".")[0] != "hescape":
        return []
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in modules() else lazy_table(base).get(alias.name, base))
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def imports_of(module: str, source: str) -> list[tuple[str, int, bool]]:
    """``(target, line, at module level)`` for every hescape import outside TYPE_CHECKING."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, top)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((t, child.lineno, top) for t in _targets(child, module))
            inner = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, top and not inner)

    visit(ast.parse(source), True)
    return found


def _constant_prefix(node: ast.AST) -> str | None:
    """The string of a constant, or the constant head of an f-string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value).rstrip(".")
    return None


def _resolve(name: str) -> str | None:
    """The hescape module a dotted name (maybe ``module:attr``) lives in, or None."""
    name = name.partition(":")[0]
    while name and name.split(".")[0] == "hescape":
        if name in modules():
            return name
        name = name.rpartition(".")[0]
    return None


def dynamic_imports_of(source: str) -> list[tuple[str, int, str]]:
    """``(target module, line, how)`` of every ``Ref("hescape...")`` and
    ``importlib.import_module("hescape...")`` / ``import_module(...)`` call."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        name = getattr(func, "id", None) or getattr(func, "attr", None)
        if name not in ("Ref", "import_module"):
            continue
        text = _constant_prefix(node.args[0])
        target = _resolve(text) if text else None
        if target is not None:
            found.append((target, node.lineno, name))
    return found


def _spec_builder(module: str, target: str, how: str) -> bool:
    """A light spec naming its own package's heavy builder through ``Ref`` (by design)."""
    return (how == "Ref" and NAMES[layer_of(module)] == "specs"
            and module.split(".")[:2] == target.split(".")[:2])


def upward_imports(module: str, source: str) -> list[str]:
    """Every import of ``module`` that reaches a higher layer, as readable lines (import
    statements, ``Ref`` targets and ``importlib.import_module`` names alike)."""
    own = layer_of(module)
    lines = [f"{module}:{line} imports {target} ({NAMES[layer_of(target)]} > {NAMES[own]})"
             for target, line, _ in imports_of(module, source) if layer_of(target) > own]
    lines += [f"{module}:{line} {how}s {target} ({NAMES[layer_of(target)]} > {NAMES[own]})"
              for target, line, how in dynamic_imports_of(source)
              if layer_of(target) > own and not _spec_builder(module, target, how)]
    return list(dict.fromkeys(lines))


# ------------------------------------------------------------------------- static
def test_every_module_is_in_a_layer():
    for module in modules():
        layer_of(module)


def test_no_module_imports_a_higher_layer():
    problems = [p for m, path in modules().items() for p in upward_imports(m, path.read_text())]
    assert not problems, "upward imports:\n" + "\n".join(problems)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_no_import_cycle_between_modules():
    graph = {m: {t for t, _, top in imports_of(m, p.read_text()) if top and t != m}
             for m, p in modules().items()}  # fmt: skip
    cycle = _cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_are_for():
    """An upward import (also lazy, also through a lazy export) is flagged; a TYPE_CHECKING
    one is not; a cycle is found."""
    src = ("from typing import TYPE_CHECKING\n"
           "from hescape.metrics.pearson import pearson_columns\n"
           "if TYPE_CHECKING:\n    from hescape.train import fit\n"
           "def f():\n    from hescape.models import build_model\n"
           "    import hescape.evaluate.pipeline\n")  # fmt: skip
    found = upward_imports("hescape.metrics.example", src)
    assert [p.split(" imports ")[1].split(" ")[0] for p in found] == [
        "hescape.models.two_tower", "hescape.evaluate.pipeline"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_ref_and_importlib_targets_are_held_to_the_layers():
    """An upward reference through ``Ref(...)`` or ``importlib.import_module`` is flagged
    (f-strings by their constant head); a spec's Ref to its own package's builder is not."""
    src = ("import importlib\n"
           "from hescape.lazy import Ref\n"
           "BUILD = Ref('hescape.study.driver:run_study')\n"
           "def f(group):\n"
           "    importlib.import_module(f'hescape.cli.{group}')\n"
           "    return importlib.import_module('hescape.train.runner')\n")
    found = upward_imports("hescape.metrics.example", src)
    assert [p.split(" ")[2] for p in found] == [
        "hescape.study.driver", "hescape.cli", "hescape.train.runner"], found
    own = "from hescape.lazy import Ref\nB = Ref('hescape.models.gene:build_mlp')\n"
    assert upward_imports("hescape.models.spec", own) == []
    other = "from hescape.lazy import Ref\nB = Ref('hescape.train.runner:fit')\n"
    assert upward_imports("hescape.models.spec", other)
    assert _cycle({"a": {"b"}, "b": set()}) is None


# ------------------------------------------------------------------------ run time
_IMPORT_BLOCKED = """
import importlib, json, sys
allowed, blocked, heavy = json.loads(sys.argv[1])
blocked = set(blocked)

class Block:
    def find_spec(self, name, path=None, target=None):
        if name in blocked:
            raise ImportError(f"{name} belongs to a higher layer")
        return None

sys.meta_path.insert(0, Block())
for name in allowed:
    importlib.import_module(name)
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(heavy))
if loaded:
    raise SystemExit(f"imported {loaded}")
"""


def _run_blocked(allowed: list[str], blocked: list[str]) -> subprocess.CompletedProcess:
    payload = json.dumps([allowed, blocked, list(HEAVY)])
    return subprocess.run([sys.executable, "-c", _IMPORT_BLOCKED, payload], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.mark.parametrize("layer", LIGHT)
def test_light_layers_import_with_higher_layers_blocked(layer):
    top = NAMES.index(layer)
    allowed = [m for m in modules() if layer_of(m) <= top]
    blocked = [m for m in modules() if layer_of(m) > top]
    proc = _run_blocked(allowed, blocked)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_blocked_import_fails_the_run():
    proc = _run_blocked(["hescape.evaluate.pipeline"], ["hescape.metrics.retrieval"])
    assert proc.returncode != 0 and "higher layer" in proc.stderr
    proc = _run_blocked(["hescape.losses.contrastive"], [])
    assert proc.returncode != 0 and "imported ['torch']" in proc.stderr


def test_config_validation_imports_no_torch():
    """Loading and validating a study YAML (encoder names, loss, projection, preprocessing
    and the encoder/preprocessing pair) reads light registries only."""
    code = ("import sys\n"
            "from hescape.config import load_config, validate_config\n"
            "cfg = load_config('experiments/demo.yaml')\n"
            "validate_config(cfg.model_dump(), 'demo')\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout
