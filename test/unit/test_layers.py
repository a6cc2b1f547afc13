"""Imports go down the layers of docs/architecture.md only, at module level and inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "forest_perception"

# (module prefix, layer): the longest matching prefix names a module's layer; a module may import
# from its own layer and those below it, never from above.
LAYERS = [
    (PACKAGE, 1),  # shared types and rover runtime: frames, readings, geo, sync, recorder, inference, geometry
    (f"{PACKAGE}.sim", 2),
    (f"{PACKAGE}.dataset_tools", 3),
    (f"{PACKAGE}.models", 4),
    (f"{PACKAGE}.collab", 5),  # algorithms, Flower apps, coordinator, rover side
    (f"{PACKAGE}.nodes", 6),
    # harnesses that run the swarm on this machine (Ray simulation, loopback deployment), CLIs, demo
    (f"{PACKAGE}.collab.flower.simulation", 7),
    (f"{PACKAGE}.collab.deploy.local", 7),
    (f"{PACKAGE}.sim.cli", 7),
    (f"{PACKAGE}.dataset_tools.cli", 7),
    (f"{PACKAGE}.models.cli", 7),
    (f"{PACKAGE}.collab.flower.cli", 7),
    (f"{PACKAGE}.collab.release.cli", 7),
    (f"{PACKAGE}.demo", 7),
    ("experiments", 8),
]
LAYER_NAMES = {1: "rover runtime", 2: "simulator", 3: "dataset tools", 4: "models", 5: "collab", 6: "ROS nodes",
               7: "harnesses, CLIs and demo", 8: "experiments"}
# the folders the card keeps at the top of the repository; only forest_perception is a top-level package
CARD_FOLDERS = ("models", "collab", "dataset_tools")


def layer_of(module: str) -> int | None:
    """The layer of a first-party module, None for third-party ones."""
    best = None
    for prefix, layer in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return best[1] if best else None


def module_files() -> dict[str, Path]:
    """Every first-party module by dotted name (the card folders through their forest_perception links)."""
    found = {}
    for top in (PACKAGE, "experiments"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            found[".".join(parts)] = path
    for folder in CARD_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            found[".".join((PACKAGE, *parts))] = path
    return found


def imports_of(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement in the file, nested ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from pkg import submodule` imports the submodule too
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


MODULES = module_files()


def test_the_walk_sees_every_layer():
    layers = {layer_of(name) for name in MODULES}
    assert layers == set(LAYER_NAMES), layers
    assert len(MODULES) > 80


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    own = layer_of(module)
    wrong = []
    for line, target in imports_of(module, MODULES[module]):
        if target.split(".")[0] in CARD_FOLDERS:
            wrong.append(f"line {line}: `{target}` is not installed; import {PACKAGE}.{target}")
            continue
        if target not in MODULES and target.rpartition(".")[0] in MODULES:
            continue  # `from module import name`: the module itself was checked
        layer = layer_of(target)
        if layer is not None and layer > own:
            wrong.append(f"line {line}: {target} ({LAYER_NAMES[layer]}, layer {layer}) is above "
                         f"{module} ({LAYER_NAMES[own]}, layer {own})")
    assert not wrong, f"{MODULES[module].relative_to(ROOT)}:\n" + "\n".join(wrong)


def test_layer_of_matches_the_design():
    assert layer_of("forest_perception.sync") == 1
    assert layer_of("forest_perception.sim.world") == 2
    assert layer_of("forest_perception.sim.cli") == 7
    assert layer_of("forest_perception.collab.flower.client_app") == 5
    assert layer_of("forest_perception.collab.flower.simulation") == 7
    assert layer_of("numpy") is None


def test_a_wrong_import_is_found(tmp_path):
    path = tmp_path / "inference.py"
    path.write_text("def load():\n    from forest_perception.models.networks import build_model\n")
    targets = [t for _, t in imports_of("forest_perception.inference", path)]
    assert "forest_perception.models.networks" in targets
    assert layer_of(targets[0]) > layer_of("forest_perception.inference")
