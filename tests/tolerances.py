"""Comparison tolerances, per dtype, stated once for the whole suite.

Each entry is ``(rtol, atol_scale)``: two tensors agree when, element by element,
``|actual - expected| <= atol + rtol * |expected|`` with
``atol = atol_scale * scale``, where ``scale`` is the largest |value| of that
quantity (parameters, exp_avg, exp_avg_sq, ...) over all parameters of the run
(see helpers.assert_states_close). The absolute part is thus normwise: an
element whose first moment has cancelled to near zero is judged against the
size of the terms it was summed from, while a bug still shows as an error of the
quantity's own size.

Never loosen one of these to make a test pass: a failure is a bug, or a rounding
path that differs from the ones described here, and either needs explaining.
(The largest error seen over the suite's seeds, as a fraction of each
tolerance, is noted in brackets.)
"""

from __future__ import annotations

import torch

# -- fused optimizer vs torch.optim.Adam/AdamW + clip_grad_norm_ ----------------------------
TORCH_PARITY = {
    # Trajectories of 10-14 steps. Both sides evaluate the same float64 formulas
    # in the same order; they differ where the global norm is summed in another
    # order (so the clip coefficient may differ in its last bits) and where the
    # compiler contracts a*b+c into an fma. A few ulps (2.2e-16) per step.
    # [< 0.1%]
    torch.float64: (1e-12, 1e-12),
    # The same two differences in float32 (ulp 1.2e-7): a dozen steps of them
    # stay within a few 1e-6. [~25%]
    torch.float32: (2e-6, 2e-6),
    # bfloat16 (eps 2^-7) and float16 (eps 2^-10) are compared one step at a
    # time from the same state (test_adam_parity.run_parity says why). In one
    # step torch rounds every intermediate to the storage dtype: clip_grad_norm_
    # returns a bfloat16 norm and multiplies the gradients by a bfloat16
    # coefficient (up to an ulp off the float32 product fusedclip uses), v is
    # rounded after v * beta2 and again after + (1 - beta2) g^2 (g^2 doubles
    # the gradient's error), sqrt(v) / bc2 + eps three times, the decayed weight
    # before the update is added. fusedclip computes in float32 and rounds once.
    # That is up to about 3 ulps of v, fewer of m and of the parameters.
    # [~40-60%]
    torch.bfloat16: (3 * 2**-7, 3 * 2**-7),
    torch.float16: (3 * 2**-10, 3 * 2**-10),
}

# -- fused optimizer vs the float64 reference (fusedclip/reference.py) ---------------------
REFERENCE = {
    # The same formula in float64 in another order (m by lerp, step size folded,
    # fma): a few ulps per step. [< 0.1%]
    torch.float64: (1e-12, 1e-12),
    # float32 arithmetic against float64: every stored value carries its own
    # float32 rounding (ulp 1.2e-7), carried from step to step; a dozen steps
    # stay within a few 1e-6. [~10%]
    torch.float32: (2e-6, 2e-6),
    # With round_to=bfloat16 the reference stores what fusedclip stores after
    # every step: both round the same value, computed in float64 there and in
    # float32 here, so the stored results differ only where that value lies
    # within float32 rounding of a bfloat16 rounding boundary: one bfloat16 ulp,
    # now and then. [~25%]
    torch.bfloat16: (2**-7, 2**-7),
    # float16, as for bfloat16: one float16 ulp now and then. [~45%]
    torch.float16: (2**-10, 2**-10),
}

# -- one op, two element loops (tests/test_ops.py) ------------------------------------------
TRANSFORM_PATHS = {
    # An op given clip_value or unit_coefs against the same op on gradients
    # clamped or scaled beforehand, one step from the same state. The
    # arithmetic differs in one rounding: here the coefficient and 1/grad_scale
    # fold into one multiplier (per unit, in double) that multiplies the
    # gradient once, there the gradient was scaled before the op: an ulp or two
    # of a stored value. (The kernels are built without fp contraction since
    # issue 10, which removed the other cause this tolerance once covered.)
    # [<= 25%]
    torch.float64: (4 * 2**-52, 4 * 2**-52),
    torch.float32: (4 * 2**-23, 4 * 2**-23),
    # In bfloat16 and float16 that float32 difference moves a stored value
    # across a rounding boundary now and then: one ulp of the storage dtype.
    torch.bfloat16: (2**-7, 2**-7),
    torch.float16: (2**-10, 2**-10),
}

# -- CUDA kernels vs CPU kernels (tests/test_cuda.py, CUDA runs of tests/registry.py) --------
CUDA_VS_CPU = {
    # Both evaluate the same functions of include/fusedclip/ (adam.h), in the
    # same math type, with every fused multiply-add written out (-ffp-contract=off,
    # nvcc --fmad=false), and round once per stored value. They differ where
    # the global norm is summed in another order (so the clip coefficient may
    # differ in its last bits), where the CPU's scalar tail rounds as torch's
    # scalar code does (SCALAR_TAIL) and where CUDA's pow/sqrt differ from
    # glibc's in the last bit: within TORCH_PARITY for float64 and float32.
    torch.float64: TORCH_PARITY[torch.float64],
    torch.float32: TORCH_PARITY[torch.float32],
    # In bfloat16 and float16 those float32 differences move a stored value
    # across a rounding boundary now and then: one ulp of the storage dtype, as
    # against the rounded reference (REFERENCE). [not yet measured on a GPU]
    torch.bfloat16: (2**-7, 2**-7),
    torch.float16: (2**-10, 2**-10),
}

# -- fusedclip.ops.multi_tensor_norm vs torch.linalg.vector_norm in float64 ----------------
NORM = {
    # float64 inputs are summed in float64: ulp 2.2e-16 times a few levels of
    # summation. [~5%]
    torch.float64: (1e-13, 0.0),
    # Every other dtype is squared and summed in float32 lanes (16 lanes with
    # AVX-512, 8 with AVX2, x 4 accumulators, per norm chunk of 256 KiB: 65536
    # float32 or 131072 bfloat16/float16 elements, two vectors a step for
    # those; so at most 2048 terms a lane), the lanes and chunks in float64,
    # and the norm returned in float32. The error of a float32 sum of k
    # positive terms is bounded by k * 6e-8 (1.2e-4 here) and is about
    # sqrt(k) * 6e-8 (~3e-6) for random terms; measured up to 1e-6 (bfloat16,
    # a million elements; float32: 1e-7). [~10%]
    torch.float32: (1e-5, 0.0),
    torch.bfloat16: (1e-5, 0.0),
    torch.float16: (1e-5, 0.0),
}

# -- fusedclip's global norm vs the norm torch computes in the gradients' dtype -------------
# (clip_grad_norm_'s return value, torch.linalg.vector_norm(t)).
TORCH_NORM = {
    # Both are float64 sums, in different orders.
    torch.float64: NORM[torch.float64],
    # Both are float32 sums, in different orders: each within NORM of the exact value.
    torch.float32: NORM[torch.float32],
    # torch accumulates in float32 too and rounds the result to the gradients'
    # dtype; fusedclip keeps float32. Rounded alike they may differ by the one
    # ulp of a rounding boundary between them.
    torch.bfloat16: (2**-7, 0.0),
    torch.float16: (2**-10, 0.0),
}

# Dtypes of the norm's result for each gradient dtype.
NORM_OUT_DTYPE = {
    torch.float64: torch.float64,
    torch.float32: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float16: torch.float32,
}
