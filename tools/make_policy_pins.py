"""Produced the pinned zclip 1.0.0 / pytorch_optimizer 4.1.0 values of tests/test_policies.py.

Not a test and not run by CI. Usage: pip install --target /tmp/ext zclip==1.0.0
pytorch_optimizer==4.1.0 --no-deps; then from the repository root:
PYTHONPATH=.:/tmp/ext python tools/make_policy_pins.py pins   (the pinned lists, as test_policies.py holds them)
PYTHONPATH=.:/tmp/ext python tools/make_policy_pins.py        (both runs step by step, against fusedclip)
"""
import sys, torch
sys.path.insert(0, "/tmp/ext")
import zclip, pytorch_optimizer
import fusedclip

SHAPES = [(5, 7), (3,), (4, 4)]
FACTORS = [1.0, 1.3, 0.8, 1.1, 6.0, 1.0, 0.9, 3.0, 1.2, 1.0, 12.0, 0.7]

def params(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in SHAPES]

def grads(step, dtype):
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * FACTORS[step]).to(dtype) for s in SHAPES]

class M(torch.nn.Module):
    def __init__(self, ps):
        super().__init__(); self.ps = torch.nn.ParameterList(ps)

def run_zclip(dtype, kw, steps=12):
    ps = params(dtype); m = M(ps)
    zkw = dict(kw); zkw["max_grad_norm"] = zkw.pop("max_norm", 1.0)
    z = zclip.ZClip(**zkw); opt = torch.optim.Adam(ps, lr=0.01)
    fps = params(dtype); fopt = fusedclip.FusedClipAdam(fps, lr=0.01, clip=fusedclip.ZClip(**kw))
    out = []
    for s in range(steps):
        gs = grads(s, dtype)
        for p, g in zip(ps, gs): p.grad = g.clone()
        for p, g in zip(fps, gs): p.grad = g.clone()
        z.step(m); opt.step(); fopt.step()
        out.append((z.mean, z.var, float(ps[0][0, 0]), float(ps[1][2])))
        err = max(float((a - b).abs().max()) for a, b in zip(ps, fps))
        st = fopt._policy_state
        print(s, "zclip mean/var", z.mean, z.var, "fused", float(st["mean"]), float(st["var"]), "max param diff", err)
    return out

def run_adagc(dtype, kw, steps=12):
    ps = params(dtype)
    opt = pytorch_optimizer.AdaGC(ps, lr=0.01, weight_decay=0.0, **kw)
    fps = params(dtype); fopt = fusedclip.FusedClipAdam(fps, lr=0.01, eps=kw.get("eps", 1e-8), clip=fusedclip.AdaGC(**kw))
    out = []
    for s in range(steps):
        gs = grads(s, dtype)
        for p, g in zip(ps, gs): p.grad = g.clone()
        for p, g in zip(fps, gs): p.grad = g.clone()
        opt.step(); fopt.step()
        gam = [float(opt.state[p]["gamma"]) for p in ps]
        fgam = [float(fopt._policy_tensor_state[p]["gamma"]) for p in fps]
        err = max(float((a - b).abs().max()) for a, b in zip(ps, fps))
        print(s, "gamma", gam, "fused", fgam, "max param diff", err)
        out.append((gam, float(ps[0][0, 0]), float(ps[1][2])))
    return out

def compare():
    for dtype in (torch.float32, torch.float64):
        print("== zclip", dtype)
        run_zclip(dtype, dict(alpha=0.8, z_thresh=1.5, max_norm=20.0, warmup_steps=3))
        print("== adagc", dtype)
        run_adagc(dtype, dict(beta=0.9, lambda_abs=3.0, lambda_rel=1.05, warmup_steps=4))

def pins():
    torch.set_printoptions(precision=17)
    import io, contextlib
    with contextlib.redirect_stdout(io.StringIO()):
        zc = run_zclip(torch.float64, dict(alpha=0.8, z_thresh=1.5, max_norm=20.0, warmup_steps=3))
        zc2 = run_zclip(torch.float64, dict(alpha=0.9, z_thresh=1.0, max_norm=None, warmup_steps=2, mode="percentile"))
        ag = run_adagc(torch.float32, dict(beta=0.9, lambda_abs=3.0, lambda_rel=1.05, warmup_steps=4))
    print("ZCLIP_A =", [(m, v) for m, v, _, _ in zc], "\nZCLIP_A_PARAMS =", [(a, b) for _, _, a, b in zc])
    print("ZCLIP_B =", [(m, v) for m, v, _, _ in zc2], "\nZCLIP_B_PARAMS =", [(a, b) for _, _, a, b in zc2])
    print("ADAGC_GAMMA =", [g for g, _, _ in ag], "\nADAGC_PARAMS =", [(a, b) for _, a, b in ag])


if __name__ == "__main__":
    pins() if sys.argv[1:] == ["pins"] else compare()
