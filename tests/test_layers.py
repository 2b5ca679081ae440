"""The import layering the architecture promises, checked on the source (every import, also inside functions):

* ``fastgen.trainers`` never imports ``fastgen.evaluation`` or ``fastgen.workflows`` (training never scores);
* ``fastgen.evaluation`` never imports ``fastgen.trainers`` or ``fastgen.workflows`` (evaluation never trains);
* ``fastgen.pipelines`` never imports ``fastgen.trainers`` or ``fastgen.workflows``;
* ``fastgen.rewards`` imports no private (underscore) name of ``fastgen.evaluation``;
* a method file imports no other method file (methods compose shared pieces, never each other's classes),
  except RG-LCD composing LCD's options and its loss function (``lcd_step``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fastgen"
METHOD_FILES = {"lcd", "rg_lcd", "scott", "boot", "score_distill", "disback", "clear"}


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, imported names)`` of every import statement in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
    return out


def modules_of(sub: str) -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


@pytest.mark.parametrize(
    "layer,forbidden",
    [
        ("trainers", ("fastgen.evaluation", "fastgen.workflows")),
        ("evaluation", ("fastgen.trainers", "fastgen.workflows")),
        ("pipelines", ("fastgen.trainers", "fastgen.workflows")),
        ("models", ("fastgen.trainers", "fastgen.workflows", "fastgen.evaluation", "fastgen.pipelines")),
        ("data", ("fastgen.trainers", "fastgen.workflows", "fastgen.evaluation", "fastgen.pipelines")),
        ("diffusion", ("fastgen.trainers", "fastgen.workflows", "fastgen.evaluation", "fastgen.pipelines", "fastgen.models")),
    ],
)
def test_layers_point_one_way(layer, forbidden):
    bad = [
        f"{path.relative_to(PKG)}: {module}"
        for path in modules_of(layer)
        for module, _ in imports(path)
        if any(module == f or module.startswith(f + ".") for f in forbidden)
    ]
    assert not bad, bad


def test_rewards_use_no_private_names_of_evaluation():
    bad = [
        f"{path.relative_to(PKG)}: {module}.{name}"
        for path in modules_of("rewards")
        for module, names in imports(path)
        if module.startswith("fastgen.evaluation")
        for name in names
        if name.startswith("_")
    ]
    assert not bad, bad


def test_method_files_do_not_import_each_other():
    bad = []
    for name in METHOD_FILES:
        for module, names in imports(PKG / "trainers" / f"{name}.py"):
            other = module.rsplit(".", 1)[-1]
            if module.startswith("fastgen.trainers.") and other in METHOD_FILES and other != name:
                composed = (name in ("rg_lcd", "scott") and other == "lcd" and names == ["LCDConfig", "lcd_step"]) or (
                    name == "disback" and other == "score_distill" and names == ["DMD", "DMDConfig"])
                if not composed:
                    bad.append(f"{name}.py imports {module}: {names}")
    assert not bad, bad


def test_method_files_are_algorithm_sized():
    sizes = {name: len((PKG / "trainers" / f"{name}.py").read_text().splitlines()) for name in METHOD_FILES}
    assert all(n <= 300 for n in sizes.values()), sizes
