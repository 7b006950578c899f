"""torch.optim's own test inputs, run against the fused twins.

``torch.testing._internal.common_optimizers`` (in the torch wheel) describes,
for each optimizer, the constructor inputs torch's test suite trains with and
the bad inputs it must refuse (``optim_db``). These tests take torch's entries
for Adam, AdamW, SGD and Adagrad and check that:

- every bad input torch refuses, the fused twin refuses with the same error
  type and a message that matches torch's (construction and step errors);
- every training input gives, on the CPU with float32 and float64
  parameters, the parameters and state of torch's ``fused=True`` step bit for
  bit, over several steps, for a model with parameters of several shapes.
"""

from __future__ import annotations

import pytest
import torch

from registry import SPECS

common = pytest.importorskip(
    "torch.testing._internal.common_optimizers",
    reason="torch's optimizer test inputs need the expecttest package")

# Every optimizer of the registry that has a torch twin.
FUSED = {spec.twin: spec.fused for spec in SPECS.values() if spec.twin is not None}
INFOS = [info for info in common.optim_db if info.optim_cls in FUSED]


def _error_cases():
    for info in INFOS:
        for i, err in enumerate(info.optim_error_inputs_func(device="cpu", dtype=torch.float32)):
            yield pytest.param(info, err, id=f"{info.optim_cls.__name__}-{i}-{err.optimizer_error_input.desc}")


def _train_cases():
    for info in INFOS:
        for dtype in (torch.float32, torch.float64):
            for inp in info.optim_inputs_func(device="cpu", dtype=dtype):
                yield pytest.param(info, inp, dtype,
                                   id=f"{info.optim_cls.__name__}-{inp.desc}-{dtype}")


def test_every_twin_is_in_torchs_db():
    assert {info.optim_cls for info in INFOS} == set(FUSED)


@pytest.mark.parametrize("info,err", list(_error_cases()))
def test_torchs_error_inputs(info, err):
    """The same refusal as torch's, for torch's own list of bad inputs."""
    inp = err.optimizer_error_input
    ours = FUSED[info.optim_cls]
    # Some of torch's "errors" are warnings (a duplicate parameter in a group).
    expect = pytest.warns if issubclass(err.error_type, Warning) else pytest.raises
    if err.error_on == common.OptimizerErrorEnum.CONSTRUCTION_ERROR:
        with expect(err.error_type, match=err.error_regex):
            ours(inp.params, **inp.kwargs)
    else:
        opt = ours(inp.params, **inp.kwargs)
        with expect(err.error_type, match=err.error_regex):
            opt.step()


def _model_params(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(10, 5), (5,), (3, 3, 2), (), (37,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
            for s in shapes]


@pytest.mark.parametrize("info,inp,dtype", list(_train_cases()))
def test_torchs_training_inputs_bitwise(info, inp, dtype):
    """torch's training inputs, each: the fused twin's step is torch's fused
    CPU step, bit for bit (no clipping)."""
    kwargs = dict(inp.kwargs)
    ours_params, theirs_params = _model_params(dtype, 0), _model_params(dtype, 0)
    if isinstance(kwargs.get("lr"), torch.Tensor):
        lr = kwargs.pop("lr")
        ours = FUSED[info.optim_cls](ours_params, lr=lr.clone(), **kwargs)
        theirs = info.optim_cls(theirs_params, lr=lr.clone(), fused=True, **kwargs)
    else:
        ours = FUSED[info.optim_cls](ours_params, **kwargs)
        theirs = info.optim_cls(theirs_params, fused=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        for a, b in zip(ours_params, theirs_params):
            g = torch.randn(a.shape, generator=gen, dtype=torch.float64).to(dtype)
            a.grad, b.grad = g.clone(), g.clone()
        theirs.step()
        ours.step()
    for a, b in zip(ours_params, theirs_params):
        assert torch.equal(a, b)
        for key, value in theirs.state[b].items():
            assert torch.equal(ours.state[a][key].cpu(), value.cpu()), key
    # The same param groups as torch's but for the flag that chose its kernel.
    theirs_groups = [{**g, "fused": None} for g in theirs.state_dict()["param_groups"]]
    assert ours.state_dict()["param_groups"] == theirs_groups
