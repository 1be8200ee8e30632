"""FP8 gradient communication for DistributedDataParallel: a communication hook (``register_comm_hook``).

Each bucket is cut into chunks of ``chunk`` elements with one shared FP32 scale per chunk: the ranks
first all-reduce (MAX) the chunks' absolute maxima, so every rank encodes with, and decodes by, the same
scale; then each rank's E4M3 bytes are all-gathered and every rank sums the decoded values in FP32 and
divides by the world size (DDP's average). Every rank computes the same sum in the same order, so the
replicas stay identical.

Why E4M3: with a scale per 4096-element chunk the range within a chunk is small, so precision (3 mantissa
bits: a relative error of at most 2^-4 per value) matters more than E5M2's range; values below
2^-9 * amax / 448 of their chunk flush to the subnormal grid (an absolute error of at most 2^-10 times the
chunk's scale). Why all-gather: NCCL and gloo cannot sum FP8, and summing in FP8 would round once per
rank. Bytes received per rank: (W - 1) * N (plus N / chunk * 4 for the maxima) against ~2 (W - 1) / W *
4N for an FP32 ring all-reduce (2N for BF16): 4x less traffic at W = 2, the break-even with FP32 at W = 8.

For FSDP2, :class:`FP8ReduceScatter` (``fully_shard(...).set_custom_reduce_scatter(FP8ReduceScatter())``)
does the same for its reduce-scatter with an all-to-all: each rank receives only its own shard from every
rank, (W - 1) / W * N bytes against 4 (W - 1) / W * N in FP32, at any W.
"""

import torch
import torch.distributed as dist

from fp4compile.runtime.formats import E4M3_MAX

FP8 = torch.float8_e4m3fn


def _shared_scales(x: torch.Tensor, group) -> torch.Tensor:
    """Per-chunk scales of x [..., chunk] that every rank shares: the all-reduced (MAX) chunk maxima / 448."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return torch.where(amax > 0, amax / E4M3_MAX, 1.0)


def _chunked(flat: torch.Tensor, chunk: int) -> torch.Tensor:
    """flat padded with zeros to a multiple of ``chunk``, as [chunks, chunk]."""
    pad = -flat.numel() % chunk
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, chunk)


def fp8_allreduce_hook(state, bucket: dist.GradBucket, chunk: int = 4096) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: average the bucket's gradients across ranks, sending them as E4M3 with per-chunk
    scales shared by all ranks. ``state`` is the process group (None: the default group)."""
    group = state
    world = dist.get_world_size(group)
    flat = bucket.buffer()
    x = _chunked(flat.float(), chunk)
    scale = _shared_scales(x, group)
    payload = (x / scale).to(FP8).view(torch.uint8)
    gathered = [torch.empty_like(payload) for _ in range(world)]
    work = dist.all_gather(gathered, payload, group=group, async_op=True)

    def decode(_):
        total = sum(g.view(FP8).float() for g in gathered) * (scale / world)
        flat.copy_(total.view(-1)[: flat.numel()])
        return flat

    return work.get_future().then(decode)


class FP8ReduceScatter:
    """FSDP2's reduce-scatter with E4M3 payloads (``set_custom_reduce_scatter``): every rank's input
    [W * shard] is cut into W segments and chunks of ``chunk`` with scales shared by all ranks (as in
    :func:`fp8_allreduce_hook`), the FP8 segments are exchanged with one all-to-all, and each rank sums the
    W decoded contributions to its own shard in FP32. Error per element: at most sum_i max(2^-4 |g_i|, 2^-10 s) (divided by W for AVG)."""

    def __init__(self, chunk: int = 4096):
        self.chunk = chunk

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
            raise ValueError(f"FP8ReduceScatter reduces by SUM or AVG, got {op}")
        world = dist.get_world_size(group)
        shard = output_tensor.numel()
        x = torch.nn.functional.pad(input_tensor.float().view(world, shard), (0, -shard % self.chunk))
        x = x.view(world, -1, self.chunk)
        scale = _shared_scales(x, group)
        received = torch.empty_like(x, dtype=torch.uint8)
        dist.all_to_all_single(received, (x / scale).to(FP8).view(torch.uint8), group=group)
        rank = dist.get_rank(group)
        total = received.view(FP8).float().sum(0) * scale[rank]
        if op == dist.ReduceOp.AVG:
            total = total / world
        output_tensor.copy_(total.view(-1)[:shard].view_as(output_tensor))
        return None
