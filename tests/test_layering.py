"""The library's layering: one import name, imports that point one way, no cycles, every module importable alone.

Layers, lowest first: the core (configs, tuners, kernels in ``sparse_peft.triton_ops``, masks, composition,
extraction, hot-swap, export) < the TRL/transformers integration (``sparse_peft.trainers``) < the application
(``sparse_peft.embedded``, ``sparse_peft.quickstart``, the CLI in ``sparse_peft.cli`` / ``sparse_peft.commands``, the
Gradio app ``sparse_peft.demo``). A module may import its own layer or lower ones, never a higher one, and nothing in
the package imports the repository's ``benchmarks`` or ``tests``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {  # repository folder -> installed package (pyproject's package-dir)
    "sparse_peft": "sparse_peft",
    "triton_ops": "sparse_peft.triton_ops",
    "trainers": "sparse_peft.trainers",
    "demo": "sparse_peft.demo",
}
APPLICATION = ("sparse_peft.embedded", "sparse_peft.quickstart", "sparse_peft.cli", "sparse_peft.commands",
               "sparse_peft.demo")
INTEGRATION = ("sparse_peft.trainers",)
OUTSIDE = ("benchmarks", "tests", "trainers", "triton_ops", "demo")  # never imported from the package


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = (path, path.name == "__init__.py")
    return found


MODULES = _modules()


def _imported(name: str, node: ast.Import | ast.ImportFrom, is_package: bool) -> list[str]:
    """Absolute names an import statement refers to (the module itself for ``from m import x``, or ``m.x``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = name.split(".") if is_package else name.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]


def _graph() -> dict[str, set[str]]:
    """Every import (module level and inside functions: a deferred import still couples the modules)."""
    edges: dict[str, set[str]] = {}
    for name, (path, is_package) in MODULES.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                targets.update(_imported(name, node, is_package))
        edges[name] = targets
    return edges


def _layer(module: str) -> int:
    if any(module == p or module.startswith(p + ".") for p in APPLICATION):
        return 2
    if any(module == p or module.startswith(p + ".") for p in INTEGRATION):
        return 1
    return 0


def _ours(target: str) -> str | None:
    """The module of ours a dotted import target is (or is inside), else None."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def test_imports_point_down_the_layers_only():
    wrong = []
    for module, targets in _graph().items():
        for target in targets:
            top = target.split(".")[0]
            if top in OUTSIDE:
                wrong.append(f"{module} imports {target} (outside the package)")
            ours = _ours(target)
            if ours is not None and _layer(ours) > _layer(module):
                wrong.append(f"{module} (layer {_layer(module)}) imports {ours} (layer {_layer(ours)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_there_is_no_import_cycle():
    edges = {m: {o for t in targets if (o := _ours(t)) is not None and o != m} for m, targets in _graph().items()}
    # a package's __init__ importing its own sub-modules is how packages work: that edge alone is not a cycle
    edges = {m: {t for t in targets if not t.startswith(m + ".")} for m, targets in edges.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(cycles)


IMPORT_EACH = """
import importlib, os, sys
import torch, transformers, peft, accelerate, safetensors  # the heavy third-party stack, loaded once
for extra in ("trl", "datasets", "gradio", "bitsandbytes", "triton"):
    try:
        importlib.import_module(extra)
    except ImportError:
        pass
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:  # a fresh child: none of our modules is imported yet
        try:
            importlib.import_module(name)
        except BaseException as exc:
            print(f"{name}: {type(exc).__name__}: {exc}", flush=True)
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_every_module_imports_alone():
    """Each module, imported first in a fresh interpreter state, works: no order dependence hidden by cycles."""
    names = [m for m in MODULES if not m.endswith("triton_kernels") or _has_triton()]
    done = subprocess.run([sys.executable, "-c", IMPORT_EACH, *names], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


@pytest.mark.slow
def test_the_wheel_installs_one_import_name(tmp_path):
    """No top-level ``trainers``, ``triton_ops``, ``demo`` or ``benchmarks`` to collide with other projects."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, timeout=600, capture_output=True)
    wheel = next(tmp_path.glob("sparse_peft-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"sparse_peft", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("sparse_peft/trainers/__init__.py", "sparse_peft/triton_ops/__init__.py",
                    "sparse_peft/demo/__init__.py", "sparse_peft/tuners/s2ft/__init__.py"):
        assert package in names
    assert not any("benchmarks" in n for n in names)


@pytest.mark.slow
def test_the_old_top_level_names_still_work_from_a_checkout_with_a_deprecation_warning():
    script = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import trainers, triton_ops\n"
        "    from trainers.callbacks import SparseUpdateCallback\n"
        "import sparse_peft.trainers as real, sparse_peft.triton_ops as kernels\n"
        "assert trainers is real and triton_ops is kernels\n"
        "assert SparseUpdateCallback is real.SparseUpdateCallback\n"
        "assert any(issubclass(w.category, DeprecationWarning) and 'sparse_peft.trainers' in str(w.message)"
        " for w in caught)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
