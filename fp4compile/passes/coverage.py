"""Which of a model's weight matrices the fp4 backend has seen as a site's weight, in this process.

A report lists the matmuls of the graphs the backend received; a matmul Dynamo ran eagerly (a graph break
inside a checkpointed region, a module it did not compile, an expert loop it split off) is in none of
them. The parameters are what both sides share: the pass records each site weight's status here, and
:func:`coverage` lists a model's weight matrices by it, "unseen" for those no graph had.
"""

import torch
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

from fp4compile.passes import names

_STATUS = WeakIdKeyDictionary()  # parameter -> "fp4" or "skipped" ("fp4" once any site quantized it)
# Modules whose matrices are not matmul weights: lookup tables, convolutions.
_NOT_MATMUL = (nn.Embedding, nn.EmbeddingBag, nn.modules.conv._ConvNd)


def record(sites, weights: dict[str, torch.Tensor]) -> None:
    """Note the status of each site's weight operands; ``weights`` maps their names to the parameters."""
    for site in sites:
        for name in filter(None, site.weights):
            for param in map(weights.get, name.split("+")):  # a weight computed from several
                if param is not None and _STATUS.get(param) != "fp4":
                    _STATUS[param] = site.status


def coverage(model: nn.Module) -> dict[str, list[str]]:
    """The names of ``model``'s trainable weight matrices (parameters of 2 or more dims, held by a module
    that is not an embedding or a convolution) by what the fp4 backend did with them in this process:
    "fp4" (some site quantized it), "skipped" (sites kept it in high precision, each report says why) and
    "unseen" (no compiled graph used it as a matmul weight: it ran eagerly, or has not run yet), each
    named as the reports name it (its FQN in the largest model holding it, without the wrappers of
    torch.compile, DDP or checkpointing). Call it after a training step."""
    found = {"fp4": [], "skipped": [], "unseen": []}
    seen = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _NOT_MATMUL):
            continue
        for name, param in module.named_parameters(prefix=module_name, recurse=False):
            if param.dim() < 2 or not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            found[_STATUS.get(param, "unseen")].append(names.parameter_name(param) or name)
    return found
