"""One direction of dependencies: runtime <- plugins <- builder <- serving / bench / cli, training
beside builder. Every import statement of every file is read (those inside functions too), so an
import made only when some path runs cannot hide."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> (its source directory, the packages it must not import)
LAYERS = {
    "runtime": ("runtime", {"plugins", "builder", "serving", "bench", "training", "cli"}),
    "plugins": ("plugins", {"builder", "serving", "bench", "training", "cli"}),
    "builder": ("builder", {"serving", "bench", "training", "cli"}),
    "training": ("training", {"builder", "serving", "bench", "cli"}),
    "bench": ("redrafter/bench", {"training", "serving"}),
}


def imported_modules(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import in a file of package dir `path`."""
    rel = path.parent.relative_to(ROOT).as_posix().replace("/", ".")
    package = rel if rel.startswith("redrafter") else f"redrafter.{rel}"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            module = ".".join(base[: len(base) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                else node.module
            out.append((node.lineno, module, [a.name for a in node.names]))
    return out


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "redrafter" or len(parts) == 1:  # the bare package: its data files (the shipped drafter)
        return None
    if len(parts) > 1 and parts[1] == "datasets":  # prompt sets: a leaf every layer may read
        return "datasets"
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS | {"serving": 0} else "cli"


def file_violations(path: Path, layer: str) -> list[str]:
    found = []
    for line, module, names in imported_modules(path):
        target = layer_of(module)
        if target in LAYERS[layer][1]:
            found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
        if target == "runtime" and layer != "runtime" and any(n.startswith("_") for n in names):
            found.append(f"{path.relative_to(ROOT)}:{line} imports private names {names} of {module}")
    return found


def violations(layer: str) -> list[str]:
    return [v for path in sorted((ROOT / LAYERS[layer][0]).rglob("*.py")) for v in file_violations(path, layer)]


@pytest.mark.parametrize("layer", list(LAYERS))
def test_no_package_imports_a_layer_above_it(layer):
    assert violations(layer) == []


def test_the_scan_sees_function_level_relative_and_private_imports():
    # A runtime file importing builder inside a function, relatively and absolutely, is caught, and
    # so is a plugin reading a private runtime name.
    path = ROOT / "runtime" / "_layering_probe.py"
    path.write_text("def f():\n    from ..builder.engine import load_engine\n    import redrafter.serving.model\n"
                    "    from .decoding import Decoder\n")
    try:
        assert file_violations(path, "runtime") == ["runtime/_layering_probe.py:2 imports redrafter.builder.engine",
                                                    "runtime/_layering_probe.py:3 imports redrafter.serving.model"]
    finally:
        path.unlink()
    path = ROOT / "plugins" / "_layering_probe.py"
    path.write_text("from ..runtime.beam_search import _DEAD, beam_search\n")
    try:
        assert file_violations(path, "plugins") == [
            "plugins/_layering_probe.py:1 imports private names ['_DEAD', 'beam_search'] of redrafter.runtime.beam_search"]
    finally:
        path.unlink()
