"""Which module imports which: the core (fusedclip.optim) never imports
fusedclip.integrations, which imports the core; the caller-clipping check
the core runs in its first step lives in a leaf module."""

import ast
import pathlib
import subprocess
import sys

import pytest
import torch

import fusedclip
import fusedclip.integrations as integrations
from fusedclip.optim.base import FusedClipOptimizer

ROOT = pathlib.Path(fusedclip.__file__).parent


def test_step_does_not_import_integrations():
    # In a fresh interpreter: a first step (which runs the caller-clipping
    # check) with a policy loads no module of fusedclip.integrations.
    code = (
        "import sys, torch\n"
        "import fusedclip.optim.base\n"
        "import fusedclip\n"
        "p = torch.nn.Parameter(torch.ones(3))\n"
        "p.grad = torch.ones(3)\n"
        "opt = fusedclip.FusedClipAdamW([p], clip=1.0)\n"
        "opt.step(); opt.zero_grad()\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('fusedclip.integrations'))\n"
        "print(loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT.parent)
    assert out.stdout.strip() == "[]", out.stdout


def imported_modules(path: pathlib.Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_caller_clipping_is_a_leaf():
    # Anything it imported from fusedclip could close the circle again.
    names = imported_modules(ROOT / "caller_clipping.py")
    assert names and not [n for n in names if n.startswith(("fusedclip", "."))], names
    # integrations re-exports its names: one warning class, whoever warns.
    from fusedclip import caller_clipping
    assert integrations.FrameworkClipWarning is caller_clipping.FrameworkClipWarning
    assert integrations.check_caller_clipping is caller_clipping.check_caller_clipping


@pytest.mark.parametrize("path", sorted((ROOT / "optim").glob("*.py")), ids=lambda p: p.name)
def test_optim_never_imports_integrations(path):
    names = imported_modules(path)
    assert not [n for n in names if "integrations" in n], names


def test_integrations_list_every_exported_optimizer():
    exported = {getattr(fusedclip, name) for name in fusedclip.__all__}
    optimizers = {obj for obj in exported
                  if isinstance(obj, type) and issubclass(obj, FusedClipOptimizer)}
    assert fusedclip.FusedClipLion in optimizers
    assert set(integrations.OPTIMIZERS) == optimizers
    assert {getattr(fusedclip.optim, name) for name in fusedclip.optim.__all__} <= optimizers
    # The refusal of a non-fusedclip optimizer names them all.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(TypeError) as error:
        integrations.clip_stats(opt)
    for cls in optimizers:
        assert cls.__name__ in str(error.value)
