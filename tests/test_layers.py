"""The package's layers point down only, and no module imports itself back through others.

    models/ diffusion/ data/ (+ errors, outputs, targets, flops, presets)   <- bottom: Flax modules, schedules, data
    convert/  configs/                                              <- weight formats of the models; training configs
    editing/  training/                                             <- programs (editing never imports training)
    evaluate/  aot                                                  <- measurements of those programs
    CLIs (train.py, edit.py, python -m ...)                         <- top
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "x2x_jax"
LAYER = {"errors": 0, "outputs": 0, "targets": 0, "flops": 0, "presets": 0, "models": 1, "diffusion": 1, "data": 1,
         "convert": 2, "configs": 2, "editing": 3, "training": 3, "evaluate": 4, "aot": 4}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported x2x_jax module, at the top of the file?) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("x2x_jax"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            found += [(n if _is_module(n) else node.module, id(node) in top) for n in names]
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names if a.name.startswith("x2x_jax")]
    return found


def _is_module(name: str) -> bool:
    path = ROOT.parent / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYER.get(parts[1]) if len(parts) > 1 else None


def sources():
    return [p for p in ROOT.rglob("*.py") if p.name != "__main__.py"]  # __main__: CLIs, the top layer


def test_layers_point_down():
    wrong = []
    for path in sources():
        me = module_name(path)
        for target, _ in imports(path):
            mine, theirs = layer(me), layer(target)
            if mine is None or theirs is None:
                continue
            if theirs > mine or (me.startswith("x2x_jax.editing") and target.startswith("x2x_jax.training")):
                wrong.append(f"{me} -> {target}")
    assert not wrong, "imports that point up:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = {module_name(p): {t for t, _ in imports(p)} for p in sources()}
    cycles = []

    def visit(node, stack):
        for nxt in graph.get(node, ()):
            if nxt in stack:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in done:
                visit(nxt, stack + [nxt])
        done.add(node)

    done: set[str] = set()
    for start in graph:
        if start not in done:
            visit(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles)))
