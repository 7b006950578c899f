"""Docstring pieces every fused optimizer shares: its docstring puts them in
at "{clip_arg}", "{impl_args}" and "{clip_stats}"."""

# The optimizer-wide arguments (`clip`, `norm_group`, `nonfinite`), as every
# optimizer's docstring states them at "{clip_arg}".
CLIP_ARG_DOC = """        clip (None, float or ClipPolicy, optional): gradient clipping fused into
            the step: ``None`` for none, a float for the global L2 norm with that
            ``max_norm`` (exactly ``clip_grad_norm_``), or a policy such as
            ``fusedclip.GlobalNorm(max_norm, norm_type=inf)``,
            ``fusedclip.ValueClip(clip_value)`` (``clip_grad_value_``) or
            ``fusedclip.AGC(clip_factor)`` (per-unit adaptive clipping). One
            global norm covers all parameter groups; ``opt.clip`` reads or
            replaces the policy. (default: None)
        norm_group (ProcessGroup or 1-D DeviceMesh, optional): keyword-only;
            for an optimizer that holds only part of the model (ZeRO's
            per-rank optimizer, a pipeline stage): the clip norm is summed over
            this group's members, so every one of them clips by the whole
            model's norm and skips together. DTensor parameters (FSDP2, tensor
            parallel) need none: their norms are reduced over their mesh.
            (default: None)
        nonfinite (str, optional): what a step whose gradients hold inf or nan
            does: ``"skip"`` changes no parameter and no state (step counts,
            momentum buffers and the policy's state included) and counts it in
            ``clip_stats["skipped"]``; ``"raise"`` raises before anything
            changes (and so reads one flag on the host); ``"propagate"`` lets
            inf/nan flow into the update as torch.optim does. Under
            ``torch.amp.GradScaler`` a step the scaler finds inf in is always
            skipped. (default: "skip")
"""
# torch's implementation flags, as every optimizer's docstring states them.
IMPL_ARGS_DOC = """        foreach, fused (bool, optional): accepted for torch.optim's signature and
            kept in the param groups; the step is always one fused multi-tensor
            op, so they change nothing. ``foreach=True`` with ``fused=True`` is
            refused as torch refuses it. (default: None)
        differentiable (bool, optional): must be False: the fused step is not
            differentiable (torch's fused optimizers refuse it too). (default: False)
"""
CAPTURABLE_ARG_DOC = """        capturable (bool, optional): accepted and kept; the step is always
            capturable in a CUDA graph (no host sync, step counters on the
            parameter's device), whatever its value. (default: False)
"""
CLIP_STATS_DOC = """    ``opt.clip_stats`` holds device tensors under the same keys from the
    optimizer's construction on: ``grad_norm`` (the pre-clip global norm of the
    last step; NaN before the first step and where no norm was measured, that
    is with ``nonfinite="propagate"`` and a policy that needs none),
    ``clip_coef`` (the last step's coefficient: 1 before the first step and
    without clipping; one per tensor or per unit for such policies) and
    ``skipped`` (the number of skipped steps); per-tensor policies add
    ``tensor_norms``. Reading them is the caller's host sync. A run that skips
    ``warn_after_skips`` (10) steps in a row warns at ``zero_grad()`` (see
    ``FusedClipOptimizer``).
"""
# The mixed-precision options (fusedclip.optim.precision), keyword-only and
# per param group, as every optimizer's docstring states them before "{clip_arg}".
PRECISION_ARG_DOC = """        master_weights (bool, optional): keyword-only; for bfloat16/float16
            parameters, a float32 copy in the state (``"master_param"``), made
            from the parameter at its first step: the step reads and writes the
            master and writes the parameter rounded to nearest, in the same
            pass (Micikevicius et al., 2018). float32/float64 parameters have
            none. The floating state is then float32 unless ``state_dtype``
            says otherwise. (default: False)
        store_param_remainders (bool, optional): keyword-only; with
            ``master_weights`` and bfloat16 parameters, keep only the low 16
            bits of the float32 master (``"param_remainder"``, int16): the
            parameter (rounded to nearest, ties away from zero) and its
            remainder are the master exactly, at 2 bytes per parameter instead
            of 4; bit for bit the run with a full master. Refused for float16
            parameters. (default: False)
        state_dtype (torch.dtype, optional): keyword-only; the dtype of the
            floating state buffers (float32, bfloat16, float16; float64 only
            with float64 parameters). None: the parameter's dtype (float32
            under ``master_weights``). The math stays float32; only what is
            stored changes (Zamirai et al., 2020). (default: None)
        stochastic_rounding (bool, optional): keyword-only; every bfloat16 or
            float16 value the step writes from float32 math (a parameter
            without a master, low-precision state) is rounded stochastically,
            so that its expectation is the float32 value (Gupta et al., 2015;
            Zamirai et al., 2020). The random bits are a function of a seed,
            a counter, the tensor and the element (``"sr_generator"``: int64
            ``[seed, counter]`` per parameter, the seed drawn from torch's
            default generator, on the parameter's device): the same
            ``torch.manual_seed`` gives the same run whatever the thread count.
            (default: False)
"""
PRECISION_REFERENCES = """        Micikevicius, Narang, Alben, Diamos, Elsen, Garcia, Ginsburg, Houston,
        Kuchaiev, Venkatesh & Wu, *Mixed Precision Training*, ICLR 2018
        (master weights).
        Gupta, Agrawal, Gopalakrishnan & Narayanan, *Deep Learning with Limited
        Numerical Precision*, ICML 2015 (stochastic rounding).
        Zamirai, Zhang, Aberger & De Sa, *Revisiting BFloat16 Training*,
        arXiv:2010.06192, 2020 (bfloat16 state, stochastic rounding).
"""
