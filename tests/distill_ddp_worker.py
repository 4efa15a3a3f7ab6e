"""Run by tests/test_distill.py: Distiller.fit under DistributedDataParallel with two gloo ranks
on the CPU, each given half of every batch, against one process on the full batches. Prints
"DDP OK" when both ranks end with identical parameters equal to the single-process ones."""

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package
from mapopt_native.distill import Distiller  # noqa: E402

WORLD = 2


def models():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    student = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    return teacher, student


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))
            for _ in range(6)]


def train(loader, wrap=False):
    """Student and adapter parameters after two epochs: SGD given for the student, the adapter
    (student width 6 -> teacher 16) created on the first batch and added by fit. wrap: the
    student comes wrapped in DistributedDataParallel by the caller (else fit wraps it)."""
    teacher, student = models()
    if wrap:
        student = nn.parallel.DistributedDataParallel(student)
    d = Distiller(teacher, student, alpha=0.5, distance="kl", temperature=2.0,
                  features={"1": "1"}, feature_weights=[0.5])
    opt = torch.optim.SGD(student.parameters(), lr=0.2)
    d.fit(loader, epochs=2, optimizer=opt, progress=False)
    return {k.replace("student.module.", "student."): v.detach().clone()
            for k, v in d.trainable.state_dict().items()}


def rank_main(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    half = 8 // WORLD
    local = [(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
             for x, y in batches()]
    for wrap in (False, True):
        torch.save(train(local, wrap), f"{out_dir}/rank{rank}_{wrap}.pt")
    dist.barrier()
    dist.destroy_process_group()
    # Results are on disk: skip interpreter teardown, where gloo's worker threads can still race
    # the finalisation of tensors they hold (a SIGABRT about one run in a few on this machine).
    os._exit(0)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(rank_main, args=(f"{tmp}/init", tmp), nprocs=WORLD, join=True)
        runs = {wrap: [torch.load(f"{tmp}/rank{r}_{wrap}.pt") for r in range(WORLD)]
                for wrap in (False, True)}
    torch.set_num_threads(1)
    single = train(batches())
    for wrap, ranks in runs.items():
        assert set(ranks[0]) == set(single) and any(k.startswith("adapters") for k in single)
        for key, value in single.items():
            assert torch.equal(ranks[0][key], ranks[1][key]), f"ranks differ in {key}"
            torch.testing.assert_close(
                ranks[0][key], value, rtol=1e-5, atol=1e-6,
                msg=lambda m: f"{key} (wrapped by the caller: {wrap}): DDP vs one process: {m}")
    print("DDP OK")


if __name__ == "__main__":
    main()
