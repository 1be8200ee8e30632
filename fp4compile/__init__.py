"""fp4compile: FP4 training as a torch.compile backend. ``torch.compile(model, backend="fp4")``."""

from fp4compile import distributed, optim
from fp4compile.dynamo_backend import backend, compile
from fp4compile.passes.coverage import coverage
from fp4compile.config import RECIPES, FP4Config
from fp4compile.runtime.quantize import QuantizedTensor, fake_quantize, quantize
from fp4compile.train_step import train_step

__version__ = "0.1.0"

__all__ = [
    "FP4Config",
    "QuantizedTensor",
    "RECIPES",
    "backend",
    "compile",
    "coverage",
    "distributed",
    "fake_quantize",
    "optim",
    "quantize",
    "train_step",
]
