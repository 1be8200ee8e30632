"""The per-site report of one compiled graph: report.json and graph dumps, torch's structured trace
(tlparse shows the artifacts), and a summary table on the ``fp4compile`` logger
(``TORCH_LOGS=+fp4compile``)."""

import dataclasses
import itertools
import json
import logging
import os
import re
from pathlib import Path

import torch
import torch.fx as fx
from torch._logging import trace_structured

from fp4compile.config import FP4Config
from fp4compile.passes.find_sites import WEIGHT_NK, Site, example, hint
from fp4compile.passes.names import root_label
from fp4compile.runtime import gemm, hopper
from fp4compile.runtime.ops import parse_einsum

log = logging.getLogger("fp4compile")
_counter = itertools.count()


def graph_name() -> str:
    """A folder name for the graph being compiled: Dynamo's compile id ("0/1" -> "graph_0_1")."""
    compile_id = torch._guards.CompileContext.current_compile_id()
    if compile_id is None:
        return f"graph_n{next(_counter)}"
    return "graph_" + re.sub(r"[^0-9A-Za-z]+", "_", str(compile_id)).strip("_")


def _size(s):
    """An int for a static size, the sympy expression as text for a symbolic one."""
    if isinstance(s, torch.SymInt):
        value = s.node.maybe_as_int()
        return str(s) if value is None else value
    return int(s)


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return repr(value)


def _prod(sizes) -> int:
    out = 1
    for s in sizes:
        out *= hint(s)
    return out


def gemm_shapes(site: Site, a: torch.Tensor, b: torch.Tensor) -> tuple[tuple, tuple]:
    """The forward GEMM's A [..., M, K] and B [..., N, K] as the site's twin (runtime/ops.py) forms them."""
    if site.op == "einsum":
        batch, a_free, b_free, contracted, _ = parse_einsum(site.node.args[0])
        a_terms, b_terms = site.node.args[0].replace(" ", "").partition("->")[0].split(",")
        size = {c: a.shape[a_terms.index(c)] for c in a_terms} | {c: b.shape[b_terms.index(c)] for c in b_terms}
        lead, k = tuple(hint(size[c]) for c in batch), _prod(size[c] for c in contracted)
        return (*lead, _prod(size[c] for c in a_free), k), (*lead, _prod(size[c] for c in b_free), k)
    k = hint(a.shape[-1])
    n = b.shape[0] if site.op in WEIGHT_NK else b.shape[-1]
    if b.dim() == 2:  # linear, or a weight-like right operand: A's leading dims flattened into M
        return (_prod(a.shape) // max(k, 1), k), (hint(n), k)
    return tuple(hint(s) for s in a.shape), (*(hint(s) for s in b.shape[:-2]), hint(n), k)


def gemm_plan(site: Site, tensors, config: FP4Config) -> dict | None:
    """The forward GEMM's path (gemm.plan) on the device the graph is compiled for, None if not FP4."""
    if site.status != "fp4":
        return None
    a, b = tensors
    if site.op == "grouped_mm":  # the decision runtime/grouped.py takes, from the same function
        out = example(site.node)
        out_dtype = out.dtype if out is not None else a.dtype
        reason = hopper.grouped_device_reason(*gemm.device_of(a), out_dtype, hint(b.shape[-1]), hint(a.shape[-1]))
        return {"path": "hopper_fp8_grouped" if reason is None else "emulated", "reason": reason}
    path, reason = gemm.plan(*gemm.device_of(a), config.format, *gemm_shapes(site, a, b))
    return {"path": path, "reason": reason}


def site_record(site: Site, config: FP4Config, root: str | None = None) -> dict:
    tensors = [example(n) for n in site.operands] if site.operands else []
    return {
        "subgraph": site.subgraph,
        "root": root,
        "node": site.node.name,
        "op": site.op,
        "module": site.module,
        "module_resolved": site.module_resolved,
        "weights": list(site.weights),
        "shapes": [[_size(s) for s in t.shape] if t is not None else None for t in tensors],
        "dtype": str(tensors[0].dtype).removeprefix("torch.") if tensors and tensors[0] is not None else None,
        "reduction": None if site.reduction is None else _size(site.reduction),
        "status": site.status,
        "reason": site.reason,
        "rotation": site.rotation,
        "gemm": gemm_plan(site, tensors, config),
    }


def build_report(name: str, sites: list[Site], config: FP4Config, serves: dict | None = None,
                 opaque: list[dict] | None = None) -> dict:
    """``serves``: for each block the graph was traced from (names.specialize), the FQNs of all the modules
    whose calls it serves; the sites are named in the traced block. ``root`` tells apart the root models of
    a graph that reaches several (a model and its teacher under @train_step): None when there is one.
    ``subgraph``: the path of the site's GraphModule from the root graph (None for the root). ``opaque``:
    the calls of custom operators that take a weight (opaque.py)."""
    roots = {id(s.root): s.root for s in sites if s.root is not None}
    labels = {i: root_label(r) for i, r in roots.items()} if len(roots) > 1 else {}
    records = [site_record(s, config, labels.get(id(s.root))) for s in sites]
    return {
        "graph": name,
        "serves": serves or {},
        "config": {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)},
        "summary": {
            "fp4": sum(r["status"] == "fp4" for r in records),
            "skipped": sum(r["status"] == "skipped" for r in records),
        },
        "sites": records,
        "opaque": opaque or [],
    }


def summary_table(report: dict) -> str:
    rows = [("node", "op", "module", "shapes", "weight", "status", "gemm", "reason")]
    for r in report["sites"]:
        shapes = " x ".join(str(s) for s in r["shapes"])
        weight = ",".join(side for side, w in zip("AB", r["weights"]) if w) or "-"
        gemm = r["gemm"]["path"] if r["gemm"] else "-"
        reason = r["reason"] or (r["gemm"] or {}).get("reason") or ""
        node = f"{r['subgraph']}.{r['node']}" if r["subgraph"] else r["node"]
        rows.append((node, r["op"], str(r["module"]), shapes, weight, r["status"], gemm, reason))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    for call in report.get("opaque", ()):
        node = f"{call['subgraph']}.{call['node']}" if call["subgraph"] else call["node"]
        lines.append(f"{node}: custom operator {call['op']} takes the weight {', '.join(call['weights'])}, "
                     "opaque to fp4compile (not FP4)")
    s = report["summary"]
    serves = "".join(f"\nserves {', '.join(served)} (traced in {traced})" for traced, served in report["serves"].items())
    return f"fp4compile {report['graph']}: {s['fp4']} fp4, {s['skipped']} skipped{serves}\n" + "\n".join(lines)


def dump_dir(config: FP4Config) -> str | None:
    return config.dump_dir or os.environ.get("FP4COMPILE_DUMP_DIR") or None


def emit(report: dict, before: fx.GraphModule | str, after: fx.GraphModule, config: FP4Config) -> None:
    """Send the report and both graphs to every sink: dump folder, structured trace, logger."""
    before_code = before if isinstance(before, str) else before.print_readable(print_output=False)
    after_code = after.print_readable(print_output=False)
    payload = json.dumps(report, indent=2)
    folder = dump_dir(config)
    if folder:
        out = Path(folder) / report["graph"]
        out.mkdir(parents=True, exist_ok=True)
        (out / "before.py").write_text(before_code)
        (out / "after.py").write_text(after_code)
        (out / "report.json").write_text(payload)
    for name, text, encoding in (
        ("fp4compile_report", payload, "json"),
        ("fp4compile_graph_before", before_code, "string"),
        ("fp4compile_graph_after", after_code, "string"),
    ):
        trace_structured(
            "artifact",
            metadata_fn=lambda name=name, encoding=encoding: {"name": name, "encoding": encoding},
            payload_fn=lambda text=text: text,
        )
    if report["sites"] or report["opaque"]:
        log.info("%s", summary_table(report))
