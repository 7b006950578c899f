"""fusedclip inside the frameworks people train with: Hugging Face transformers'
Trainer, Lightning and accelerate (docs/FRAMEWORKS.md, fusedclip/integrations/).

Each test runs a real, tiny training loop inside its framework on the CPU (a
few optimizer steps) and is skipped when the framework is not importable.
The recipes must give:

- one clip: the gradients the optimizer sees are the raw ones, so its
  ``clip_stats["grad_norm"]`` equals the norm of the gradients measured
  independently (in float64, from a hook that runs after the last backward
  and before the step) while its clip coefficient is < 1;
- the true pre-clip norm logged (Trainer's ``grad_norm``, the Lightning
  callback's ``grad_norm``);
- no extra pass: no call of the framework's clip functions (spied on);
- ``clip_stats`` reachable through the framework's optimizer wrapper.

And where the framework clips too, the tests measure what that does (the
optimizer reports the framework's clipped norm) and check the warning.

Tolerance for norms: rtol 1e-5. fusedclip measures a float32 norm (chunk sums
combined in double); the reference sums the same float32 gradients in
float64, so the two differ by float32 rounding (~1e-7 relative) only; a norm
taken after a clip to max_norm differs from the raw one by far more (>5%
in every case here: the raw norms are checked to be at least 1.05x the
framework's max_norm).
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch

import fusedclip
from fusedclip.integrations import (
    FrameworkClipWarning, clip_stats, unwrap_optimizer,
)

RTOL = 1e-5
STEPS = 3


def true_norm(params) -> float:
    """The global L2 norm of the gradients, summed in float64."""
    grads = [p.grad.detach().double().flatten() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.cat(grads)).item()


class Spy:
    """Replaces ``owner.name`` with a wrapper that counts calls and records
    their ``max_norm`` argument and the norm the call returned."""

    def __init__(self, monkeypatch, owner, name: str) -> None:
        self.calls: list[tuple] = []
        original = getattr(owner, name)

        def spy(*args, **kwargs):
            result = original(*args, **kwargs)
            max_norm = kwargs.get("max_norm", args[1] if len(args) > 1 else None)
            self.calls.append((max_norm, None if result is None else float(result)))
            return result

        monkeypatch.setattr(owner, name, spy)


def spy_torch_clips(monkeypatch) -> list[Spy]:
    """Spies on torch's clip functions, which every framework's clip ends in."""
    return [Spy(monkeypatch, torch.nn.utils, "clip_grad_norm_"),
            Spy(monkeypatch, torch.nn.utils, "clip_grad_value_")]


def test_integrations_import_no_framework():
    code = ("import sys, fusedclip, fusedclip.integrations, fusedclip.integrations.accelerate\n"
            "bad = [m for m in ('transformers', 'accelerate', 'lightning', 'pytorch_lightning')"
            " if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_clip_stats_refuses_other_optimizers():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    assert unwrap_optimizer(opt) is opt
    with pytest.raises(TypeError, match="not a fusedclip optimizer"):
        clip_stats(opt)


# -- transformers' Trainer --------------------------------------------------------
@pytest.fixture
def hf():
    """Skips a Trainer test when transformers (or accelerate, which Trainer needs)
    is not importable."""
    pytest.importorskip("accelerate")
    return pytest.importorskip("transformers")


def tiny_gpt2():
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, 128, (32, 16), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    return model, data


def trainer_args(tmp_path, **kwargs):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4,
        logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, **kwargs)


def norm_recorder():
    """A TrainerCallback recording, per optimizer step, the raw gradient norm
    just before the step and the optimizer's clip_stats just after it."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.before, self.stats, self.wrappers = [], [], []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.before.append(true_norm(model.parameters()))

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            # Trainer hands callbacks accelerate's AcceleratedOptimizer (item 12).
            self.wrappers.append(type(optimizer).__name__)
            stats = clip_stats(optimizer)
            assert stats is unwrap_optimizer(optimizer).clip_stats
            assert stats is optimizer.optimizer.clip_stats
            self.stats.append({k: v.clone() for k, v in stats.items()})

    return Recorder()


def test_trainer_default_clips_twice(hf, tmp_path, monkeypatch):
    """Trainer's defaults (max_grad_norm=1.0) in front of FusedClipAdamW(clip=0.5):
    Trainer clips first, and the optimizer reports Trainer's clipped norm."""
    from transformers import Trainer

    from fusedclip.integrations.transformers import FusedClipCallback

    model, data = tiny_gpt2()
    opt = fusedclip.FusedClipAdamW(model.parameters(), lr=1e-3, clip=0.5)
    recorder = norm_recorder()
    trainer = Trainer(model=model, args=trainer_args(tmp_path), train_dataset=data,
                      optimizers=(opt, None), callbacks=[recorder, FusedClipCallback()])
    assert trainer.args.max_grad_norm == 1.0  # the default
    clip = Spy(monkeypatch, trainer.accelerator, "clip_grad_norm_")
    with pytest.warns(FrameworkClipWarning, match=r"max_grad_norm=1\.0.*clipped twice") as record:
        trainer.train()
    # Once from the callback at the start, once from the optimizer's own first
    # step (fusedclip.integrations.check_caller_clipping).
    assert len([w for w in record if w.category is FrameworkClipWarning]) >= 2

    assert [max_norm for max_norm, _ in clip.calls] == [1.0] * STEPS
    raw = [norm for _, norm in clip.calls]   # clip_grad_norm_ returns the pre-clip norm
    assert min(raw) > 1.05, raw              # so that Trainer's clip changes them
    reported = [s["grad_norm"].item() for s in recorder.stats]
    # What the optimizer measured is Trainer's clipped norm, 1.0, not the true one.
    assert reported == pytest.approx([1.0] * STEPS, rel=RTOL)
    assert recorder.before == pytest.approx(reported, rel=RTOL)
    # Trainer's log still has the true norm: the two disagree.
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert logged == pytest.approx(raw, rel=RTOL)


@pytest.mark.parametrize("adapter", [False, True], ids=["settings-only", "prepare_trainer"])
def test_trainer_recipe(hf, tmp_path, monkeypatch, adapter):
    """max_grad_norm=0 (+ prepare_trainer): one clip, by the optimizer, and Trainer
    logs the true pre-clip norm. Without prepare_trainer, transformers 5.x still
    measures the norm with clip_grad_norm_(params, inf) every step; with it,
    nothing but the optimizer touches the gradients."""
    from transformers import Trainer

    from fusedclip.integrations.transformers import prepare_trainer

    model, data = tiny_gpt2()
    recorder = norm_recorder()
    trainer = Trainer(
        model=model, args=trainer_args(tmp_path, max_grad_norm=0, gradient_accumulation_steps=2),
        train_dataset=data, callbacks=[recorder],
        optimizer_cls_and_kwargs=(fusedclip.FusedClipAdamW, {"lr": 1e-3, "clip": 0.5}))
    if adapter:
        assert prepare_trainer(trainer) is trainer
    accelerator_clip = Spy(monkeypatch, trainer.accelerator, "clip_grad_norm_")
    torch_clips = spy_torch_clips(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrameworkClipWarning)
        trainer.train()

    assert recorder.wrappers == ["AcceleratedOptimizer"] * STEPS
    assert isinstance(unwrap_optimizer(trainer.optimizer), fusedclip.FusedClipAdamW)
    reported = [s["grad_norm"].item() for s in recorder.stats]
    assert reported == pytest.approx(recorder.before, rel=RTOL)
    assert min(reported) > 0.5 * 1.05                       # the optimizer did clip:
    assert all(s["clip_coef"].item() < 0.96 for s in recorder.stats)
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert logged == pytest.approx(reported, rel=RTOL)

    extra = [call for spy in torch_clips for call in spy.calls]
    if adapter:
        assert accelerator_clip.calls == [] and extra == []
    elif hasattr(Trainer, "_get_grad_norm"):   # transformers 5.x: the extra pass
        assert [max_norm for max_norm, _ in accelerator_clip.calls] == [math.inf] * STEPS


def test_trainer_prepare_warns_when_trainer_clips(hf, tmp_path):
    from transformers import Trainer

    from fusedclip.integrations.transformers import prepare_trainer

    model, data = tiny_gpt2()
    opt = fusedclip.FusedClipAdamW(model.parameters(), lr=1e-3, clip=0.5)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_grad_norm=0.3),
                      train_dataset=data, optimizers=(opt, None))
    with pytest.warns(FrameworkClipWarning, match=r"max_grad_norm=0\.3.*max_grad_norm=0\)"):
        prepare_trainer(trainer)
    # Without a clip policy Trainer's clip is the only one; the warning says how to fuse it.
    model, data = tiny_gpt2()
    trainer = Trainer(model=model, args=trainer_args(tmp_path), train_dataset=data,
                      optimizers=(fusedclip.FusedClipAdamW(model.parameters()), None))
    with pytest.warns(FrameworkClipWarning, match="pass of its own"):
        prepare_trainer(trainer)


# -- Lightning --------------------------------------------------------------------
def lightning_run(tmp_path, monkeypatch, gradient_clip_val=None, precision="32-true",
                  clip=0.5, steps=STEPS):
    L = pytest.importorskip("lightning.pytorch")
    from fusedclip.integrations.lightning import FusedClipCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                           torch.nn.Linear(32, 1))
            self.before, self.stats = [], []

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = fusedclip.FusedClipAdamW(self.parameters(), lr=1e-2, clip=clip)
            return opt

        def on_before_optimizer_step(self, optimizer):
            # After the backward, before Lightning's own clip and the step.
            self.before.append(true_norm(self.parameters()))

        def on_train_batch_end(self, outputs, batch, batch_idx):
            opt = self.optimizers()          # a LightningOptimizer
            assert type(opt).__name__ == "LightningFusedClipAdamW"
            assert opt.clip_stats is clip_stats(opt) is unwrap_optimizer(opt).clip_stats
            self.stats.append({k: v.clone() for k, v in opt.clip_stats.items()})

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16 * steps, 16, generator=gen), 3 * torch.randn(16 * steps, 1, generator=gen)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    spies = spy_torch_clips(monkeypatch)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, gradient_clip_val=gradient_clip_val,
        precision=precision, callbacks=[FusedClipCallback()], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module = Module()
    trainer.fit(module, loader)
    return trainer, module, [call for spy in spies for call in spy.calls]


def test_lightning_recipe(tmp_path, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrameworkClipWarning)
        trainer, module, clip_calls = lightning_run(tmp_path, monkeypatch)
    assert clip_calls == []                  # Lightning's default clips nothing
    reported = [s["grad_norm"].item() for s in module.stats]
    assert len(reported) == STEPS
    assert reported == pytest.approx(module.before, rel=RTOL)
    assert min(reported) > 0.5 * 1.05 and all(s["clip_coef"].item() < 0.96 for s in module.stats)
    # FusedClipCallback logged the last step's pre-clip norm.
    assert trainer.callback_metrics["grad_norm"].item() == pytest.approx(reported[-1], rel=RTOL)


def test_lightning_gradient_clip_val_clips_twice(tmp_path, monkeypatch):
    with pytest.warns(FrameworkClipWarning, match=r"gradient_clip_val=0\.1.*clipped twice"):
        trainer, module, clip_calls = lightning_run(tmp_path, monkeypatch, gradient_clip_val=0.1)
    assert [max_norm for max_norm, _ in clip_calls] == [0.1] * STEPS
    assert min(module.before) > 0.1 * 1.05
    # The optimizer measured Lightning's clipped norm, 0.1, not the true one.
    reported = [s["grad_norm"].item() for s in module.stats]
    assert reported == pytest.approx([0.1] * STEPS, rel=RTOL)


def test_lightning_mixed_precision(tmp_path, monkeypatch):
    """Under a mixed precision ("bf16-mixed" here; "16-mixed" takes the same
    check, MixedPrecision.clip_gradients) Lightning refuses its own clip for a
    fusedclip optimizer, as for torch's fused ones (it unscales inside its
    step); the optimizer's own clip works."""
    pytest.importorskip("lightning.pytorch")
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        with pytest.warns(FrameworkClipWarning):
            lightning_run(tmp_path, monkeypatch, gradient_clip_val=0.1,
                          precision="bf16-mixed", steps=1)
    trainer, module, clip_calls = lightning_run(tmp_path, monkeypatch, precision="bf16-mixed")
    assert clip_calls == []
    reported = [s["grad_norm"].item() for s in module.stats]
    assert reported == pytest.approx(module.before, rel=RTOL)  # float32 gradients
    assert min(reported) > 0.5 * 1.05


# -- accelerate -----------------------------------------------------------------------
@pytest.fixture
def accelerator_factory():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    def make(**kwargs):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return accelerate.Accelerator(cpu=True, **kwargs)

    yield make
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def accelerate_loop(accelerator, clip_norm=None, steps=STEPS, accumulation=1):
    """A plain accelerate loop with FusedClipAdamW(clip=0.5); returns the raw norms
    before each optimizer step and the optimizer's clip_stats after it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = fusedclip.FusedClipAdamW(model.parameters(), lr=1e-2, clip=0.5)
    gen = torch.Generator().manual_seed(1)
    n = 8 * steps * accumulation
    data = torch.utils.data.TensorDataset(torch.randn(n, 16, generator=gen),
                                          3 * torch.randn(n, 1, generator=gen))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    before, stats = [], []
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
            if accelerator.sync_gradients:
                before.append(true_norm(model.parameters()))
                if clip_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), clip_norm)
            opt.step()
            opt.zero_grad()
            if accelerator.sync_gradients:
                stats.append({k: v.clone() for k, v in clip_stats(opt).items()})
    return opt, before, stats


def test_accelerate_recipe(accelerator_factory, monkeypatch):
    from fusedclip.integrations.accelerate import watch_accelerator

    accelerator = watch_accelerator(accelerator_factory(gradient_accumulation_steps=2))
    spies = spy_torch_clips(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrameworkClipWarning)
        opt, before, stats = accelerate_loop(accelerator, accumulation=2)
    assert type(opt).__name__ == "AcceleratedOptimizer"
    assert not hasattr(opt, "clip_stats") or opt.clip_stats is clip_stats(opt)
    assert opt.optimizer.clip_stats is clip_stats(opt)
    assert [call for spy in spies for call in spy.calls] == []
    assert len(stats) == STEPS
    reported = [s["grad_norm"].item() for s in stats]
    assert reported == pytest.approx(before, rel=RTOL)
    assert min(reported) > 0.5 * 1.05 and all(s["clip_coef"].item() < 0.96 for s in stats)


def test_accelerate_clip_call_clips_twice(accelerator_factory, monkeypatch):
    from fusedclip.integrations.accelerate import watch_accelerator

    accelerator = watch_accelerator(accelerator_factory())
    spies = spy_torch_clips(monkeypatch)
    with pytest.warns(FrameworkClipWarning, match=r"max_norm=0\.1.*clipped twice") as record:
        _, before, stats = accelerate_loop(accelerator, clip_norm=0.1)
    assert len([w for w in record if w.category is FrameworkClipWarning]) == 1  # once
    assert [max_norm for max_norm, _ in spies[0].calls] == [0.1] * STEPS
    assert min(before) > 0.1 * 1.05
    assert [s["grad_norm"].item() for s in stats] == pytest.approx([0.1] * STEPS, rel=RTOL)
    # A measurement (max_norm=inf) is not a clip: no warning.
    accelerator = watch_accelerator(accelerator_factory())
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrameworkClipWarning)
        accelerate_loop(accelerator, clip_norm=math.inf, steps=1)
