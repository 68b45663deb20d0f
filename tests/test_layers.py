"""The package's layers: each folder imports only from the folders below it, and ``import toe`` changes nothing.

The order, lowest first, is the one ``toe/__init__.py`` gives. Every import in the source counts, those inside
functions too (a deferred import is still a dependency)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("ops", "cost", "models", "hosts", "data", "config", "train", "sweep", "bench", "vis", "analysis", "cli")
# The only imports of the lowest layer beyond the standard library: torch, and timm's PatchDropout layer, which
# toe.ops.patch_dropout drives (the dropping is timm's own).
OPS_THIRD_PARTY = ("torch", "timm.layers")


def _sources():
    """(module name, layer rank, path) of every module of the package, conf/ and analysis/ by their installed names."""
    for path in sorted((REPO / "toe").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if len(parts) == 2:  # toe/__init__.py: the lazy public names, nothing imported at run time
            continue
        rank = len(LAYERS) - 1 if parts[-1] == "__main__" else LAYERS.index(parts[1])  # an entry point, like cli
        yield ".".join(p for p in parts if p != "__init__"), rank, path
    for path in sorted((REPO / "analysis").glob("*.py")):
        yield f"toe.analysis.{path.stem}", LAYERS.index("analysis"), path
    for path in sorted((REPO / "conf").glob("*.py")):  # the config package: Hydra's entry, above config
        yield "toe.conf", LAYERS.index("config"), path


def _imports(path: Path):
    """(line, imported module) for every import, ``from x import y`` giving ``x.y`` where that is a module."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import (toe imports by absolute names)"
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def _toe_layer(module: str):
    parts = module.split(".")
    if parts[0] != "toe" or len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return LAYERS.index(parts[1])


def test_layers_import_only_downwards():
    upward = []
    for _name, rank, path in _sources():
        for line, module in _imports(path):
            layer = _toe_layer(module)
            if module == "toe":  # the lazy public names hide which layer they come from: name the module
                upward.append(f"{path.relative_to(REPO)}:{line} imports toe itself")
            elif layer is not None and layer > rank:
                upward.append(f"{path.relative_to(REPO)}:{line} ({LAYERS[rank]}) imports {module} ({LAYERS[layer]})")
    assert not upward, "imports from a layer above:\n" + "\n".join(upward)


def _is_module(parts) -> bool:
    """Whether ``toe.<parts[1:]>`` is a module of the source tree (analysis/ and conf/ by their installed names)."""
    if len(parts) < 2:
        return False
    folder = {"analysis": REPO / "analysis", "conf": REPO / "conf"}.get(parts[1], REPO / "toe" / parts[1])
    path = folder.joinpath(*parts[2:])
    return (
        (path / "__init__.py").is_file()
        or path.with_suffix(".py").is_file()
        or (len(parts) == 2 and folder.with_suffix(".py").is_file())
    )


def test_every_imported_toe_module_exists():
    """The check above reads names: a misspelt or stale module path must fail here rather than pass there."""
    missing = []
    for _name, _rank, path in _sources():
        for line, module in _imports(path):
            parts = module.split(".")
            if parts[0] != "toe":
                continue
            # `from toe.x import name`: either toe.x.name is a module or toe.x is
            if not (_is_module(parts) or _is_module(parts[:-1])):
                missing.append(f"{path.relative_to(REPO)}:{line}: {module}")
    assert not missing, "imports of toe modules that do not exist:\n" + "\n".join(missing)


def test_ops_import_torch_only():
    third_party = []
    for _name, rank, path in _sources():
        if rank != 0:
            continue
        for line, module in _imports(path):
            top = module.split(".")[0]
            if top in ("toe", "__future__") or top in sys.stdlib_module_names:
                continue
            if not module.startswith(OPS_THIRD_PARTY):
                third_party.append(f"{path.relative_to(REPO)}:{line}: {module}")
    assert not third_party, "toe.ops imports beyond torch:\n" + "\n".join(third_party)


def test_import_toe_has_no_side_effects():
    """A fresh interpreter: ``import toe`` loads no host library, no Hydra and no submodule of toe, and leaves
    ``hydra_plugins``' path as it was; the public names still work (loaded on first use)."""
    probe = (
        "import sys\n"
        "import hydra_plugins\n"
        "before = list(hydra_plugins.__path__)\n"
        "import toe\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('timm', 'hydra', 'omegaconf') "
        "or m.startswith('toe.'))\n"
        "print(loaded, list(hydra_plugins.__path__) == before)\n"
        "print(toe.patch.__module__, toe.ExpansionSchedule.__module__, 'patch' in dir(toe))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[] True", "toe.hosts toe.ops.schedule True"], out


def test_unknown_public_name_is_an_attribute_error():
    import toe

    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        toe.not_a_name  # noqa: B018
