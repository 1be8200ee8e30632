"""Shared helpers of the benchmark scripts: timing, environment, tables, JSON, profiles."""

import argparse
import datetime
import functools
import gc
import json
import linecache
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import fp4compile
from fp4compile import FP4Config

# The variants every model benchmark runs side by side. torchao's float8 training runs where torchao is
# importable (optional: install torchao to get its rows).
VARIANTS = {
    "bf16_eager": None,
    "bf16_inductor": "inductor",
    "fp4_occ_off": FP4Config.from_recipe_name("dge"),
    "fp4_occ_off_recompute": FP4Config.from_recipe_name("dge", recompute_activations=True),
    "fp4_occ_off_recompute_all": FP4Config.from_recipe_name("dge", recompute_activations=True, recompute_weights=True),
    "fp4_occ_off_recompute_weights": FP4Config.from_recipe_name("dge", recompute_weights=True),
    "fp4_occ_on": FP4Config.from_recipe_name("paper"),
    "fp4_rotated": FP4Config.from_recipe_name("rotated"),
    "fp4_recompute": FP4Config.from_recipe_name("rotated", recompute_activations=True),
    "fp4_recompute_all": FP4Config.from_recipe_name("rotated", recompute_activations=True, recompute_weights=True),
    "fp4_recompute_weights": FP4Config.from_recipe_name("rotated", recompute_weights=True),
    "fp4_nvfp4_occ_off": FP4Config.from_recipe_name("nvfp4", occ=False),
    "nvidia_nvfp4": FP4Config.from_recipe_name("nvidia_nvfp4"),
    "quartet2": FP4Config.from_recipe_name("quartet2"),
    "torchao_rowwise": "rowwise",
    "torchao_tensorwise": "tensorwise",
}
TORCHAO = ("torchao_rowwise", "torchao_tensorwise")


def default_variants() -> str:
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return ",".join(v for v in VARIANTS if v not in TORCHAO)
    return ",".join(VARIANTS)


def prepare(model: torch.nn.Module, variant: str, fp4_options: dict | None = None):
    """Make ``model`` ready for ``variant`` and return the torch.compile backend it runs with (None:
    eager). torchao swaps the model's Linears (all but lm_head) for Float8Linear, compiled by Inductor.
    ``fp4_options`` (Inductor options, as torch.compile's ``options``) go to fp4compile's variants only."""
    if variant in TORCHAO:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        config = Float8LinearConfig.from_recipe_name(VARIANTS[variant])
        convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: "lm_head" not in fqn)
        return "inductor"
    backend = VARIANTS[variant]
    if not isinstance(backend, FP4Config):
        return backend
    fp4 = fp4compile.backend(backend)
    return functools.partial(fp4, options=fp4_options) if fp4_options else fp4


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=default_out, help="where to write the JSON results")
    return p


def model_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """The parser of a model benchmark: --out, --variants and --fp4-options."""
    p = parser(description, default_out)
    p.add_argument("--variants", default=default_variants(), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--fp4-options", type=json.loads, default=None,
                   help="Inductor options for the fp4 variants, as JSON (torch.compile's options=), e.g. "
                        "'{\"coordinate_descent_tuning\": true}'; the other variants keep Inductor's defaults")
    p.add_argument("--peak-trace", default="", help="variants whose memory at the peak of one step to list by "
                   "allocation (a CUDA memory trace)")
    return p


def environment() -> dict:
    try:
        commit = subprocess.run(
            # "-dirty" when the files that ran differ from the commit: the numbers are not that commit's
            ["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True,
            cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = {"device": props.name, "capability": list(torch.cuda.get_device_capability(0)),
                  "sms": props.multi_processor_count}
    else:
        device = {"device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"}
    return {
        **device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(),
        "commit": commit or "unknown",
        "python": sys.version.split()[0],
    }


_HELD_AT_FIRST_START = []  # GPU memory allocated at the first fresh_start: the benchmark's own inputs


def fresh_start() -> None:
    """Forget the previous variant before the next is measured: Dynamo's caches, and its model, grads and
    buffers, which compiled code keeps in reference cycles until a collection (uncollected, they counted
    in the next variant's peak memory). Warns when well over what was allocated at the first call is still
    held: something keeps an earlier variant alive (as the fp4 backend once kept every compiled model)."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        held = torch.cuda.memory_allocated()
        if not _HELD_AT_FIRST_START:
            _HELD_AT_FIRST_START.append(held)
        extra = held - _HELD_AT_FIRST_START[0]
        if extra > 128 * 2**20:  # more than cuBLAS's and cuDNN's workspaces, which stay allocated
            print(f"warning: {extra / 2**20:.0f} MiB of earlier variants still allocated; the next variant's "
                  "peak memory counts them")


def time_ms(fn, warmup: int = 3, iters: int = 20) -> dict:
    """Median and spread of ``fn``'s device time in ms (CUDA events around each call), and the median
    host time until ``fn`` returns (launching its work): near the device time, the host is what limits."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times, host = [], []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    host.sort()
    return {"median_ms": times[len(times) // 2], "min_ms": times[0], "max_ms": times[-1], "iters": iters,
            "host_ms": host[len(host) // 2]}


def copy_bandwidth_gbs(nbytes: int) -> float:
    """A device-to-device copy of ``nbytes``, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src))["median_ms"]
    return 2 * nbytes / t / 1e6


def top_kernels(fn, n: int = 40) -> dict:
    """GPU time of one call of ``fn`` (torch.profiler): the ``n`` kernels taking the most, the total, and
    the part spent in matrix-multiply kernels (cuBLAS' nvjet/gemm, CUTLASS)."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0:
            name = e.key if len(e.key) <= 110 else e.key[:60] + "~" + e.key[-49:]
            rows.append({"kernel": name, "calls": e.count, "ms": us / 1e3})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    for r in rows:
        r["share"] = r["ms"] / total if total else 0.0
    gemm = sum(r["ms"] for r in rows if any(s in r["kernel"] for s in ("nvjet", "gemm", "cutlass")))
    return {"total_ms": total, "gemm_ms": gemm, "top": rows[:n]}


def _allocated_at(frames: list[dict]) -> str:
    """Where a traced block was allocated: the first frame in Inductor's generated code or in fp4compile,
    with its source line (which names the buffer), else the innermost three frames."""
    for f in frames:
        if "torchinductor" in f["filename"] or "fp4compile" in f["filename"]:
            source = linecache.getline(f["filename"], f["line"]).strip()
            return f"{Path(f['filename']).name}:{f['line']} {source}"[:140].rstrip()
    return " < ".join(f"{Path(f['filename']).name}:{f['line']}" for f in frames[:3])


def blocks_at_peak(events: list[dict], n: int = 15) -> dict:
    """Replay a CUDA memory trace (one device's events of ``torch.cuda.memory._snapshot()``): the peak of
    the blocks it allocated, and the ``n`` largest of those live at that moment, with where each was
    allocated. Blocks allocated before the trace began are not in it."""
    live, current, peak, at_peak = {}, 0, 0, {}
    for e in events:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            current += e["size"]
            if current > peak:
                peak, at_peak = current, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:
            current -= live.pop(e["addr"])["size"]
    top = sorted(at_peak.values(), key=lambda e: -e["size"])[:n]
    return {"peak_mib": peak / 2**20, "blocks": len(at_peak),
            "top": [{"MiB": e["size"] / 2**20, "allocated at": _allocated_at(e.get("frames", []))} for e in top]}


def peak_trace(fn) -> dict:
    """``blocks_at_peak`` of one call of ``fn`` (CUDA memory history with Python stacks), and the memory
    allocated before the call (weights, optimizer state, inputs)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    try:
        fn()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return {**blocks_at_peak(snapshot["device_traces"][torch.cuda.current_device()]), "before_mib": before / 2**20}


def top_host_ops(fn, n: int = 30) -> dict:
    """Host time of one call of ``fn`` started on an idle GPU (torch.profiler, CPU activity): the ``n``
    operators and runtime calls with the most self time, and the wall time of the call."""
    torch.cuda.synchronize()
    time.sleep(0.05)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
    rows = [{"op": e.key[:110], "calls": e.count, "self ms": e.self_cpu_time_total / 1e3,
             "total ms": e.cpu_time_total / 1e3} for e in prof.key_averages()]
    rows.sort(key=lambda r: -r["self ms"])
    return {"wall_ms": wall, "self_ms": sum(r["self ms"] for r in rows), "top": rows[:n]}


def time_layer(variant: str, fn, model, x, dy, flop: float, iters: int, slow: bool = False):
    """One layer benchmark's row: fwd+bwd of ``fn(x)`` against ``dy`` (and the forward alone) timed with
    time_ms after a first call that compiles; (row, profile of one step or None). A variant that fails to
    compile or run gives a row with its error, not an exception."""

    def step():
        x.grad = None
        model.zero_grad(set_to_none=True)
        fn(x).backward(dy)

    try:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
    except Exception as e:
        return {"variant": variant, "error": short_error(e)}, None
    first_s = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    t = time_ms(step, warmup=1 if slow else 3, iters=3 if slow else iters)
    fwd = time_ms(lambda: fn(x), warmup=1, iters=3 if slow else iters)["median_ms"]
    row = {"variant": variant, "ms": t["median_ms"], "fwd ms": fwd, "bwd ms": t["median_ms"] - fwd,
           "spread ms": t["max_ms"] - t["min_ms"], "TFLOP/s": flop / t["median_ms"] / 1e9,
           "peak GiB": torch.cuda.max_memory_allocated() / 2**30, "first call s": first_s}
    return row, None if variant == "bf16_eager" else top_kernels(step)


def report_layer(args, rows: list[dict], profiles: dict, title: str) -> None:
    """time_layer's rows with their ratio to bf16_inductor, printed and written (report)."""
    base = next((r["ms"] for r in rows if r["variant"] == "bf16_inductor"), None)
    for r in rows:
        if base and "ms" in r:
            r["vs bf16 inductor"] = base / r["ms"]
    columns = ["variant", "ms", "fwd ms", "bwd ms", "spread ms", "TFLOP/s", "vs bf16 inductor", "peak GiB",
               "first call s", "error"]
    print_table(rows, columns, title)
    report(args, rows, profiles)


def print_table(rows: list[dict], columns: list[str], title: str = "") -> None:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def report(args, rows: list[dict], profiles: dict) -> None:
    """Print each profiled variant's top kernels and write the run's JSON (environment, args, results)."""
    for variant, prof in profiles.items():
        if "peak_mib" in prof:
            title = (f"{variant}: {prof['before_mib']:.0f} MiB allocated before the step, its own blocks peak at "
                     f"{prof['peak_mib']:.0f} MiB ({prof['blocks']} blocks); the largest then")
            print_table(prof["top"], ["MiB", "allocated at"], title)
            continue
        if "wall_ms" in prof:
            title = f"host time of one step of {variant}: {prof['wall_ms']:.2f} ms (profiled)"
            print_table(prof["top"], ["op", "calls", "self ms", "total ms"], title)
            continue
        title = f"one step of {variant}: {prof['total_ms']:.2f} ms of GPU time, {prof['gemm_ms']:.2f} ms in GEMMs"
        print_table(prof["top"], ["kernel", "calls", "ms", "share"], title)
    write_json(args.out, {"env": environment(), "args": vars(args), "results": rows, "profiles": profiles})


def write_json(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {path}")


def short_error(e: Exception) -> str:
    """The line of an exception that says what went wrong (Inductor appends advice lines after it)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith(("Set TORCH", "For even"))]
    return f"{type(e).__name__}: {(lines[-1] if lines else '')[:160]}"
