"""A ZeRO checkpoint written at one data-parallel size, loaded at another (`strategy.load_resized_engine`):
the next optimizer step is the one the original group would have taken, so weights and Adam state carried
over. DeepSpeed on CPU with gloo, a tiny model, one process per rank."""

from __future__ import annotations

import os

import pytest
import torch

GLOBAL_BATCH = 6  # divisible by 1, 2 and 3 ranks


def _model():
    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(7, 13)
            self.b = torch.nn.Linear(13, 5)
            self.frozen = torch.nn.Linear(3, 3)  # left out of checkpoints, as the vision tower is
            self.frozen.requires_grad_(False)

        def forward(self, x):
            return self.b(torch.nn.functional.gelu(self.a(x)))

    return Tiny()


def _batch(step: int) -> torch.Tensor:
    return torch.randn(GLOBAL_BATCH, 7, generator=torch.Generator().manual_seed(step))


def _worker(rank: int, world: int, mode: str, directory: str, stage: int, port: int, out: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import deepspeed
    import torch.distributed as dist

    from vistralv_ray.training.strategy import load_resized_engine, save_engine

    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    per_rank = GLOBAL_BATCH // world
    config = {
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": 1,
        "train_batch_size": GLOBAL_BATCH,
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": False,
            "contiguous_gradients": False,
            # ZeRO-3: every parameter really partitioned (train.zero3_persistence_threshold=0), none kept whole.
            **({"stage3_param_persistence_threshold": 0} if stage == 3 else {}),
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    if stage == 3 and world > 1:  # each rank holds a slice of every parameter, not a whole one
        assert all(p.ds_tensor.numel() < p.ds_numel for p in engine.module.parameters())

    def step(n: int) -> None:
        x = _batch(n)[rank * per_rank : (rank + 1) * per_rank]
        engine.backward(engine(x).pow(2).mean())
        engine.step()

    if mode == "save":
        for n in range(3):
            step(n)
        save_engine(engine, directory, "step-3")  # then the fourth step: the reference
    else:
        load_resized_engine(engine, directory, "step-3", rank)
    step(3)
    # Full weights after the fourth step (ZeRO-3 gathers them).
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items() if not k.startswith("frozen")}
    if rank == 0:
        torch.save({"weights": weights, "global_steps": engine.global_steps}, out)
    dist.destroy_process_group()


def _run(world: int, mode: str, directory, stage: int, port: int, out) -> dict:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, mode, str(directory), stage, port, str(out)), nprocs=world)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_checkpoint_of_two_ranks_continues_on_one_and_three(tmp_path, stage):
    reference = _run(2, "save", tmp_path / "ckpt", stage, 29641, tmp_path / "saved.pt")
    for world, port in ((1, 29643), (3, 29644)):
        resized = _run(world, "resized", tmp_path / "ckpt", stage, port, tmp_path / f"resized{world}.pt")
        assert resized["global_steps"] == reference["global_steps"] == 4
        for key, value in reference["weights"].items():
            # A lost Adam state would show: the fourth step of a fresh AdamW moves every weight by ~lr.
            torch.testing.assert_close(resized["weights"][key], value, rtol=1e-5, atol=1e-6, msg=f"{world}: {key}")
