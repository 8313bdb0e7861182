"""Distributed training, applied from outside the model: `torchrun --nproc_per_node=N -m nanoseek pretrain`.

DDP (NCCL on GPUs, gloo on CPUs). The model code never sees torch.distributed; the trainer calls these
helpers: wrap the model, run the set-up and the saving on rank 0 (on_main), all-reduce the expert loads before the
bias update (so every rank moves its biases identically), average logged figures, print from rank 0 only.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanoseek.errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: str) -> Dist:
    """Read torchrun's environment; start the process group when there is more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        # a long timeout: the other ranks wait (on_main) while rank 0 trains the tokenizer and tokenizes the
        # corpus, which takes longer than the default 10 minutes (NCCL) on a large corpus
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(hours=2))
    return Dist(rank, world, local_rank, device)


def wrap(model, d: Dist):
    """DDP when distributed. Unused parameters only arise when MTP modules exist but get no loss."""
    if d.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg = model.config
    unused = cfg.num_nextn_predict_layers > 0 and cfg.mtp_loss_weight == 0
    return DDP(model, device_ids=[d.local_rank] if d.device.startswith("cuda") else None,
               find_unused_parameters=unused)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def all_reduce(t: torch.Tensor, d: Dist, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place; a CPU tensor goes through the device for the collective (NCCL refuses CPU tensors)."""
    if d.world > 1:
        x = t.to(d.device)
        dist.all_reduce(x, op=op)
        t.copy_(x)
    return t


def mean(value: float, d: Dist) -> float:
    if d.world == 1:
        return value
    return float(all_reduce(torch.tensor([value], dtype=torch.float64), d)) / d.world


def max_over_ranks(values: list[float], d: Dist) -> list[float]:
    """Each value's maximum over all ranks (for bools: whether any rank has it true)."""
    if d.world == 1:
        return values
    return all_reduce(torch.tensor(values, dtype=torch.float64), d, op=dist.ReduceOp.MAX).tolist()


def sync_expert_load(model, d: Dist) -> None:
    """Sum every MoE layer's token counts over ranks, so the bias update sees the global load."""
    if d.world > 1:
        loads = [m.load for m in unwrap(model).moe_layers()]
        if loads:
            flat = torch.cat(loads)
            dist.all_reduce(flat)
            for m, part in zip(loads, flat.split([x.numel() for x in loads])):
                m.copy_(part)


def on_main(d: Dist, fn, failure: str):
    """fn() on rank 0 only, the other ranks waiting; returns its result there (None elsewhere). When it raises a
    UserError or an OSError (a run directory that is a file, a corpus it may not read) every rank raises a UserError
    (rank 0 with its own message, the others "rank 0 could not <failure>"): at a barrier they would wait until rank
    0's exit broke it, and then fail with a traceback."""
    result, error = None, None
    if d.main:
        try:
            result = fn()
        except UserError as e:
            error = e
        except OSError as e:
            error = UserError(str(e))
    if max_over_ranks([error is not None], d)[0]:
        raise error or UserError(f"rank 0 could not {failure}")
    return result


def shutdown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
