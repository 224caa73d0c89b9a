"""How the training workers keep their replicas in step (``--strategy``).

``ddp`` (default): every worker holds the whole optimizer; after each backward
pass the gradients of the trainable parameters (projector, LoRA) are averaged
across workers in one flat all-reduce, then clipped and applied. The frozen
base model never crosses the network.

``deepspeed``: DeepSpeed ZeRO (stage 2 by default, ``--zero-stage``)
partitions the optimizer state and the averaged gradients of the trainable
parameters across workers and all-gathers the updated weights after each step.
It reuses the process group Ray Train set up (gloo on CPU, NCCL on GPU), keeps
the same AdamW parameter groups, learning-rate schedule and gradient clipping,
computes in bf16 autocast on GPU and fp32 on CPU, exactly like ``ddp``.

Both give the optimizer state in the format of ``torch.optim.AdamW.state_dict()``
(for ZeRO gathered from the partitions of every worker), so a checkpoint
written under one strategy resumes under the other and at another worker
count. DeepSpeed is imported only when chosen.
"""
from __future__ import annotations

import torch

CLIP_NORM = 1.0
STRATEGIES = ("ddp", "deepspeed")


def make(name: str, model, opt, sched, *, world: int, device: str, batch_size: int, zero_stage: int = 2):
    if name == "ddp":
        return AllReduce(model, opt, sched, world=world, device=device)
    if name == "deepspeed":
        return DeepSpeedZero(model, opt, sched, device=device, batch_size=batch_size, zero_stage=zero_stage)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")


def _autocast(device: str):
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


class AllReduce:
    """Data parallel by one all-reduce of the trainable gradients per step."""

    def __init__(self, model, opt, sched, *, world: int, device: str):
        self.model, self.opt, self.sched, self.world, self.device = model, opt, sched, world, device
        self.params = [p for g in opt.param_groups for p in g["params"]]

    def loss(self, batch: dict, image_features):
        with _autocast(self.device):
            return self.model(**batch, image_features=image_features).loss

    def step(self, loss) -> None:
        loss.backward()
        all_reduce_grads(self.params, self.world)
        torch.nn.utils.clip_grad_norm_(self.params, CLIP_NORM)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def optimizer_state(self) -> dict:
        return self.opt.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.opt.load_state_dict(state)


def all_reduce_grads(params, world: int) -> None:
    """Average the gradients of ``params`` across workers (a missing one counts as zero)."""
    import torch.distributed as dist

    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(p.dtype)
        offset += n


def deepspeed_config(batch_size: int, zero_stage: int, gpu: bool) -> dict:
    """ZeRO with the client AdamW and schedule; bf16 autocast on GPU, fp32 on CPU."""
    if zero_stage not in (1, 2):
        raise ValueError(f"--zero-stage must be 1 or 2 (stage 3 would partition the weights it saves), got {zero_stage}")
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP_NORM,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW with the job's parameter groups
        "bf16": {"enabled": False},  # weights and optimizer stay fp32, as with ddp
        # gradients are averaged in fp32 (no module is "lower precision safe"), as with ddp
        "torch_autocast": {"enabled": gpu, "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def import_deepspeed():
    """``import deepspeed`` without the shared-memory collective op, which the
    first ``init_distributed`` would otherwise JIT-compile (over a minute on
    CPU) although Ray Train's gloo/NCCL group does the communication."""
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class DeepSpeedZero:
    """DeepSpeed ZeRO-1/2 over Ray Train's process group."""

    def __init__(self, model, opt, sched, *, device: str, batch_size: int, zero_stage: int = 2):
        deepspeed = import_deepspeed()
        # the parameter lists of the AdamW groups, before ZeRO replaces them by flat partitions
        self.groups = [list(g["params"]) for g in opt.param_groups]
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
        self.engine, self.opt, _, self.sched = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, dist_init_required=False,
            config=deepspeed_config(batch_size, zero_stage, gpu=device == "cuda"))
        self.base = opt  # the torch AdamW inside ZeRO; one flat fp32 partition per group

    def loss(self, batch: dict, image_features):
        return self.engine(**batch, image_features=image_features).loss  # the engine applies autocast

    def step(self, loss) -> None:
        self.engine.backward(loss)
        self.engine.step()  # reduce-scatter, clip, AdamW on this worker's partition, scheduler, all-gather

    def _flat(self, g: int) -> torch.Tensor:
        return self.base.param_groups[g]["params"][0]

    def _state_keys(self, g: int) -> list[str]:
        flat = self._flat(g)
        st = self.base.state.get(flat, {})
        return sorted(k for k, v in st.items() if torch.is_tensor(v) and v.shape == flat.shape)

    def optimizer_state(self) -> dict:
        """The full optimizer state as ``AdamW.state_dict()`` would give it.
        Collective: every worker must call it."""
        from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_get_full_optimizer_state

        state, param_groups, index = {}, [], 0
        for g, params in enumerate(self.groups):
            flat_state = self.base.state.get(self._flat(g), {})
            keys = self._state_keys(g)
            if keys:  # (re)link each parameter to its slice of the moments: ZeRO links them
                # after stepping its first group, before the later groups have any state
                lazy_init_hp_params_optimizer_state(params, self._flat(g), self.base.state)
            ids = []
            for p in params:
                if keys:
                    entry = {k: safe_get_full_optimizer_state(p, k).detach().to("cpu", torch.float32).clone()
                             for k in keys}
                    entry["step"] = flat_state["step"].detach().cpu().clone()
                    state[index] = entry
                ids.append(index)
                index += 1
            hyper = {k: v for k, v in self.base.param_groups[g].items() if k != "params"}
            param_groups.append({**hyper, "params": ids})
        return {"state": state, "param_groups": param_groups}

    def load_optimizer_state(self, saved: dict) -> None:
        """Load an ``AdamW.state_dict()`` (from either strategy): each worker
        keeps the slice of every moment that its partition owns."""
        from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_set_full_optimizer_state

        groups = saved["param_groups"]
        sizes = [len(g["params"]) for g in groups]
        if sizes != [len(g) for g in self.groups]:
            raise ValueError(f"optimizer state has parameter groups of sizes {sizes}, "
                             f"this model {[len(g) for g in self.groups]}")
        for g, (params, saved_group) in enumerate(zip(self.groups, groups)):
            self.base.param_groups[g].update({k: v for k, v in saved_group.items() if k != "params"})
            entries = [saved["state"].get(i) for i in saved_group["params"]]
            present = [e for e in entries if e]
            if not present:
                continue
            flat = self._flat(g)
            keys = sorted(k for k, v in present[0].items() if k != "step" and torch.is_tensor(v))
            self.base.state[flat] = {"step": torch.as_tensor(present[0]["step"], dtype=torch.float32).clone(),
                                     **{k: torch.zeros_like(flat) for k in keys}}
            lazy_init_hp_params_optimizer_state(params, flat, self.base.state)
            for p, e in zip(params, entries):
                for k in keys:
                    value = e[k] if e else torch.zeros(p.shape)
                    safe_set_full_optimizer_state(p, value.to(flat.device, flat.dtype), k)
