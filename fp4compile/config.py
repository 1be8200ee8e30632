"""FP4Config: every knob of fp4compile in one frozen dataclass, with named recipes."""

import dataclasses
import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fp4compile.runtime.formats import get_format
from fp4compile.runtime.fp8 import get_fp8_dtype
from fp4compile.runtime.hadamard import check_group

BACKWARDS = ("fp8", "nvidia", "quartet2")
ModuleFilter = Sequence[str] | Callable[[str | None], bool] | None


@dataclass(frozen=True)
class FP4Config:
    """How fp4compile quantizes the matmuls of a compiled graph. The defaults are the `rotated` recipe:
    the paper's DGE with its OCC replaced by a Hadamard rotation (the paper's own recipe is "paper").

    format: FP4 scaling of both GEMM operands along the reduction dim: "vector" (per token for
        activations, per output channel for weights, FP32 scales), "mxfp4" or "nvfp4" (block formats).
    dge, dge_k, dge_clip: the differentiable gradient estimator on weights: the weight gradient is
        multiplied by f'(w / scale) with exponent k, f' clipped to at most dge_clip. False means STE.
    occ, occ_quantile: outlier clamping at the occ_quantile / 1 - occ_quantile quantiles of each
        activation operand, with the clamped residual multiplied in high precision (the paper's; off by
        default, where the rotation does its job).
    rotation: rotate both operands of every forward GEMM along K by a fixed randomized Hadamard
        transform in groups of this size (16, 32, 64 or 128; 128 by default) before they are quantized,
        which spreads each outlier over its group (what OCC's clamping handles otherwise, here with no
        compensation GEMM); None: no rotation. The product is unchanged in exact arithmetic, the
        gradients are rotated back, and DGE acts on the rotated weight. Needs format="vector" and
        backward="fp8". A matmul whose K is not a multiple of the group takes the largest smaller group
        that divides K, and stays in high precision if K is not a multiple of 16 (report.json gives each
        site's group or reason).
    occ_sample: estimate the quantiles from this many entries (a fixed stratified sample) when the
        activation has at least 16 times as many; None computes them exactly (slow on large tensors: see runtime/occ.py).
    grad_dtype: FP8 dtype of dY in the two backward GEMMs ("float8_e5m2", "float8_e4m3fn"), scaled per
        row along each GEMM's reduction dim; None keeps dY in its own dtype.
    backward_operands: "quantized" multiplies dY by the forward's FP4 operands (the paper);
        "original" by the unquantized operands (a high-precision backward; DGE still applies).
    recompute_activations: quantize (and rotate) each activation operand again in the backward instead
        of keeping its FP8 values for it, from what the backward keeps anyway (an RMSNorm's input and
        statistics, SwiGLU's inputs, attention's output): one byte less per element of every quantized
        activation. Without a rotation the values are rounded again with the forward's scales, in the
        kernel Inductor generates to recompute the activation, and stored transposed as the backward's
        GEMM takes them; with one, the rotate-quantize kernel runs again. The same values are quantized
        (up to an activation function Inductor recomputes in another kernel, or gradients summed in
        another order: last bits).
        Not with OCC (its quantile selection would run again too) or the unbiased backwards. Inductor's
        partitioner does it: with inner="aot_eager" the FP8 values are kept.
    recompute_weights: likewise for weights: rounded again in the backward from the parameters (DGE
        rotates them again anyway) with the forward's scales ("vector" and "tensor"; block formats and
        MoE experts run their quantize again), one byte per parameter less. Not with the unbiased
        backwards.
    include, exclude: which sites to quantize, by the FQN of their module in the root model
        ("model.layers.0.mlp.up_proj"), the same under regional compilation (each block compiled), graph
        breaks, @train_step and DDP/FSDP wrappers: a sequence of fnmatch patterns, or a callable taking the
        FQN (None for matmuls outside any submodule) and returning True for a match. include=None matches
        everything; exclude=() excludes nothing. Blocks that share one compiled graph (regional
        compilation) but are selected differently get one graph per distinct selection: Dynamo counts
        those against torch._dynamo.config.recompile_limit (fp4compile warns when they come close).
    quantize_output_heads: also quantize output heads. By default the matmul producing the logits stays
        in high precision, as FP8/FP4 training recipes keep it: a matmul whose weight is tied to an input
        embedding, whose output feeds cross_entropy / nll_loss / log_softmax, or whose weight has an input
        embedding's shape with its output leaving the graph (found by structure, whatever its name).
    quantize_activation_matmuls: also quantize matmuls with no weight operand (attention scores,
        attention x values), with OCC on both operands if occ is on.
    quantize_routers: also quantize mixture-of-experts routers, the matmuls whose output picks experts
        through torch.topk (found by that structure, not by name). Off by default, as FP8/FP4 MoE training
        recipes keep routers in high precision: FP4 router logits change which experts tokens go to.
    dump_dir: write graphs and report.json of every compiled graph under this folder (also set by the
        FP4COMPILE_DUMP_DIR environment variable).
    backward: how the two gradient GEMMs are estimated. "fp8": the paper's (dY in grad_dtype, DGE or
        STE). "nvidia": NVIDIA's NVFP4 recipe (weights in 16x16 tiles; dX = SR(dY) @ W_q; dW = SR(H dY)^T
        @ Q(H X) with a random Hadamard transform H along the tokens). "quartet2": Quartet II (both
        operands of both gradient GEMMs rotated along their reduction dim, then quantized by MS-EDEN).
        The last two need format="nvfp4", dge=False and occ=False (their estimators are unbiased instead).
    hadamard_group: size of the random Hadamard transform's groups (16, 32, 64 or 128) for the
        "nvidia" (16 in its paper) and "quartet2" (128) backwards. Signs are drawn from torch's
        generator every backward: torch.manual_seed makes a run repeat, and ranks seeded alike share them.
    """

    format: str = "vector"
    dge: bool = True
    dge_k: float = 5.0
    dge_clip: float = 3.0
    occ: bool = False
    occ_quantile: float = 0.99
    occ_sample: int | None = 65536
    rotation: int | None = 128
    grad_dtype: str | None = "float8_e5m2"
    backward_operands: str = "quantized"
    recompute_activations: bool = False
    recompute_weights: bool = False
    include: ModuleFilter = None
    exclude: ModuleFilter = ()
    quantize_output_heads: bool = False
    quantize_activation_matmuls: bool = False
    quantize_routers: bool = False
    dump_dir: str | None = None
    backward: str = "fp8"
    hadamard_group: int = 16

    def __post_init__(self):
        get_format(self.format)
        if self.grad_dtype is not None:
            get_fp8_dtype(self.grad_dtype)
        if self.backward_operands not in ("quantized", "original"):
            raise ValueError(f"backward_operands must be 'quantized' or 'original', got {self.backward_operands!r}")
        if not self.dge_k > 0:
            raise ValueError(f"dge_k must be positive, got {self.dge_k}")
        if not self.dge_clip > 0:
            raise ValueError(f"dge_clip must be positive, got {self.dge_clip}")
        if self.occ_sample is not None and self.occ_sample < 1:
            raise ValueError(f"occ_sample must be a positive count or None, got {self.occ_sample}")
        if not 0.5 < self.occ_quantile <= 1.0:
            raise ValueError(f"occ_quantile must be in (0.5, 1], e.g. 0.99, got {self.occ_quantile}")
        self._check_backward()
        self._check_rotation()
        if self.recompute_activations and (self.occ or self.backward != "fp8"):
            raise ValueError(f"recompute_activations=True needs occ=False and backward='fp8', got occ={self.occ}, "
                             f"backward={self.backward!r} (OCC's quantile selection would run again in the "
                             "backward; the unbiased backwards keep other operands): use it with the recipe "
                             "'rotated' or 'dge', or leave it off")
        if self.recompute_weights and self.backward != "fp8":
            raise ValueError(f"recompute_weights=True needs backward='fp8', got {self.backward!r} (the unbiased "
                             "backwards keep other operands): leave it off")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"{name} takes a sequence of patterns; write {name}=({value!r},)")
            if value is not None and not callable(value):
                object.__setattr__(self, name, tuple(value))

    def _check_backward(self):
        if self.backward not in BACKWARDS:
            raise ValueError(f"backward must be one of {BACKWARDS}, got {self.backward!r}")
        check_group(self.hadamard_group)
        if self.backward != "fp8" and (self.format != "nvfp4" or self.dge or self.occ):
            raise ValueError(
                f"backward={self.backward!r} quantizes all three GEMMs in NVFP4 with unbiased estimators: "
                "use format='nvfp4', dge=False, occ=False (or the recipe "
                f"{'nvidia_nvfp4' if self.backward == 'nvidia' else 'quartet2'!r})"
            )

    def _check_rotation(self):
        if self.rotation is None:
            return
        check_group(self.rotation)
        if self.format != "vector" or self.backward != "fp8":
            recipe = {"nvidia": "nvidia_nvfp4", "quartet2": "quartet2"}.get(self.backward)
            default = " (the default)" if self.rotation == FP4Config.rotation else ""
            raise ValueError(f"rotation={self.rotation}{default} rotates the vector format's forward "
                             f"operands, not format={self.format!r} with backward={self.backward!r}: add "
                             f"rotation=None{f', or use the recipe {recipe!r}' if recipe else ''}")

    @classmethod
    def from_recipe_name(cls, name: str, **overrides) -> "FP4Config":
        """A named recipe (see RECIPES), with any field overridden by keyword."""
        try:
            recipe = RECIPES[name]
        except KeyError:
            raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}") from None
        return cls(**{**recipe, **overrides})

    def replace(self, **changes) -> "FP4Config":
        return dataclasses.replace(self, **changes)

    def selects(self, fqn: str | None) -> tuple[bool, str | None]:
        """Whether a site in module ``fqn`` is quantized, and if not, why."""
        if self.include is not None and not _matches(self.include, fqn):
            return False, f"module {fqn!r} not matched by config.include"
        if self.exclude is not None and _matches(self.exclude, fqn):
            return False, f"module {fqn!r} matched by config.exclude"
        return True, None


def _matches(filt, fqn: str | None) -> bool:
    if callable(filt):
        return bool(filt(fqn))
    return fqn is not None and any(fnmatch.fnmatchcase(fqn, p) for p in filt)


# Each recipe spells out its estimators, so that none depends on which one is the default.
_NO_ROTATION = {"rotation": None}
RECIPES: dict[str, dict] = {
    "rotated": {"dge": True, "occ": False, "rotation": 128},
    "paper": {"dge": True, "occ": True, **_NO_ROTATION},
    "direct_cast": {"dge": False, "occ": False, **_NO_ROTATION},
    "dge": {"dge": True, "occ": False, **_NO_ROTATION},
    "occ": {"dge": False, "occ": True, **_NO_ROTATION},
    "mxfp4": {"format": "mxfp4", "dge": True, "occ": True, **_NO_ROTATION},
    "nvfp4": {"format": "nvfp4", "dge": True, "occ": True, **_NO_ROTATION},
    "nvidia_nvfp4": {"format": "nvfp4", "dge": False, "occ": False, "backward": "nvidia", "hadamard_group": 16,
                     **_NO_ROTATION},
    "quartet2": {"format": "nvfp4", "dge": False, "occ": False, "backward": "quartet2", "hadamard_group": 128,
                 **_NO_ROTATION},
}
