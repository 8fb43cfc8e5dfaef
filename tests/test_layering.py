"""Lower layers never import higher ones: the numerics (parallel/, model/, pipeline/, data/) know nothing of
planning, reliability or the training loop, and the spine's metrics and optimizer know nothing of planning
or reliability. Every import counts: module level, inside a function, relative, and importlib's."""

import ast
from pathlib import Path

import pytest

import threefold

PACKAGE = Path(threefold.__file__).parent

NUMERICS = ("parallel", "model", "pipeline", "data")
ABOVE_NUMERICS = (
    "threefold.reliability", "threefold.plan", "threefold.infer", "threefold.cli", "threefold.train",
    "threefold.checkpoint", "threefold.launch", "threefold.bench", "threefold.report", "threefold.monitor",
)  # fmt: skip
SPINE = ("metrics.py", "optim.py", "adamw.py", "_adamw_kernel.py")
ABOVE_SPINE = ("threefold.reliability", "threefold.plan")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, *, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, dotted name) of every module `source` (the text of `module`) imports, anywhere in it.

    `from a import b` yields both a and a.b, since b may be a submodule (`from threefold import plan`).
    """
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            origin = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, origin))
            found += [(node.lineno, f"{origin}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and (ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__"))
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _violations(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    module = _module_name(path)
    found = imported_modules(path.read_text(), module, is_package=path.name == "__init__.py")
    bad: dict[int, str] = {}  # line -> the first forbidden name on it (`from a import b` also yields a.b)
    for line, name in found:
        if any(name == f or name.startswith(f + ".") for f in forbidden):
            bad.setdefault(line, name)
    return [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}" for line, name in bad.items()]


NUMERICS_FILES = sorted(p for layer in NUMERICS for p in (PACKAGE / layer).rglob("*.py"))


@pytest.mark.parametrize("path", NUMERICS_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_numerics_import_no_higher_layer(path):
    assert not _violations(path, ABOVE_NUMERICS), (
        f"{', '.join(NUMERICS)} must not import {', '.join(ABOVE_NUMERICS)}: pass what is needed in "
        "from the caller (the progress tracker lives in parallel/track.py for this reason)"
    )


@pytest.mark.parametrize("name", SPINE)
def test_spine_metrics_and_optimizer_import_no_plan_or_reliability(name):
    assert not _violations(PACKAGE / name, ABOVE_SPINE)


def test_the_layers_exist():
    """A renamed layer would leave the tests above with nothing to check."""
    for layer in NUMERICS:
        assert list((PACKAGE / layer).glob("*.py")), f"threefold/{layer}/ holds no modules"
    for name in SPINE:
        assert (PACKAGE / name).is_file(), f"threefold/{name} is missing"


def test_import_finder_sees_every_form():
    source = """
import threefold.plan.search
from threefold import reliability
from ..plan import hardware
from . import track

def late():
    from threefold.train import train
    return importlib.import_module("threefold.cli")
"""
    names = {name for _, name in imported_modules(source, "threefold.parallel.layers")}
    assert {"threefold.plan.search", "threefold.reliability", "threefold.plan.hardware",
            "threefold.parallel.track", "threefold.train", "threefold.cli"} <= names  # fmt: skip
    init = imported_modules("from .mesh import Mesh", "threefold.parallel", is_package=True)
    assert (1, "threefold.parallel.mesh") in init
