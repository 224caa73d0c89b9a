"""Training strategies: ddp (one all-reduce of the trainable gradients) and
DeepSpeed ZeRO; the same updates and one optimizer-state format for both."""
from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ray_jobs.strategy import make


class Toy(torch.nn.Module):
    """A projector and a body in two AdamW groups plus a frozen head. Sizes are
    odd so ZeRO's partitions of 2 workers cut through parameters."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.projector = torch.nn.Linear(7, 5)
        self.body = torch.nn.Sequential(torch.nn.Linear(5, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))
        self.head = torch.nn.Linear(3, 3)
        self.head.requires_grad_(False)

    def forward(self, y, image_features=None):
        return SimpleNamespace(loss=((self.head(self.body(self.projector(image_features))) - y) ** 2).mean())


def _build():
    model = Toy()
    groups = [{"params": list(model.projector.parameters()), "lr": 3e-2},
              {"params": list(model.body.parameters()), "lr": 1e-2}]
    opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2) / (1 + 0.1 * s))
    return model, opt, sched


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _scenario(first: str, second: str, world: int, rank: int, batches, load: bool = True) -> dict:
    """3 steps under ``first``, a checkpoint (weights, optimizer, scheduler),
    then 2 steps under ``second`` on a fresh model resumed from it."""
    model, opt, sched = _build()
    r = make(first, model, opt, sched, world=world, device="cpu", batch_size=4)
    losses = []
    for x, y in batches[:3]:
        loss = r.loss({"y": y}, x)
        r.step(loss)
        losses.append(loss.item())
    saved = _roundtrip({"optimizer": r.optimizer_state(), "scheduler": sched.state_dict(),
                        "weights": [p.detach().clone() for p in _trainable(model)]})
    kept = _roundtrip(saved["optimizer"])  # torch's load_state_dict shares tensors, which later steps change
    model2, opt2, sched2 = _build()
    with torch.no_grad():
        for p, w in zip(_trainable(model2), saved["weights"]):
            p.copy_(w)
    r2 = make(second, model2, opt2, sched2, world=world, device="cpu", batch_size=4)
    if load:
        r2.load_optimizer_state(saved["optimizer"])
        sched2.load_state_dict(saved["scheduler"])
    for x, y in batches[3:]:
        loss = r2.loss({"y": y}, x)
        r2.step(loss)
        losses.append(loss.item())
    return {"losses": losses, "saved_optimizer": kept,
            "weights": [p.detach().clone() for p in _trainable(model2)], "optimizer": _roundtrip(r2.optimizer_state()),
            "lr": sched2.get_last_lr()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(10 + rank)  # every worker its own data
    batches = [(torch.randn(4, 7, generator=g), 5 * torch.randn(4, 3, generator=g)) for _ in range(5)]
    results = {f"{a}>{b}": _scenario(a, b, world, rank, batches)
               for a, b in [("ddp", "ddp"), ("deepspeed", "deepspeed"), ("deepspeed", "ddp"), ("ddp", "deepspeed")]}
    results["deepspeed>deepspeed, optimizer not restored"] = _scenario("deepspeed", "deepspeed", world, rank, batches,
                                                                       load=False)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path_factory.mktemp("strategy") / "results.pt")
    mp.spawn(_worker, args=(2, port, out), nprocs=2)
    return torch.load(out, weights_only=False)


def _close(a, b, tol):
    return all(torch.allclose(x, y, rtol=tol, atol=tol) for x, y in zip(a, b))


def test_zero_updates_match_ddp(two_workers):
    ref = two_workers["ddp>ddp"]
    zero = two_workers["deepspeed>deepspeed"]
    assert ref["losses"][0] == pytest.approx(zero["losses"][0])  # before any update
    assert zero["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert _close(zero["weights"], ref["weights"], 1e-5)
    assert zero["lr"] == pytest.approx(ref["lr"])
    # the updates are not trivially equal: the weights moved and gradients were clipped to norm 1
    moved = max((w - p).abs().max().item() for w, p in zip(ref["weights"], _trainable(Toy())))
    assert moved > 1e-2


def test_zero_optimizer_state_is_adamw_state_dict(two_workers):
    ref = two_workers["ddp>ddp"]["saved_optimizer"]
    zero = two_workers["deepspeed>deepspeed"]["saved_optimizer"]
    strip = [{k: v for k, v in g.items() if k != "params"} for g in ref["param_groups"]]
    assert [{k: v for k, v in g.items() if k != "params"} for g in zero["param_groups"]] == strip
    assert [g["params"] for g in zero["param_groups"]] == [g["params"] for g in ref["param_groups"]]
    assert sorted(zero["state"]) == sorted(ref["state"]) == list(range(6))
    for i, entry in ref["state"].items():
        assert float(zero["state"][i]["step"]) == float(entry["step"]) == 3
        for key in ("exp_avg", "exp_avg_sq"):
            assert zero["state"][i][key].shape == entry[key].shape
            torch.testing.assert_close(zero["state"][i][key], entry[key], rtol=1e-5, atol=1e-8)
    # and a fresh torch AdamW loads it
    model, opt, _ = _build()
    opt.load_state_dict(zero)


@pytest.mark.parametrize("path", ["deepspeed>deepspeed", "deepspeed>ddp", "ddp>deepspeed"])
def test_resume_continues_across_strategies(two_workers, path):
    ref = two_workers["ddp>ddp"]
    got = two_workers[path]
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert _close(got["weights"], ref["weights"], 1e-5)
    for i, entry in ref["optimizer"]["state"].items():
        assert float(got["optimizer"]["state"][i]["step"]) == 5
        torch.testing.assert_close(got["optimizer"]["state"][i]["exp_avg"], entry["exp_avg"], rtol=1e-5, atol=1e-8)


def test_resume_without_the_optimizer_state_would_differ(two_workers):
    """The comparisons above can fail: without the restored optimizer state the
    weights after the checkpoint differ by far more than their tolerance."""
    ref = two_workers["ddp>ddp"]
    fresh = two_workers["deepspeed>deepspeed, optimizer not restored"]
    assert fresh["losses"][:3] == pytest.approx(ref["losses"][:3], rel=1e-5)
    assert not _close(fresh["weights"], ref["weights"], 1e-3)


def test_ddp_does_not_import_deepspeed():
    code = """
import json, sys, types
import torch
from ray_jobs import strategy, train

class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, y, image_features=None):
        return types.SimpleNamespace(loss=((self.lin(image_features) - y) ** 2).mean())

model = M()
opt = torch.optim.AdamW(model.parameters(), lr=0.1)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
r = strategy.make("ddp", model, opt, sched, world=1, device="cpu", batch_size=2)
before = model.lin.weight.detach().clone()
r.step(r.loss({"y": torch.zeros(2, 1)}, torch.ones(2, 3)))
assert not torch.equal(before, model.lin.weight)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "deepspeed")))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


def test_deepspeed_skips_the_shared_memory_op_build():
    """Without the flag, DeepSpeed's first init_distributed on CPU compiles a
    shared-memory collective op (over a minute)."""
    from ray_jobs.strategy import import_deepspeed

    import_deepspeed()
    from deepspeed.comm.torch import build_shm_op

    assert build_shm_op() is None


def test_deepspeed_config_rejects_stage_3():
    from ray_jobs.strategy import deepspeed_config

    assert deepspeed_config(8, 2, gpu=False)["zero_optimization"]["stage"] == 2
    assert deepspeed_config(8, 1, gpu=True)["torch_autocast"]["enabled"]
    with pytest.raises(ValueError, match="stage"):
        deepspeed_config(8, 3, gpu=False)
