"""fp4compile.optim.AdamW: FP8/FP16 moments against torch.optim.AdamW, and exact save/load/resume."""

import io

import pytest
import torch

from fp4compile.optim import AdamW, decode, encode

HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def test_state_is_stored_in_fp8_and_fp16():
    w = torch.nn.Parameter(torch.randn(16, 8))
    opt = AdamW([w], **HP)
    w.grad = torch.randn_like(w)
    opt.step()
    state = opt.state[w]
    assert state["exp_avg"].dtype == torch.float8_e4m3fn and state["exp_avg_sq"].dtype == torch.float16
    assert state["exp_avg_scale"].dtype == state["exp_avg_sq_scale"].dtype == torch.float32


@pytest.mark.parametrize("dtype, top", [(torch.float8_e4m3fn, 448.0), (torch.float16, 2.0**15)])
def test_encode_error_bound(dtype, top):
    """Relative error <= 2^-(mantissa bits + 1) in the normal range, absolute <= half the subnormal step
    times the scale below it."""
    x = torch.randn(10000) * torch.logspace(-12, 0, 10000)
    data, scale = encode(x, dtype, top)
    info = torch.finfo(dtype)
    half_ulp = info.eps / 2
    bound = torch.maximum(x.abs() * half_ulp, info.smallest_normal * info.eps / 2 * scale)
    assert bool(((decode(data, scale) - x).abs() <= bound).all())


def test_first_step_matches_adamw_within_storage_error():
    """After one step m = (1 - b1) g and v = (1 - b2) g^2 exactly in FP32; storing m in E4M3 changes each
    update by at most 2^-4 relative (plus E4M3's subnormal step near 0), v in FP16 by 2^-11 (sqrt halves
    it), so |dp - dp_ref| <= lr * (2^-4 |m_hat| + 2^-10 s_m / (1 - b1)) / (sqrt(v_hat) + eps) * (1 + 2^-11)."""
    torch.manual_seed(0)
    w0, g = torch.randn(256, 64), torch.randn(256, 64) * torch.logspace(-3, 0, 64)
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    for p, opt in ((ours, AdamW([ours], **HP)), (ref, torch.optim.AdamW([ref], **HP))):
        p.grad = g.clone()
        opt.step()
    b1, b2 = HP["betas"]
    m_hat, v_hat = g, g * g  # bias-corrected first-step moments
    s_m = ((1 - b1) * g).abs().max() / 448
    bound = HP["lr"] * (2**-4 * m_hat.abs() + 2**-10 * s_m / (1 - b1)) / (v_hat.sqrt() + HP["eps"]) * (1 + 2**-11)
    assert bool(((ours - ref).abs() <= bound + 1e-7).all())


def test_training_follows_adamw():
    """A least-squares problem: 200 steps reach nearly AdamW's loss (FP8 moments add noise, not bias)."""
    torch.manual_seed(0)
    a, b = torch.randn(512, 32), torch.randn(512, 4)
    losses = {}
    for name, cls in (("fp8", AdamW), ("ref", torch.optim.AdamW)):
        w = torch.nn.Parameter(torch.zeros(32, 4))
        opt = cls([w], lr=1e-2, weight_decay=0.0)
        for _ in range(200):
            loss = ((a @ w - b) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[name] = loss.item()
    assert losses["fp8"] <= losses["ref"] * 1.02, losses


def _train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 16, generator=gen).to(model[0].weight.dtype)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_resume_is_exact(dtype):
    """State survives torch.save/torch.load bit for bit (also for BF16 parameters, whose dtype the base
    class would otherwise cast the moments to), and a resumed run gives the uninterrupted run's losses."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(dtype)
    opt = AdamW(model.parameters(), **HP)
    _train(model, opt, 5, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    uninterrupted = _train(model, opt, 5, seed=2)

    buf.seek(0)
    saved = torch.load(buf)
    resumed_model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(dtype)
    resumed_model.load_state_dict(saved["model"])
    resumed_opt = AdamW(resumed_model.parameters(), **HP)
    resumed_opt.load_state_dict(saved["opt"])
    for key, value in saved["opt"]["state"][0].items():
        got = resumed_opt.state[next(resumed_model.parameters())][key]
        assert got.dtype == value.dtype and torch.equal(got.reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), key
    assert _train(resumed_model, resumed_opt, 5, seed=2) == uninterrupted


def test_bad_arguments():
    with pytest.raises(ValueError, match="betas"):
        AdamW([torch.nn.Parameter(torch.ones(1))], betas=(1.0, 0.9))
