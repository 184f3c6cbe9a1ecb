"""The package's shape: one subpackage per concern, no import cycles (function-local imports included), the
orchestrator imported only from the command line, and each path package of the same shape."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qlora_pipeline"
ROOT = "qlora_pipeline"
PATHS = ("embeddings", "finetune", "sft")  # one package per path of `experiment.mode`
# Below the paths: what every path may use, and what may never reach back up to a path, the shared stages, the
# orchestrator or the commands.
SHARED = (
    "config",
    "errors",
    "runs",
    "integrity",
    "distributed",
    "progress",
    "data",
    "models",
    "training",
    "evaluation",
    "reporting",
)
ABOVE_THE_SHARED = (
    *PATHS,
    "stages",
    "pipeline",
    "predict",
    "predict_cli",
    "evaluate",
    "generate_cli",
    "reproduce",
    "plan",
    "sweep",  # runs points as `python -m qlora_pipeline run` processes: below the orchestrator, beside the CLI
    "cli",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every package module `name` imports, wherever the import statement stands (module level or in a function)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    is_package = MODULES[name].name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:  # `from package import module` imports the module
                candidate = f"{source}.{alias.name}"
                found.add(candidate if candidate in MODULES else source)
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def top(module: str) -> str:
    """The concern a module belongs to: `qlora_pipeline.finetune.recipe` -> `finetune`."""
    return module.split(".")[1] if module != ROOT else ROOT


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(GRAPH[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return found


def test_the_walk_sees_function_local_imports() -> None:
    assert f"{ROOT}.finetune.run" in GRAPH[f"{ROOT}.pipeline"]  # imported inside `path_of`
    assert f"{ROOT}.reproduce" in GRAPH[f"{ROOT}.pipeline"]  # imported inside `_run`


def test_no_import_cycles() -> None:
    assert cycles() == []


def test_only_the_command_line_imports_the_orchestrator() -> None:
    importers = sorted(name for name, targets in GRAPH.items() if f"{ROOT}.pipeline" in targets)
    assert importers == [f"{ROOT}.__main__", f"{ROOT}.cli"] or importers == [f"{ROOT}.cli"]


def test_the_shared_layers_never_import_a_path_or_anything_above_them() -> None:
    upward = sorted(
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if top(name) in SHARED
        for target in targets
        if top(target) in ABOVE_THE_SHARED
    )
    assert upward == []


def test_the_paths_do_not_import_each_other() -> None:
    across = sorted(
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if top(name) in PATHS
        for target in targets
        if top(target) in PATHS and top(target) != top(name)
    )
    assert across == []


@pytest.mark.parametrize("path", PATHS)
def test_each_path_package_has_a_run_module_of_the_same_shape(path: str) -> None:
    tree = ast.parse((PACKAGE / path / "run.py").read_text(encoding="utf-8"))
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    names = {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    assert {"preflight", "execute"} <= functions
    assert "DATA_PARALLEL" in names


@pytest.mark.parametrize("init", sorted(PACKAGE.glob("*/__init__.py")), ids=lambda p: p.parent.name)
def test_a_subpackage_init_is_a_one_line_docstring_and_nothing_else(init: Path) -> None:
    tree = ast.parse(init.read_text(encoding="utf-8"))
    docstring = ast.get_docstring(tree)
    assert docstring and "\n" not in docstring, f"{init}: a one-line docstring saying what the subpackage holds"
    assert len(tree.body) == 1, f"{init}: no imports or code (importing a subpackage must cost nothing)"


def test_every_module_belongs_to_a_known_concern() -> None:
    """A new top-level module is a decision: add it to SHARED or ABOVE_THE_SHARED here, where its layer is named."""
    known = {ROOT, "__main__", *SHARED, *ABOVE_THE_SHARED}
    assert sorted({top(name) for name in MODULES} - known) == []


def test_importing_the_package_changes_no_warnings_or_logging_state() -> None:
    """No work at import time: the libraries are imported first, then every module of the package; the warnings
    filters and every logger's filters, handlers and level stay as they were."""
    import subprocess
    import sys

    modules = sorted(name for name in MODULES if not name.endswith("__main__"))
    script = (
        "import logging, warnings, importlib, json\n"
        "import torch, transformers, peft, sklearn, pandas, matplotlib, bitsandbytes, datasets, yaml\n"
        "import transformers.trainer\n"
        "def state():\n"
        "    names = sorted(logging.root.manager.loggerDict)\n"
        "    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in names]\n"
        "    return [repr(warnings.filters)] + [\n"
        "        (l.name, l.level, [type(f).__name__ for f in l.filters], [type(h).__name__ for h in l.handlers])\n"
        "        for l in loggers if isinstance(l, logging.Logger)\n"
        "    ]\n"
        "before = state()\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "after = state()\n"
        "new = [entry for entry in after if entry not in before and not (isinstance(entry, tuple)\n"
        "       and entry[0].startswith('qlora_pipeline') and entry[1:] == (0, [], []))]\n"
        "print(json.dumps(new, default=str))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
