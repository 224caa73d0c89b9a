"""Ray Train jobs: stage 1 trains the projector (Phi-3 and CLIP frozen), stage 2
instruction-tunes Phi-3 with (Q)LoRA together with the projector.

    mmphi train projector --data D --embeddings E --out RUNS [--name N] [--workers 2] [--gpu]
    mmphi train qlora     --data D --embeddings E --init RUNS/N/final --out RUNS [...]
    mmphi train plan PLAN.yaml                # several runs in order in one Ray Train run (ray_jobs.plan)
    python -m ray_jobs.train qlora ...        # the same, for `ray job submit -- ...`

Each worker reads its own shard of the samples (features from the embedding
job, never JPEGs), batches them by length (or, with ``--packing``, packs whole
conversations into rows of ``max_length`` tokens), computes the loss on answer
tokens only, in chunks (``ray_jobs.packing``), and averages the trainable
gradients (LoRA + projector) across workers after every backward pass
(``--strategy ddp``, the default) or partitions them and the optimizer state
with DeepSpeed ZeRO-2 (``--strategy deepspeed``; see ``ray_jobs.strategy``). Every
``--ckpt-every`` steps and at the end, rank 0 reports a checkpoint to Ray
Train: the model checkpoint folder (projector, PEFT adapter, tokenizer,
config) plus ``train_state.pt`` (optimizer, scheduler, step, data position).
A worker failure restarts all workers from the last checkpoint
(``FailureConfig``); running the same command with the same ``--name`` and
``--out`` resumes the run, a finished run does no more steps.

Outputs in ``OUT/NAME/``: Ray Train's ``checkpoint_*`` folders, ``final/`` (the
model checkpoint, loadable with ``MultimodalPhi3.from_checkpoint`` or plain
transformers + peft from ``final/adapter``), ``metrics.jsonl``, ``curves.png``
and ``summary.json``. Several runs in order (``run_sequence``, a plan file)
share one worker group; the later runs' checkpoints are in the first run's
folder, ``checkpoint_NAME_<time>``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from models.options import COMPILE_MODES, KERNELS, LAST_LAYER, LORA_FORWARDS, check_last_layer, compile_mode

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    stage: str
    data: str
    embeddings: str
    out: str
    name: str | None = None
    init: str | None = None
    preset: str = "tiny"
    overrides: list[str] = field(default_factory=list)
    workers: int = 1
    gpu: bool = False
    cpus_per_worker: float = 1.0
    steps: int = 200
    batch_size: int = 16  # conversations per step; with packing, rows of up to max_length tokens per step
    lr: float = 2e-3
    projector_lr_scale: float = 3.0  # the projector's learning rate is lr x this
    warmup: int = 20
    weight_decay: float = 0.0
    eval_every: int = 100
    ckpt_every: int = 50
    eval_samples: int = 400
    blind_eval: bool = True  # at the end, answer accuracy again with every image replaced by the training mean
    max_failures: int = 2
    seed: int = 0
    threads: int | None = None
    address: str | None = None
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # custom Ray resources, e.g. {"train_gpu": 1}
    strategy: str = "ddp"  # or "deepspeed" (ZeRO)
    zero_stage: int = 2
    # several whole conversations per row, block-diagonal attention (ray_jobs.packing)
    packing: bool = False
    # LM head + cross-entropy on answer tokens only, this many tokens at a time; 0: the model's own loss
    loss_chunk: int = 1024
    # with the chunked loss, the last decoder layer at answer positions only (ray_jobs.packing) | all
    last_layer: str = "answers"
    # fused kernels (models.kernels): none | native (RMSNorm through torch's fused rms_norm, rotary in 3 kernels) |
    # liger (Liger Kernel's RMSNorm, SwiGLU and rotary embedding; GPUs only)
    kernels: str = "native"
    # LoRA layers' forward (models.lora_forward): fused (adapter matmuls in the compute dtype, one GEMM adds
    # the update) | peft (PEFT's own: fp32 adapter path, clone, casts)
    lora_forward: str = "fused"
    # torch.compile every decoder layer for training steps (models.kernels.compile_layers); evaluation runs eagerly.
    # auto: on CUDA with ddp when Triton and a C compiler are there (models.kernels.resolve_compile) | on | off
    compile: str = "auto"

    def __post_init__(self) -> None:
        self.check_numbers()

    def check_numbers(self) -> None:
        """A clear ``SettingsError`` for a number the job cannot run with, named
        as its flag (``steps`` is ``--steps``): raised where the settings are
        made, before any Ray start-up."""
        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        def integer(name: str, least: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise SettingsError(f"{flag(name)} must be an integer of {least} or more, got {v!r}")

        def number(name: str, positive: bool) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                    or (positive and v == 0):
                raise SettingsError(f"{flag(name)} must be a finite number {'above' if positive else 'of'} 0"
                                    f"{'' if positive else ' or more'}, got {v!r}")

        for name in ("steps", "batch_size", "workers", "eval_every", "ckpt_every", "eval_samples"):
            integer(name, 1)
        integer("warmup", 0)  # 0: no warm-up, the cosine schedule from the first step
        integer("loss_chunk", 0)  # 0: the model's own loss
        integer("max_failures", -1)  # -1: restart without limit (Ray Train's FailureConfig)
        if self.threads is not None:
            integer("threads", 1)
        number("lr", positive=True)
        for name in ("projector_lr_scale", "weight_decay", "cpus_per_worker"):
            number(name, positive=False)

    def run_name(self) -> str:
        return self.name or f"{Path(self.data).name}-{self.stage}"


def check_run_name(name: str | None) -> None:
    """Raise ValueError unless ``name`` (None: the default DATA-STAGE) names a
    folder inside --out: not blank, no surrounding spaces, and no absolute
    path, backslash, empty part, '.' or '..' (which would put the run
    elsewhere, or outside --out)."""
    if name is None:
        return
    if not name.strip():
        raise ValueError("--name is blank: give a run name, or leave --name out for the default DATA-STAGE")
    parts = name.split("/")
    if name != name.strip() or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"--name {name!r} must name a folder inside --out, like s1 or exp/s1: parts joined by "
                         "single '/' (none at the start or end), none of them '.' or '..', no backslash, "
                         "no spaces around it")


# what decides a run's numbers: a resumed or reused run whose command changes one of them is told so
RECIPE = ("stage", "data", "embeddings", "init", "preset", "overrides", "workers", "batch_size", "packing", "lr",
          "projector_lr_scale", "warmup", "weight_decay", "seed", "loss_chunk", "last_layer")


def recipe(s: TrainSettings) -> dict:
    """The settings of ``s`` that decide what it trains (``RECIPE``), as JSON values."""
    return json.loads(json.dumps({k: getattr(s, k) for k in RECIPE}))


def note_changed_recipe(s: TrainSettings, outputs) -> list[str]:
    """Record a new run's recipe in its ``settings.json``; for a run started
    before, say on stderr which settings this command changes (the steps
    already trained used the recorded ones; a finished run is reused as it
    is). Returns the changes, as ``"lr: 0.002 -> 0.5"``."""
    now = recipe(s)
    before = outputs.started_settings()
    if before is None:
        outputs.record_start({**now, "steps": s.steps})
        return []
    changes = [f"{k}: {before[k]!r} -> {now[k]!r}" for k in RECIPE if k in before and before[k] != now[k]]
    if changes:
        print(f"mmphi train: {s.run_name()} was started with other settings ({'; '.join(changes)}). The steps it "
              "has trained keep those; the rest use this command's (a finished run is reused as it is). Give "
              "another --name to train with these settings from the start.", file=sys.stderr, flush=True)
    note_new_schedule(s, outputs, before)
    return changes


def note_new_schedule(s: TrainSettings, outputs, before: dict) -> None:
    """A run resumed with another ``--steps`` than it last trained for lays
    its warm-up + cosine schedule over the new total from where it stopped:
    say so with the learning rate's jump, and record the new total."""
    planned = before.get("steps")
    if not isinstance(planned, int) or planned == s.steps:
        return
    newest = outputs.newest_checkpoint()
    done = max(outputs.final_step() or 0, newest[0] if newest else 0)
    if done == 0 or done >= s.steps:  # nothing trained yet, or a finished run reused as it is
        return
    warmup = before.get("warmup") if isinstance(before.get("warmup"), int) else s.warmup
    was, now = _lr_lambda(warmup, planned)(done), _lr_lambda(s.warmup, s.steps)(done)
    if f"{was:.0%}" == f"{now:.0%}":
        effect = f" (the learning rate at step {done} stays {now:.0%} of --lr)"
    else:
        effect = (f", so the learning rate goes from {was:.0%} to {now:.0%} of --lr at step {done}"
                  f"{' and decays again from there' if now > was else ''}")
    print(f"mmphi train: {s.run_name()} resumes at step {done} with --steps {s.steps} where it was planned for "
          f"{planned}: its learning-rate schedule (warm-up, then cosine down to 10 % of --lr) is laid over "
          f"{s.steps} steps from here{effect}.", file=sys.stderr, flush=True)
    outputs.record_settings({**before, "steps": s.steps})


class SettingsError(ValueError):
    """Training settings the job cannot run with, found on the driver before
    Ray starts (the command line prints it as one line)."""


# ------------------------------------------------------------------ worker side
def check_embeddings(cfg, store_identity: dict, where: str) -> None:
    """Refuse embeddings of another encoder than ``cfg``'s, naming each field
    as the embeddings have it and as the model expects it."""
    from models.checkpoint import assert_compatible, identity

    assert_compatible(store_identity, {"vision": identity(cfg)["vision"]}, f"embeddings {where}")


def _broadcast_from_rank0(params, world: int) -> None:
    import torch.distributed as dist

    if world > 1:
        for p in params:
            dist.broadcast(p.data, src=0)


def _sum_across(values: list[float], world: int) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return f


def make_optimizer(model, s: TrainSettings):
    """AdamW with the projector in its own group (``lr x projector_lr_scale``) and
    the warm-up + cosine schedule."""
    import torch

    params = model.trainable_parameters()
    proj = [p for p in model.projector.parameters() if p.requires_grad]
    proj_ids = {id(p) for p in proj}
    rest = [p for p in params if id(p) not in proj_ids]
    groups = [{"params": proj, "lr": s.lr * s.projector_lr_scale}] + ([{"params": rest, "lr": s.lr}] if rest else [])
    opt = torch.optim.AdamW(groups, lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(s.warmup, s.steps))
    return opt, sched


def epoch_plan(lengths: list[int], s: TrainSettings, max_len: int, epoch: int, rank: int, world: int) -> list:
    """This worker's steps for one epoch: sample indices per step (padded
    batches), or rows of sample indices per step (packing)."""
    from . import data as D
    from .packing import pack_batches

    if s.packing:
        return pack_batches(lengths, s.batch_size, max_len, s.seed, epoch, rank, world)
    return D.length_batches(lengths, s.batch_size, s.seed, epoch, rank, world)


def step_batch(encoded: list, step: list, pad_id: int, packing: bool):
    """The ``StepBatch`` of one entry of ``epoch_plan``."""
    from .packing import packed_batch, padded_batch

    return packed_batch(encoded, step, pad_id) if packing else padded_batch(encoded, step, pad_id)


ANSWER_TOKENS = 8  # generated for a held-out answer in words: the synthetic data's longest is 3 tokens


def answer_budget(tok, expected: dict) -> int:
    """Tokens to generate for a held-out answer like the assistant message
    ``expected``: ``ANSWER_TOKENS``, or for tool calls their text's length
    and a few more (a longer answer is wrong whatever follows)."""
    if not expected.get("tool_calls"):
        return ANSWER_TOKENS
    from models.tools import calls_text

    return len(tok.encode_text(calls_text(expected["tool_calls"]))) + 4


def answered(text: str, expected: dict) -> bool:
    """Whether a generated answer is the assistant message ``expected``: the
    same words (``normalise_answer``), or, for tool calls, the same calls (names
    and arguments as JSON values, in order) and no text beside them."""
    from data_pipelines.synthetic import normalise_answer

    if not expected.get("tool_calls"):
        return normalise_answer(text) == normalise_answer(expected["content"])
    from models.tools import CallStream, ToolCall, arguments_object

    items = CallStream().push(text, final=True)
    if not all(isinstance(x, ToolCall) for x in items):
        return False
    return [(c.name, json.loads(c.arguments)) for c in items] == \
        [(c["name"], arguments_object(c["arguments"])) for c in expected["tool_calls"]]


def evaluate(model, tok, val_enc, val_samples, feats, answer_samples, world: int, rank: int,
             batch_size: int, blind_mean=None, loss: bool = True) -> dict:
    """Validation loss, perplexity and token accuracy (``loss``) and per-type
    answer accuracy, each worker on its share of the validation set, summed
    across workers. The loss is Hugging Face's (the mean over supervised
    tokens), with logits at answer positions only (``ray_jobs.packing``), in
    batches of similar length."""
    import torch
    import torch.nn.functional as F

    from models.conversation import collate, encode_conversation
    from models.kernels import eager
    from models.language import base_causal_lm

    from .packing import answer_states

    def image_feats(images):
        if blind_mean is not None:
            return blind_mean.unsqueeze(0).expand(len(images), *blind_mean.shape) if images else None
        return feats.batch(images)

    model.eval()
    loss_sum = tok_right = tok_total = 0.0
    mine = sorted(range(rank, len(val_enc), world), key=lambda j: len(val_enc[j])) if loss else []
    head = base_causal_lm(model.llm).get_output_embeddings()
    with torch.no_grad(), eager():
        for i in range(0, len(mine), batch_size):
            idx = mine[i:i + batch_size]
            batch = collate([val_enc[j] for j in idx], tok.ids.pad)
            images = [val_samples[j].image for j in idx if val_samples[j].image]
            h, t = answer_states(model, **batch, image_features=image_feats(images))
            if t.numel():
                logits = head(h).float()
                loss_sum += float(F.cross_entropy(logits, t, reduction="sum"))
                tok_right += float((logits.argmax(-1) == t).sum())
                tok_total += t.numel()
        right: dict[str, float] = {}
        total: dict[str, float] = {}
        ans = answer_samples[rank::world]
        # answers in words and tool calls in batches of their own: a call's long prompt (the tools) and
        # its many tokens would pad and lengthen a batch of short questions
        words = [s for s in ans if not s.messages[-1].get("tool_calls")]
        calls = [s for s in ans if s.messages[-1].get("tool_calls")]
        for chunk in [g[i:i + batch_size] for g in (words, calls) for i in range(0, len(g), batch_size)]:
            enc = [encode_conversation(tok, s.messages[:-1], model.num_image_tokens, add_generation_prompt=True,
                                       tools=s.tools) for s in chunk]
            batch = collate(enc, tok.ids.pad, padding_side="left")
            gen = model.generate(batch["input_ids"], batch["attention_mask"], image_feats([s.image for s in chunk]),
                                 max_new_tokens=max(answer_budget(tok, s.messages[-1]) for s in chunk))
            for row, s in zip(gen, chunk):
                q = s.qtypes[0] if s.qtypes else "?"
                total[q] = total.get(q, 0) + 1
                right[q] = right.get(q, 0) + answered(tok.decode(row), s.messages[-1])
    qtypes = sorted(set(total) | {"colour", "shape", "position", "count", "size"})
    sums = _sum_across([loss_sum, tok_right, tok_total] + [right.get(q, 0) for q in qtypes]
                       + [total.get(q, 0) for q in qtypes], world)
    loss_sum, tok_right, tok_total = sums[:3]
    r, t = sums[3:3 + len(qtypes)], sums[3 + len(qtypes):]
    model.train()
    answers = {"answer_accuracy": {q: r[k] / t[k] for k, q in enumerate(qtypes) if t[k]},
               "answer_counts": {q: int(t[k]) for k, q in enumerate(qtypes) if t[k]}}
    if not loss:
        return answers
    if not tok_total:  # no answer token to score (an empty validation split): nothing measured, not a zero loss
        return {"val_loss": None, "perplexity": None, "token_accuracy": None, **answers}
    val_loss = loss_sum / tok_total
    return {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 50)),
            "token_accuracy": tok_right / tok_total, **answers}


def train_loop(config: dict) -> None:
    """The per-worker training function given to ``TorchTrainer``: the runs of
    ``config["runs"]`` in order, each one skipped when it is already trained
    (a restart after a failure resumes the run that was going on)."""
    import ray.train

    from models.config import config_from_dict

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank:  # one "Loading weights" bar per model load, not one per worker
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    _quiet_report_lines()
    for item in config["runs"]:
        _train_run(TrainSettings(**item["settings"]), config_from_dict(item["model_config"]), rank, world,
                   config["checkpoints"])


def _quiet_report_lines() -> None:
    """Ray Train logs each ``ray.train.report`` of each worker at INFO, with
    its metrics in full ("Reporting training result N: TrainingReport(...)
    from rank R"); the run's own evaluation lines say the same once. Its
    "Checkpoint successfully created at" lines stay. Nothing changes where
    Ray keeps that logger elsewhere."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    if isinstance(getattr(context, "logger", None), logging.Logger):
        context.logger.setLevel(logging.WARNING)


def _train_run(s: TrainSettings, cfg, rank: int, world: int, checkpoints: str) -> None:
    """One run on this worker: resume from its newest checkpoint, else start from
    ``s.init`` or a fresh model; train, evaluate, report checkpoints to Ray
    Train (into the run folder ``checkpoints``), and export ``final/``."""
    import ray.train
    import torch

    from data_pipelines import storage
    from data_pipelines.embed import EmbeddingStore
    from models.checkpoint import load_checkpoint
    from models.kernels import CompiledSteps, apply_kernels
    from models.lora_forward import fuse_lora
    from models.multimodal import MultimodalPhi3

    from . import data as D
    from . import strategy
    from .metrics import TrainMetrics
    from .outputs import RunOutputs
    from .packing import TrainingForward

    run_outputs = RunOutputs(s.out, s.run_name(), checkpoints)
    # every rank decides as rank 0 does, once rank 0 has exported the previous run's final/ (which this run
    # may start from): the all-reduce waits for it
    if _sum_across([float(rank == 0 and run_outputs.trained(s.steps))], world)[0]:
        if rank == 0:
            log.info("%s: trained before, step %s", s.run_name(), run_outputs.final_step())
        return
    if s.threads:
        torch.set_num_threads(s.threads)
    device = "cuda" if s.gpu and torch.cuda.is_available() else "cpu"
    torch.manual_seed(s.seed)  # every rank builds the same fresh LoRA / projector

    # resume: Ray Train's latest registered checkpoint, or a newer one it wrote but
    # had not registered yet when the workers died (the newest on storage wins)
    state = None
    newest = run_outputs.newest_checkpoint()
    registered = ray.train.get_checkpoint()
    if registered is not None and not run_outputs.wrote(registered.path):  # another run's, earlier in the sequence
        registered = None
    if newest is not None:
        d = run_outputs.local_copy(newest[1])
    elif registered is not None:
        d = registered.to_directory()
    if newest is not None or registered is not None:
        model = load_checkpoint(d, device=device, with_vision=False, trainable=True)
        state = torch.load(Path(d) / "train_state.pt", weights_only=False)
        resume_dir = d
    elif s.init:  # a sequence's later run on remote storage starts from a URI
        model = load_checkpoint(storage.local_folder(*storage.resolve(s.init)), device=device, with_vision=False, trainable=True,
                                overrides=[f"llm.lora.enabled={str(cfg.llm.lora.enabled).lower()}"] + s.overrides)
    else:
        model = MultimodalPhi3.from_config(cfg, device=device, with_vision=False, trainable=True)
    if s.stage == "projector":  # stage 1: only the projector learns
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("projector."))
    apply_kernels(model.llm, s.kernels, device)
    fuse_lora(model.llm, s.lora_forward)
    tok = model.tokenizer
    store = EmbeddingStore(s.embeddings)
    check_embeddings(model.cfg, store.identity, s.embeddings)

    train = D.load_samples(s.data, "train", s.stage)
    val = D.load_samples(s.data, "val", s.stage)
    answers = D.first_exchanges(D.load_samples(s.data, "val", "qlora"))[: s.eval_samples]
    feats = D.Features(store, [x.image for x in train + val + answers if x.image])
    if state is None and not s.init and model.projector.normalize:  # a fresh projector
        model.projector.set_feature_stats(*feats.stats([x.image for x in train if x.image]))
    max_len = model.cfg.tokenizer.max_length
    train_enc = D.encode_all(tok, train, model.num_image_tokens, max_len)
    val_enc = D.encode_all(tok, val, model.num_image_tokens, max_len)[: s.eval_samples]
    lengths = [len(e) for e in train_enc]
    plans = {0: epoch_plan(lengths, s, max_len, 0, rank, world)}
    spe = len(plans[0])
    if spe == 0:
        raise ValueError(f"{len(train)} training samples are too few for {world} workers x batch {s.batch_size}")

    params = model.trainable_parameters()
    _broadcast_from_rank0(params, world)  # replicas start identical, whatever each rank loaded
    torch.manual_seed(s.seed + 1000 * (rank + 1))  # dropout differs per rank
    opt, sched = make_optimizer(model, s)
    replicas = strategy.make(s.strategy, TrainingForward(model, s.loss_chunk, s.last_layer), opt, sched, world=world,
                             device=device, batch_size=s.batch_size, zero_stage=s.zero_stage)
    step = 0
    if state is not None:
        replicas.load_optimizer_state(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        torch.set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    steps = CompiledSteps.start(model.llm, s.compile, device, s.strategy, s.kernels,
                                zero_grad=lambda: opt.zero_grad(set_to_none=True))
    if rank == 0:  # logged, not printed: Ray Train's print patch shows a print twice on the driver
        log.info("%s: decoder layers %s (compile %s)", s.run_name(),
                 "compiled, the first steps compile" if steps.compiled else "eager", steps.reason)

    def train_step(inputs, image_features):
        loss = replicas.loss(inputs, image_features)
        replicas.step(loss)  # average gradients, clip to norm 1, AdamW, scheduler
        return loss

    start_step = step
    compile_reason = steps.reason
    run_outputs.register_worker(rank, start_step, device=device, compiled=steps.compiled, compile=compile_reason)
    outputs = run_outputs if rank == 0 else None
    if outputs is not None:
        outputs.truncate_metrics(after_step=step if step else -1)  # a start from step 0 writes its step-0 row again
    train_mean = feats.mean([x.image for x in train if x.image])

    def report(metrics: dict, final: bool = False) -> None:
        ckpt_dir = None
        rng = [torch.get_rng_state()]
        opt_state = replicas.optimizer_state()  # every rank: ZeRO gathers it from all partitions
        if rank == 0:
            ckpt_dir = tempfile.mkdtemp(prefix="mmphi-ckpt-")
            torch.save({"optimizer": opt_state, "scheduler": sched.state_dict(), "step": step,
                        "epoch": step // spe, "batch_index": step % spe, "rng": rng}, Path(ckpt_dir) / "train_state.pt")
            # last: its list of files and sizes (train_state.pt's too) tells a complete copy from one cut short
            model.save_checkpoint(ckpt_dir, extra={"stage": s.stage, "step": step, "run": s.run_name()})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None,
                         checkpoint_dir_name=checkpoint_dir_name(s.run_name(), checkpoints))
        if ckpt_dir:
            if final:
                outputs.export_final(ckpt_dir)
            shutil.rmtree(ckpt_dir, ignore_errors=True)

    live = TrainMetrics(s.run_name(), rank, s.steps, step)  # Prometheus, through Ray's metrics agent
    try:
        if step == 0:  # the loss before any update, every worker on its share
            first = evaluate(model, tok, val_enc, val, feats, [], world, rank, s.batch_size)
            live.evaluated(first)
            if outputs is not None:
                outputs.append({"step": 0, "val_loss": first["val_loss"], "time": time.time(),
                                "ln_vocab": math.log(model.llm.get_input_embeddings().weight.shape[0])})
        model.train()
        t_last, tokens = time.time(), 0
        running = []
        shown = ProgressLine(s.run_name(), s.steps, step) if rank == 0 else None
        while step < s.steps:
            epoch, index = divmod(step, spe)
            if epoch not in plans:
                plans = {epoch: epoch_plan(lengths, s, max_len, epoch, rank, world)}
            batch = step_batch(train_enc, plans[epoch][index], tok.ids.pad, s.packing)
            images = [train[i].image for i in batch.samples if train[i].image]
            loss = steps(train_step, batch.inputs, feats.batch(images))
            if steps.reason != compile_reason:  # compilation failed and the job went on eagerly
                compile_reason = steps.reason
                run_outputs.register_worker(rank, start_step, device=device, compiled=False, compile=compile_reason)
            step += 1
            running.append(loss.item())
            if outputs is not None:
                outputs.progress(step, running[-1])
            if shown is not None and (line := shown.step(step, running[-1])):
                log.info("%s", line)
            tokens += batch.real_tokens
            live.step(step, running[-1], batch.real_tokens, sched.get_last_lr()[-1])
            is_eval = step % s.eval_every == 0 or step == s.steps
            is_ckpt = step % s.ckpt_every == 0 or step == s.steps
            if is_eval or is_ckpt:
                train_loss = _sum_across([sum(running), len(running)], world)
                elapsed = time.time() - t_last
                metrics = {"step": step, "epoch": step / spe, "train_loss": train_loss[0] / max(train_loss[1], 1),
                           "lr": sched.get_last_lr()[-1],
                           "tokens_per_s": _sum_across([tokens], world)[0] / max(elapsed, 1e-9)}
                running, tokens = [], 0
                if is_eval:
                    metrics.update(evaluate(model, tok, val_enc, val, feats, answers, world, rank, s.batch_size))
                if step == s.steps and s.blind_eval:
                    blind = evaluate(model, tok, val_enc, val, feats, answers, world, rank, s.batch_size,
                                     blind_mean=train_mean, loss=False)
                    metrics["blind_answer_accuracy"] = blind["answer_accuracy"]
                if outputs is not None:
                    outputs.append(metrics | {"time": time.time()})
                if shown is not None:
                    log.info("%s", shown.line(step, metrics))
                live.evaluated(metrics)
                report({k: v for k, v in metrics.items() if not isinstance(v, dict)}, final=step == s.steps)
                t_last = time.time()  # tokens/s counts training steps only, not evaluation or checkpointing
    finally:
        live.close()
    if state is not None and state["step"] >= s.steps and outputs is not None and not outputs.has_final():
        outputs.export_final(resume_dir)


class ProgressLine:
    """Rank 0's progress on the console: a line at each evaluation or
    checkpoint (with the figures measured there) and at most every
    ``every_s`` seconds in between (the mean loss since the last line), each
    with the steps done, the steps per second of this fit and what is left."""

    def __init__(self, run: str, total: int, start_step: int, every_s: float = 30.0, clock=time.monotonic):
        self.run, self.total, self.start_step, self.every_s, self.clock = run, total, start_step, every_s, clock
        self.started = self.last = clock()
        self.losses: list[float] = []

    def step(self, step: int, loss: float) -> str | None:
        """Note a step's loss; the line to show when one is due."""
        self.losses.append(loss)
        if self.clock() - self.last < self.every_s or step >= self.total:
            return None
        return self.line(step, {"train_loss": sum(self.losses) / len(self.losses)})

    def line(self, step: int, metrics: dict) -> str:
        now = self.clock()
        self.last, self.losses = now, []
        done = step - self.start_step
        rate = done / max(now - self.started, 1e-9)
        parts = [f"{self.run}: step {step}/{self.total} ({100 * step / max(self.total, 1):.0f} %)"]
        for key, label in (("train_loss", "loss"), ("val_loss", "val loss")):
            if isinstance(metrics.get(key), (int, float)):
                parts.append(f"{label} {metrics[key]:.4f}")
        if isinstance(metrics.get("tokens_per_s"), (int, float)):
            parts.append(f"{metrics['tokens_per_s']:,.0f} tokens/s")
        if isinstance(metrics.get("lr"), (int, float)):
            parts.append(f"lr {metrics['lr']:.2e}")
        parts.append(f"{rate:.2f} steps/s")
        if step < self.total and done > 0:
            left = int((self.total - step) / rate)
            parts.append(f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left")
        return ", ".join(parts)


def checkpoint_dir_name(run: str, checkpoints: str) -> str | None:
    """The folder name of a checkpoint ``run`` reports: Ray Train's own
    (``checkpoint_<time>``) in the run's own folder; in another run's (a later
    run of a sequence) ``checkpoint_<run>_<time>``, so a listing shows whose
    it is."""
    if run == checkpoints:
        return None
    now = time.time()
    return f"checkpoint_{run}_{time.strftime('%Y-%m-%d_%H-%M-%S', time.localtime(now))}.{int(now % 1 * 1e6):06d}"


# ------------------------------------------------------------------ driver side
def run(s: TrainSettings) -> dict:
    """Run (or resume) one stage; returns the summary."""
    return run_sequence([s])[0]


# one worker group trains every run of a sequence: these settings must agree
SHARED = ("out", "workers", "gpu", "cpus_per_worker", "resources_per_worker", "strategy", "zero_stage",
          "max_failures", "address")


def run_sequence(runs: list[TrainSettings]) -> list[dict]:
    """Run (or resume) several runs in order in one Ray Train run, each after
    the first starting from the previous one's ``final/`` (its ``init``, set
    here when not given). One worker group, one start-up: a Ray Train run
    costs about 40 s before its first step on 2 CPU cores (controller, worker
    actors, process group, imports). Each run keeps its own ``OUT/NAME``
    folder; the later runs' Ray Train checkpoints go to the first run's folder
    (``checkpoint_<name>_<time>``), which is also where Ray Train keeps the
    sequence's state: the same sequence resumes where it stopped, runs that
    finished are not trained again. Returns one summary per run."""
    cfgs = prepare_sequence(runs)  # before Ray is imported: a wrong setting fails at once

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from data_pipelines.embed import init_ray, started_local_cluster
    from data_pipelines.resources import warn_if_absent

    from .outputs import RunOutputs

    names = [s.run_name() for s in runs]
    checkpoints = names[0]  # the Ray Train run folder: the sequence's state and checkpoints
    for s in runs:
        note_changed_recipe(s, RunOutputs(s.out, s.run_name(), checkpoints))
    summaries = []
    for s in runs:
        done = RunOutputs(s.out, s.run_name(), checkpoints).finished(s.steps)
        if done is None:
            break
        print(f"{s.run_name()}: finished at step {done['steps']} (asked {s.steps}); reusing {done['final']}", flush=True)
        summaries.append(done)
    todo = list(zip(runs, cfgs))[len(summaries):]
    if not todo:  # nothing to train: no Ray Train start-up
        return summaries
    s = runs[0]
    init_ray(s.address)
    warn_if_absent({**s.resources_per_worker, **({"GPU": 1} if s.gpu else {})}, s.workers, "Train workers")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # on the one machine that this process started no node can be drained, so no preemption watcher (an
    # actor per run), and the controller notices a finished or failed worker group within 0.5 s instead of
    # 2 s: together about 6 s less per run on 2 cores. Clusters the job joins keep Ray Train's defaults.
    local = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    t0 = time.time()
    with _env_defaults(local if started_local_cluster() else {}):  # read when the controller starts
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"runs": [{"settings": asdict(r), "model_config": c.to_dict()} for r, c in todo],
                               "checkpoints": checkpoints},
            torch_config=TorchConfig(backend="nccl" if s.gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=s.workers, use_gpu=s.gpu,
                                         resources_per_worker={"CPU": s.cpus_per_worker, **s.resources_per_worker}),
            run_config=RunConfig(name=checkpoints, storage_path=s.out,
                                 failure_config=FailureConfig(max_failures=s.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        trainer.fit()
    started, fit_end = t0, time.time()
    for k, (r, _) in enumerate(todo):  # each run's seconds: from the end of the one before (or the start) to its
        outputs = RunOutputs(r.out, r.run_name(), checkpoints)  # last evaluation (the last run: to the fit's end)
        ended = fit_end if k == len(todo) - 1 else max([row.get("time", 0) for row in outputs.metrics()] + [started])
        newest = outputs.newest_checkpoint()
        summaries.append(outputs.write_summary(settings=asdict(r), seconds=ended - started,
                                               checkpoint=newest[1] if newest else None))
        outputs.plot()
        started = ended
    return summaries


def prepare_sequence(runs: list[TrainSettings]) -> list:
    """Check every run of a sequence on the driver, before Ray starts (its
    numbers, choices, ``init``, data set and embeddings: what the workers
    would otherwise refuse only after the Ray Train start-up), make their
    paths absolute and chain them; returns their model configs. A
    ``SettingsError`` names the problem (a ``ConfigError`` stays one)."""
    from models.config import ConfigError

    try:
        if not runs:
            raise ValueError("a sequence needs at least one run")
        cfgs = []
        for k, s in enumerate(runs):
            s.check_numbers()  # settings changed since they were made
            cfgs.append(_prepare(s, cfgs[-1] if k else None))
            if k:
                _chain(runs[k - 1], s, k)
        names = [s.run_name() for s in runs]
        if len(set(names)) < len(names):
            raise ValueError(f"the runs of a sequence need different names, got {names}")
        for s, cfg in zip(runs, cfgs):
            _check_inputs(s, cfg)
    except (ConfigError, SettingsError):
        raise
    except (ValueError, FileNotFoundError) as e:
        raise SettingsError(str(e)) from e
    return cfgs


def _check_inputs(s: TrainSettings, cfg) -> None:
    """Read the data set and the embeddings' manifest as the workers do (so
    with the same errors): a missing or unreadable folder, file or manifest,
    or embeddings of another encoder, fails here at once. The shards are
    not read."""
    from data_pipelines.embed import EmbeddingStore

    from . import data as D

    train = D.load_samples(s.data, "train", s.stage)
    if len(train) < s.workers:  # the workers would refuse it after the Ray Train start-up, on every retry
        which = " with an image (stage 1 trains on those alone)" if s.stage == "projector" else ""
        raise ValueError(f"the train split of {s.data} has {len(train)} conversation(s){which}: "
                         f"{s.workers} worker(s) need at least one each")
    if not D.load_samples(s.data, "val", s.stage):
        print(f"mmphi train: {s.run_name()}: the val split of {s.data} is empty: the run trains, but measures "
              "no validation loss or answer accuracy", file=sys.stderr, flush=True)
    check_embeddings(cfg, EmbeddingStore(s.embeddings).identity, s.embeddings)


def _chain(prev: TrainSettings, s: TrainSettings, k: int) -> None:
    """Check that run ``k`` of a sequence can share ``prev``'s worker group and
    set its ``init`` to ``prev``'s ``final/``."""
    from data_pipelines import storage

    for f in SHARED:
        if getattr(s, f) != getattr(prev, f):
            raise ValueError(f"the runs of a sequence share one worker group: run {k + 1} ({s.run_name()}) has "
                             f"{f}={getattr(s, f)!r}, run {k} ({prev.run_name()}) {f}={getattr(prev, f)!r}")
    final = storage.join(prev.out, prev.run_name(), "final")  # prev.out is absolute, or a URI that stays one
    if s.init is not None and s.init != final:
        raise ValueError(f"run {k + 1} of a sequence ({s.run_name()}) starts from run {k}'s final checkpoint "
                         f"{final}, not from --init {s.init}")
    s.init = final


def _prepare(s: TrainSettings, prev_cfg=None):
    """Check ``s`` (a clear error before any worker starts), make its paths
    absolute and return its model config: ``prev_cfg`` (the run before in a
    sequence) or its ``init``'s, with its overrides, else its preset's."""
    from data_pipelines.resources import check_resources
    from data_pipelines.storage import check_output_folder
    from models.config import apply_overrides, load_config

    from .strategy import STRATEGIES

    if s.stage not in ("projector", "qlora"):
        raise ValueError(f"stage must be 'projector' or 'qlora', got {s.stage!r}")
    check_run_name(s.name)
    try:
        s.resources_per_worker = check_resources(s.resources_per_worker, RESOURCE_HINTS)
    except ValueError as e:
        raise ValueError(f"--resources-per-worker: {e}") from None
    if s.strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {s.strategy!r}")
    if s.kernels not in KERNELS:
        raise ValueError(f"--kernels must be one of {', '.join(KERNELS)}, got {s.kernels!r}")
    if s.lora_forward not in LORA_FORWARDS:
        raise ValueError(f"--lora-forward must be one of {', '.join(LORA_FORWARDS)}, got {s.lora_forward!r}")
    check_last_layer(s.last_layer, "--last-layer")
    s.compile = compile_mode(s.compile)
    if s.kernels == "liger" and not s.gpu:
        raise ValueError(f"--kernels {s.kernels} runs on GPUs only: add --gpu, or leave --kernels none")
    if prev_cfg is not None:
        cfg = apply_overrides(prev_cfg.to_dict(), s.overrides)
    elif s.init:
        from models.checkpoint import checkpoint_config, read_meta

        # fails clearly on a wrong folder, and on overrides that the checkpoint's weights would not follow
        cfg = checkpoint_config(s.init, read_meta(s.init), s.overrides)
    else:
        cfg = load_config(s.preset, s.overrides)
    cfg.llm.lora.enabled = s.stage == "qlora"  # stage 1 trains the projector alone
    check_output_folder(s.out, "--out")
    s.out = str(Path(s.out).resolve()) if "://" not in s.out else s.out
    s.data, s.embeddings = str(Path(s.data).resolve()), str(Path(s.embeddings).resolve()) if "://" not in s.embeddings else s.embeddings
    if s.init and "://" not in s.init:
        s.init = str(Path(s.init).resolve())
    return cfg


@contextlib.contextmanager
def _env_defaults(values: dict[str, str]):
    """Environment variables set for the block where the user has not set them."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


RESOURCE_HINTS = {"CPU": "--cpus-per-worker", "GPU": "--gpu"}


def add_arguments(p: argparse.ArgumentParser, stage: str | None = None) -> None:
    from data_pipelines.resources import ResourcesAction

    p.add_argument("--data", required=True, help="data set folder (train.json, val.json, images/)")
    p.add_argument("--embeddings", required=True, help="output folder of the embedding job for this data set")
    p.add_argument("--out", required=True, help="runs folder (local or s3://...): the run goes to OUT/NAME")
    p.add_argument("--name", help="run name (default: DATA-STAGE); the same name resumes")
    if stage != "projector":
        p.add_argument("--init", help="stage-1 checkpoint folder (OUT/NAME/final) to start from")
    p.add_argument("--preset", default="tiny", help="model preset when not starting from --init")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--strategy", choices=("ddp", "deepspeed"), default="ddp",
                   help="ddp: all-reduce the trainable gradients; deepspeed: ZeRO partitions them and the optimizer state")
    p.add_argument("--zero-stage", type=int, choices=(1, 2), default=2, help="ZeRO stage with --strategy deepspeed")
    p.add_argument("--packing", action="store_true",
                   help="pack whole conversations into --batch-size rows of up to max_length tokens per step "
                        "(block-diagonal attention; a step then holds a varying number of conversations)")
    p.add_argument("--loss-chunk", type=int, default=1024,
                   help="LM head + cross-entropy on answer tokens only, this many at a time (0: the model's own loss)")
    p.add_argument("--last-layer", choices=LAST_LAYER, default="answers",
                   help="with the chunked loss, run the last decoder layer's queries, attention and MLP at answer "
                        "positions only (answers, the default: the same loss and gradients, less work), or everywhere")
    p.add_argument("--kernels", choices=KERNELS, default="native",
                   help="fused kernels: native (the default: every RMSNorm as torch's fused rms_norm, the rotary "
                        "embedding in three kernels), liger "
                        "(Liger Kernel's RMSNorm, SwiGLU and rotary embedding; pip install liger-kernel; needs --gpu) "
                        "or none (Phi-3's own modules)")
    p.add_argument("--lora-forward", choices=LORA_FORWARDS, default="fused",
                   help="LoRA layers' forward: fused (adapter matmuls in the compute dtype, the update added by one "
                        "GEMM; same math, far less memory traffic) or peft (PEFT's own)")
    p.add_argument("--compile", nargs="?", const="on", default="auto", choices=COMPILE_MODES,
                   help="torch.compile every decoder layer for the training steps (dynamic shapes; the first steps "
                        "compile; evaluation runs eagerly). auto (the default): on with --gpu, --strategy ddp and "
                        "--kernels native or none "
                        "when Triton and a C compiler are there (1.8x the eager job's tokens/s on an H200), eager otherwise; "
                        "on (also plain --compile): always; off: never")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--resources-per-worker", action=ResourcesAction, hints=RESOURCE_HINTS,
                   help="custom Ray resource per worker, repeatable, e.g. train_gpu=1: workers run only on "
                        "nodes that declare it (deploy/cluster.yaml's groups)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16, help="per worker: conversations per step (rows with --packing)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--projector-lr-scale", type=float, default=3.0, help="projector learning rate = lr x this")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--eval-samples", type=int, default=400)
    p.add_argument("--no-blind-eval", dest="blind_eval", action="store_false",
                   help="skip the final 'blind' answer accuracy (every image replaced by the training mean)")
    p.add_argument("--max-failures", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local cluster)")


def settings_from_args(stage: str, a: argparse.Namespace) -> TrainSettings:
    return TrainSettings(stage=stage, data=a.data, embeddings=a.embeddings, out=a.out, name=a.name,
                         resources_per_worker=dict(a.resources_per_worker or {}),
                         init=getattr(a, "init", None), preset=a.preset, overrides=a.overrides, workers=a.workers,
                         gpu=a.gpu, cpus_per_worker=a.cpus_per_worker, steps=a.steps, batch_size=a.batch_size,
                         lr=a.lr, projector_lr_scale=a.projector_lr_scale, warmup=a.warmup, eval_every=a.eval_every, ckpt_every=a.ckpt_every,
                         eval_samples=a.eval_samples, blind_eval=a.blind_eval, max_failures=a.max_failures, threads=a.threads,
                         seed=a.seed, address=a.address, strategy=a.strategy, zero_stage=a.zero_stage,
                         packing=a.packing, loss_chunk=a.loss_chunk, last_layer=a.last_layer, kernels=a.kernels,
                         lora_forward=a.lora_forward, compile=a.compile)


def main(stage: str, args: argparse.Namespace) -> int:
    """``projector`` and ``qlora``: one run from the flags; ``plan``: the runs of a plan file."""
    try:
        if stage == "plan":
            from .plan import load_plan

            summaries = run_sequence(load_plan(args.plan))
        else:
            summaries = [run(settings_from_args(stage, args))]
    except SettingsError as e:
        print(f"mmphi train: {e}", file=sys.stderr)
        return 2
    keys = ("run", "steps", "final", "answer_accuracy", "blind_answer_accuracy", "chance")
    shown = [{k: s[k] for k in keys if k in s} for s in summaries]
    print(json.dumps(shown[0] if stage != "plan" else shown, indent=2))
    return 0


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", help="YAML plan file: settings shared by every run, and 'runs', the runs in order "
                                "(see ray_jobs/plan.py)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    for st in ("projector", "qlora"):
        add_arguments(sub.add_parser(st), st)
    add_plan_arguments(sub.add_parser("plan", help="several runs in order in one Ray Train run, from a plan file"))
    logging.basicConfig(level=logging.INFO)
    a = parser.parse_args()
    raise SystemExit(main(a.stage, a))
