"""Processes of one run: which rank this is, its share of the work, its files, rank zero's clock.

Every long loop of the framework (the engine's analyses, masking) shards its work the same way:
``resolve_world`` gives (rank, world size), ``shard_range`` this rank's contiguous block range,
``shard_path`` its own file next to the merged one, and ``rank_zero_seconds`` makes every rank
report the same wall time (``max_on_every_rank`` agrees on a resumed adaptive run's stage);
``broadcast_buffers`` gives every rank rank zero's buffers before the training callbacks
analyse a model; ``check_same_on_every_rank`` refuses ranks that were
started with different settings (e.g. another registration of an augmentation). Without an
initialised process group everything is one process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def resolve_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's rank and the number of processes.

    Args:
        rank, world_size: given values, or None for torch.distributed's when it is
            initialised, else 0 and 1.

    Returns:
        (rank, world_size) with 0 <= rank < world_size.

    Raises:
        ValueError: for an impossible pair, or world_size > 1 without an initialised process
            group (the shards' sums are reduced through it, so each process would report its
            shard alone).
    """
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if world_size > 1 and not initialised:
        raise ValueError(
            f"world_size={world_size} but torch.distributed is not initialised: the shards' "
            f"sums are reduced through the process group; initialise it (Lightning's DDP does) "
            f"or run with world_size=1"
        )
    return rank, world_size


def shard_range(n_blocks: int, rank: int, world_size: int) -> tuple[int, int]:
    """The blocks of ``rank`` among ``world_size``: contiguous, sizes differ by at most one.

    Args:
        n_blocks: blocks of the whole work (design blocks, probe images).
        rank, world_size: as ``resolve_world`` returns them.

    Returns:
        (start, stop): blocks [start, stop), deterministic in its arguments.
    """
    return n_blocks * rank // world_size, n_blocks * (rank + 1) // world_size


def shard_path(path: Path, rank: int, world_size: int) -> Path:
    """The file of one rank: ``path`` itself in a single process, else
    ``<stem>.rank<r>-of-<W><suffix>`` next to it (resume states, activation shards).

    Args:
        path: the file of the whole run, e.g. runs/x/activations_sobol.h5.
        rank, world_size: as ``resolve_world`` returns them.

    Returns:
        e.g. runs/x/activations_sobol.rank1-of-4.h5.
    """
    path = Path(path)
    if world_size == 1:
        return path
    return path.with_name(f"{path.stem}.rank{rank}-of-{world_size}{path.suffix}")


def rank_zero_seconds(seconds: float, world_size: int, device: torch.device) -> float:
    """``seconds`` as rank zero measured it, on every rank (one broadcast under DDP), so that a
    run's time means the same for one process and for several.

    Args:
        seconds: this rank's wall time, in seconds.
        world_size: processes; 1 returns ``seconds`` without communication.
        device: where the process group's collectives run (CUDA for NCCL).

    Returns:
        Rank zero's seconds.
    """
    if world_size == 1:
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    torch.distributed.broadcast(value, src=0)
    return float(value.item())


def max_on_every_rank(value: int, world_size: int, device: torch.device) -> int:
    """The largest of the ranks' ``value`` (one all-reduce under DDP; a collective).

    Args:
        value: this rank's integer (e.g. the stage its resume state reached).
        world_size: processes; 1 returns ``value`` without communication.
        device: where the process group's collectives run (CUDA for NCCL).

    Returns:
        The maximum over ranks, on every rank.
    """
    if world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())


def broadcast_buffers(module: torch.nn.Module, world_size: int) -> None:
    """Give every rank rank zero's buffers, in place (a collective: every rank calls it).

    DDP leaves each rank with the BatchNorm statistics of its own last batches until the next
    synchronising forward, so shards analysed or masked on each rank would otherwise see other
    weights than the checkpoint stores.

    Args:
        module: the model; its buffers (e.g. BatchNorm running mean and variance) change.
        world_size: processes; 1 (or no initialised process group) does nothing.
    """
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)


def check_same_on_every_rank(
    text: str, what: str, world_size: int, device: torch.device
) -> None:
    """Refuse a run whose ranks disagree on ``text`` (a collective: every rank calls it).

    Ranks launched separately (torchrun, SLURM) build their inputs themselves: one with other
    settings or another version of an imported augmentation would add sums of another problem
    to the shared accumulators.

    Args:
        text: this rank's description, e.g. the problem's config as sorted JSON.
        what: what it describes, for the message.
        world_size: processes; 1 returns without communication.
        device: where the process group's collectives run (CUDA for NCCL).

    Raises:
        ValueError: on every rank, when some rank's SHA-256 of ``text`` differs from rank
            zero's.
    """
    if world_size == 1:
        return
    digest = hashlib.sha256(text.encode()).digest()
    mine = torch.tensor(list(digest), dtype=torch.int64, device=device)  # (32,)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, mine)
    differing = [rank for rank, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if differing:
        raise ValueError(
            f"ranks {differing} have another {what} than rank 0; start every process with the "
            f"same settings and code (registered augmentations importable, in the same version, "
            f"on every node)"
        )
