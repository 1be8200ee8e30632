import re

import pytest
import torch

from fp4compile.config import FP4Config
from fp4compile.passes import fp4_pass


def rewritten(fn, *inputs, config: FP4Config | None = None, **compile_kwargs):
    """Run ``fn`` through Dynamo and the FP4 pass only (no Inductor): (the pass's report, the rewritten
    graph's code without source comments)."""
    captured = {}

    def capture(gm, example_inputs):
        captured["report"] = fp4_pass(gm, example_inputs, config or FP4Config())
        captured["code"] = readable_code(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True, **compile_kwargs)(*inputs)
    return captured["report"], captured["code"]


def readable_code(gm) -> str:
    """gm.code less the signature, placeholder aliases, comments and the `x = None` frees."""
    lines = []
    for line in gm.code.strip("\n").splitlines()[1:]:
        line = re.sub(r";\s+[\w =]+= None$", "", line.strip())
        if line and not line.startswith("#") and not re.fullmatch(r"(\w+) = L_\w+", line):
            lines.append(line)
    return "\n".join(lines)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
