"""AdamW with low-precision optimizer states, as in the paper's mixed-precision framework (MS-AMP style).

The first moment is stored in FP8 (E4M3) and the second moment in FP16, each with one FP32 scale per
tensor: 1 + 2 bytes of state per parameter instead of AdamW's 8. Each step decodes both moments to FP32,
applies the usual AdamW update to the parameter (master weights stay in the parameter's own dtype), and
encodes them again.

Why the scales: E4M3 keeps 3 mantissa bits over 2^-9..448, FP16 10 bits over 2^-24..65504; the second
moment is a squared gradient (1e-12 is common), far below FP16's range unless scaled. The scale maps a
tensor's largest |moment| onto the top of the format (amax / 448, amax / 2^15): entries near the top keep
the format's relative precision (2^-4 for E4M3, 2^-11 for FP16), entries far below it fall into the
subnormals and keep an absolute precision of 2^-10 resp. 2^-25 times the scale.
"""

import torch

from fp4compile.runtime.formats import E4M3_MAX

FP16_TOP = 2.0**15  # leaves FP16 headroom above the largest entry of the previous step

# (state key, storage dtype, value the tensor's amax is mapped to)
_MOMENTS = (("exp_avg", torch.float8_e4m3fn, E4M3_MAX), ("exp_avg_sq", torch.float16, FP16_TOP))


def encode(x: torch.Tensor, dtype: torch.dtype, top: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (FP32) -> (x / scale in ``dtype``, FP32 scale) with scale = amax(x) / top (1 for an all-zero x)."""
    amax = x.abs().amax()
    scale = torch.where(amax > 0, amax / top, 1.0)
    return (x / scale).to(dtype), scale


def decode(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return data.float() * scale


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) with the first moment in FP8
    and the second in FP16, each with a per-tensor FP32 scale. state_dict() / load_state_dict() keep the
    stored bytes exactly, so a resumed run continues as if uninterrupted."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.register_load_state_dict_pre_hook(_set_aside_moments)
        self.register_load_state_dict_post_hook(_put_back_moments)

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            for key, dtype, _ in _MOMENTS:
                state[key] = torch.zeros_like(p, dtype=dtype)
                state[key + "_scale"] = torch.ones((), dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("fp4compile.optim.AdamW does not take sparse gradients")
                state = self._init_state(p)
                state["step"] += 1
                t = float(state["step"])
                g = p.grad.float()
                m = decode(state["exp_avg"], state["exp_avg_scale"]).lerp_(g, 1 - beta1)
                v = decode(state["exp_avg_sq"], state["exp_avg_sq_scale"]).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
                p.add_((m / (1 - beta1**t) / denom).to(p.dtype), alpha=-group["lr"])
                for (key, dtype, top), value in zip(_MOMENTS, (m, v)):
                    state[key], state[key + "_scale"] = encode(value, dtype, top)
        return loss


_STORED_KEYS = tuple(k + suffix for k, _, _ in _MOMENTS for suffix in ("", "_scale"))


def _set_aside_moments(optimizer: AdamW, state_dict: dict) -> dict:
    """torch.optim.Optimizer.load_state_dict casts floating state to each parameter's dtype (FP16 moments
    and FP32 scales would lose bits in a BF16 model): take the stored tensors out before it runs."""
    state = {pid: dict(s) for pid, s in state_dict["state"].items()}
    optimizer._loading = ([p for g in state_dict["param_groups"] for p in g["params"]],
                          {pid: {k: s.pop(k) for k in _STORED_KEYS if k in s} for pid, s in state.items()})
    return {**state_dict, "state": state}


def _put_back_moments(optimizer: AdamW) -> None:
    """Put the stored tensors back, unchanged, on each parameter's device."""
    saved_ids, stored = optimizer.__dict__.pop("_loading")
    params = dict(zip(saved_ids, (p for g in optimizer.param_groups for p in g["params"])))
    for pid, tensors in stored.items():
        param = params[pid]
        optimizer.state[param].update({k: t.to(device=param.device) for k, t in tensors.items()})
