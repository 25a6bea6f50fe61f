"""DistributedDataParallel over DeformConv2dPack: two CPU processes (gloo) train a step and agree with one.

Each rank takes half of the batch; DDP averages the gradients, which for a mean loss over equal
halves is the gradient of the full batch in one process.  The ranks are spawned by
torch.multiprocessing and given a deadline, so a hang fails the test instead of the run.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import deformcp.torch as dt
from deformcp.testing import assert_within_tolerance

WORLD_SIZE = 2
BATCH = 4
DEADLINE_S = 180
LEARNING_RATE = 0.1


def _model() -> torch.nn.Module:
    """The same small model in every process: a convolution, then a Pack with offsets away from zero."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(),
                                dt.DeformConv2dPack(4, 6, 3, padding=1, offset_groups=2)).double()
    with torch.no_grad():
        model[2].conv_offset.weight.normal_(0, 0.2)
        model[2].conv_offset.bias.normal_(0, 1)
    return model


def _data():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 7, 6, dtype=torch.float64, generator=generator)
    return x, torch.randn(BATCH, 6, 7, 6, dtype=torch.float64, generator=generator)


def _train_step(model, forward, x, target) -> dict:
    """One SGD step; returns the gradients and the updated parameters."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    optimizer.zero_grad()
    F.mse_loss(forward(x), target).backward()
    grads = {f"grad {name}": p.grad.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()
    return {**grads, **{f"after {name}": p.detach().clone() for name, p in model.named_parameters()}}


def _rank(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD_SIZE)
    try:
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x, target = _data()
        share = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        torch.save(_train_step(model, ddp, x[share], target[share]), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn_with_deadline(folder: str) -> None:
    context = mp.spawn(_rank, args=(folder,), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail(f"the DDP ranks did not finish within {DEADLINE_S} s")


@pytest.mark.slow
def test_ddp_step_matches_one_process_full_batch(tmp_path):
    _spawn_with_deadline(str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    model = _model()
    single = _train_step(model, model, *_data())
    assert set(ranks[0]) == set(single) and any(key.startswith("grad 2.conv_offset") for key in single)
    for key, expected in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs between the ranks"
        assert bool(expected.abs().sum() > 0), key
        assert_within_tolerance(ranks[0][key].numpy(), expected.numpy(), "float64", key)
