"""Training throughput: the stage-2 (QLoRA) job's step against a bare Hugging
Face + PEFT loop, same model, same conversations, same batch size, one run.

**Data.** Conversations in Phi-3's chat template (``models.conversation``,
the project's tokenizer, sentences from ``models.tokenizer.tiny_corpus``)
whose lengths are drawn like LLaVA-Instruct-150K's: text tokens from a
lognormal (median ``--median-text`` tokens, default 200 at a 1,024-token
context and proportionally less at a shorter one; sigma ``--sigma`` 0.6, so
the mean is 1.2 x the median and about 1 % are over 4 x the median), cut to
fit ``--max-len``; 90 % of them (``--image-share``) also carry one image, that
is the preset's ``num_image_tokens`` placeholders and a random feature tensor
of the encoder's shape (576 x 1024 for ViT-L/14-336). Many are a few hundred
tokens, a long tail reaches the limit. The JSON records the drawn lengths'
mean, median, 90th percentile and maximum. The real LLaVA file is not read
(no network): this is its shape, not its data.

**Baseline** (``hf_peft``): what a plain script does. ``AutoModelForCausalLM``
from the same weights folder (4-bit NF4 with double quantisation and
``prepare_model_for_kbit_training`` when the preset says ``load_in_4bit``,
gradient checkpointing when it says so), ``peft`` LoRA with the preset's
r / alpha / dropout / targets, a plain 2-layer GELU projector whose outputs
replace the image placeholders' embeddings, Hugging Face's own loss, AdamW
over LoRA + projector, gradient clipping at 1.0, bf16 autocast on a GPU.
Batches of ``--batch`` conversations in data order, every one padded to
``--max-len`` (``padding="max_length"``), and again padded to the longest in
the batch (``padding="longest"``).

**Job** (``job``): the Ray Train worker's own code path in one process
without Ray: ``MultimodalPhi3`` (``models``), ``ray_jobs.train.make_optimizer``,
the ``ddp`` strategy (autocast, clipping, AdamW, schedule), the worker's
``epoch_plan`` / ``step_batch`` and ``ray_jobs.packing.TrainingForward``. Its
default settings (length-bucketed batches of ``--batch`` conversations,
chunked loss), with ``--packing`` (``--batch`` rows of ``--max-len`` tokens
per step), with the model's own loss (``loss_chunk=0``), and one side per
default it measures: PEFT's LoRA forward (``job_peft_lora``), Phi-3's own
RMSNorm and rotary embedding (``job_hf_norm``), the frozen embeddings, norms
and LM head upcast to fp32 as ``prepare_model_for_kbit_training`` does
(``job_fp32_frozen``; the job keeps them in bf16), no ``torch.compile``
(``job_eager``, ``--compile off``; GPU only: on a GPU the job compiles its
decoder layers by default, during its warm-up steps, and on the CPU it does
not) and Liger's kernels (``job_liger``, GPU only). The one-change sides are
of the eager job (a compilation each would not fit the run).

Every side trains on the same ``--steps x --batch`` conversations once, after
``--warmup`` untimed steps on other conversations; a step's time includes
building its batch. Real tokens are the conversations' tokens (no padding),
supervised tokens those with a label. Peak memory is
``torch.cuda.max_memory_allocated`` on a GPU and the process's resident-set
high-water mark (``VmHWM``, reset per side) on the CPU. Prints a table and
writes JSON (``--out``).

    python bench/train_bench.py                                  # tiny preset, CPU
    python bench/train_bench.py --preset phi3-mini --gpu         # Phi-3-mini-sized random weights, QLoRA
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_model_check import PHI3_MINI  # noqa: E402 - Phi-3-mini-4k's shape
from bench.profiling import profile_step, sync  # noqa: E402

CPU_DEFAULTS = {"batch": 8, "max_len": 256, "steps": 8, "warmup": 2}
GPU_DEFAULTS = {"batch": 8, "max_len": 1024, "steps": 8, "warmup": 2}
JOB_VARIANTS = {  # TrainSettings changes of each job variant
    "job": {},  # the defaults; on a GPU these compile the decoder layers (--compile auto)
    # the one-change sides below are of the eager job: compiling each would add a compilation per side
    "job_packed": {"packing": True, "compile": "off"},
    "job_hf_loss": {"loss_chunk": 0, "compile": "off"},
    "job_whole_last_layer": {"last_layer": "all", "compile": "off"},
    "job_peft_lora": {"lora_forward": "peft", "compile": "off"},
    "job_hf_norm": {"kernels": "none", "compile": "off"},
    # a model setting, not a TrainSettings one: the frozen embeddings, norms and
    # LM head in fp32 (peft's prepare_model_for_kbit_training), so an fp32 residual stream
    "job_fp32_frozen": {"frozen_fp32": True, "compile": "off"},
    # the job without torch.compile; GPU only (on the CPU the job itself is eager)
    "job_eager": {"compile": "off"},
    # Liger patches the model for good: always the last variant; GPU only
    "job_liger": {"kernels": "liger", "compile": "off"},
}
GPU_ONLY = {"job_eager", "job_liger"}
MODEL_SETTINGS = {"frozen_fp32"}  # variant keys applied to the loaded model instead of TrainSettings


def offline_overrides(preset: str) -> list[str]:
    """No downloads: a preset that names published weights gets random weights
    of the same shapes (Phi-3-mini, CLIP tower) and the offline tokenizer (the
    embedding keeps Phi-3-mini's 32,064 rows); speech gets the tiny preset's
    random Whisper."""
    from models.config import load_config

    cfg = load_config(preset)
    out = []
    if cfg.llm.random_init is None and cfg.llm.name_or_path == "microsoft/Phi-3-mini-4k-instruct":
        out.append(f"llm.random_init={json.dumps(PHI3_MINI)}")
    if cfg.tokenizer.build is None:
        out.append("tokenizer.build={vocab_size: 2048}")
    if cfg.vision.pretrained is not None:
        out.append("vision.pretrained=null")
    if cfg.speech.random_init is None:
        tiny = load_config("tiny").speech
        out += [f"speech.model={tiny.model}", f"speech.random_init={json.dumps(tiny.random_init)}",
                f"speech.sample_len={tiny.sample_len}", f"speech.language={tiny.language}"]
    return out


def card_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({os.cpu_count()} cores{', ' + model if model else ''})"


def card_slug(card: str) -> str:
    """A short file-name tag: h100, h200, a100, l4 ... or cpu."""
    low = card.lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4", "a10g", "t4"):
        if tag in low:
            return tag
    return "cpu" if low.startswith("cpu") else "".join(c for c in low if c.isalnum())[:16] or "device"


class PeakMemory:
    """Peak memory since ``reset``: CUDA allocations on a GPU, the resident set
    on the CPU (``/proc/self/clear_refs`` resets its high-water mark)."""

    def __init__(self, device: str):
        self.device = device
        self.what = ("torch.cuda.max_memory_allocated" if device == "cuda"
                     else "process resident set high-water mark (VmHWM)")

    def reset(self) -> None:
        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.what = "process resident set high-water mark since start (could not reset it)"

    def peak_gib(self) -> float:
        import torch

        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --------------------------------------------------------------------- data
@dataclass
class Data:
    encoded: list  # models.conversation.Encoded
    images: list[bool]
    features: object  # torch.Tensor (pool, tokens, dim): image k uses features[k % pool]

    def feats(self, samples: list[int]):
        import torch

        k = [i for i in samples if self.images[i]]
        return torch.stack([self.features[i % len(self.features)] for i in k]) if k else None


def conversation(tok, rng: random.Random, sentences: list[str], text_target: int, image: bool,
                 num_image_tokens: int, max_len: int):
    """One conversation of about ``text_target`` text tokens (whole sentences,
    multi-turn as in LLaVA-Instruct's conversations), at most ``max_len`` tokens."""
    from models.conversation import encode_conversation

    def encode(msgs):
        return encode_conversation(tok, msgs, num_image_tokens)

    target = min(max_len, text_target + (num_image_tokens if image else 0))
    msgs = [{"role": "user", "content": ([{"type": "image"}] if image else [])
             + [{"type": "text", "text": rng.choice(sentences)}]},
            {"role": "assistant", "content": rng.choice(sentences)}]
    enc = encode(msgs)
    if len(enc) > max_len:
        raise ValueError(f"--max-len {max_len} is too short for one exchange ({len(enc)} tokens)")
    answer_sentences = rng.randint(1, 6)
    while len(enc) < target:
        if answer_sentences == 0:  # a new exchange
            trial = msgs + [{"role": "user", "content": rng.choice(sentences)},
                            {"role": "assistant", "content": rng.choice(sentences)}]
            answer_sentences = rng.randint(1, 6)
        else:
            trial = msgs[:-1] + [{"role": "assistant", "content": msgs[-1]["content"] + " " + rng.choice(sentences)}]
            answer_sentences -= 1
        t = encode(trial)
        if len(t) > max_len:
            break
        msgs, enc = trial, t
    return enc


def make_data(tok, n: int, *, max_len: int, num_image_tokens: int, feature_dim: int, median_text: float,
              sigma: float, image_share: float, seed: int) -> Data:
    import torch

    from models.tokenizer import tiny_corpus

    rng = random.Random(seed)
    sentences = tiny_corpus(4000, seed=seed + 1)
    images, encoded = [], []
    for _ in range(n):
        image = rng.random() < image_share
        text = max(8, round(rng.lognormvariate(math.log(median_text), sigma)))
        encoded.append(conversation(tok, rng, sentences, text, image, num_image_tokens, max_len))
        images.append(image)
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(min(n, 16), num_image_tokens, feature_dim, generator=g)
    return Data(encoded, images, pool)


def data_stats(d: Data, max_len: int, num_image_tokens: int) -> dict:
    from models.conversation import IGNORE_INDEX

    lengths = sorted(len(e) for e in d.encoded)
    n = len(lengths)
    return {
        "conversations": n, "image_share": sum(d.images) / n, "image_tokens": num_image_tokens,
        "mean_tokens": statistics.fmean(lengths), "median_tokens": statistics.median(lengths),
        "p90_tokens": lengths[min(n - 1, int(0.9 * n))], "max_tokens": lengths[-1], "min_tokens": lengths[0],
        "share_within_16_of_max_len": sum(x > max_len - 16 for x in lengths) / n,
        "mean_supervised_tokens": statistics.fmean(sum(x != IGNORE_INDEX for x in e.labels) for e in d.encoded),
        "mean_exchanges": statistics.fmean(len(e.message_starts) / 2 for e in d.encoded),
    }


# ------------------------------------------------------------------- timing
def timed_steps(run_step, plan: list, warm_plan: list, warmup: int, device: str, memory: PeakMemory,
                profile: bool = False) -> dict:
    """``warmup`` untimed steps of ``warm_plan`` (cycled), then every step of
    ``plan`` timed alone; ``run_step(item) -> (loss, StepBatch-like)``. With
    ``profile``, one more (untimed) step of ``warm_plan`` runs under the torch
    profiler: its top operators and kernels go in ``profile``."""
    memory.reset()
    for k in range(warmup):
        run_step(warm_plan[k % len(warm_plan)])
    times, losses, step_slots = [], [], []
    real = supervised = slots = conversations = 0
    for item in plan:
        sync(device)
        t = time.perf_counter()
        loss, b = run_step(item)
        sync(device)
        times.append(time.perf_counter() - t)
        losses.append(loss)
        real += b.real_tokens
        supervised += b.supervised_tokens
        slots += b.slots
        step_slots.append(b.slots)
        conversations += len(b.samples)
    seconds = sum(times)
    return {
        "steps": len(plan), "conversations": conversations, "real_tokens": real, "supervised_tokens": supervised,
        "slots": slots, "padding_share": 1 - real / slots, "seconds": seconds,
        "tokens_per_s": real / seconds, "supervised_tokens_per_s": supervised / seconds, "slots_per_s": slots / seconds,
        "step_s_mean": seconds / len(times), "step_s_median": statistics.median(times), "step_s_min": min(times),
        "step_s": times, "step_slots": step_slots, "peak_gib": memory.peak_gib(), "first_loss": losses[0], "last_loss": losses[-1],
        "loss_finite": all(math.isfinite(x) for x in losses),
        **({"profile": profile_step(lambda: run_step(warm_plan[0]), device)} if profile else {}),
    }


def free(device: str) -> None:
    """Collect what the last side left (reference cycles included) and return
    cached GPU blocks, so the next side's peak is its own."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------- baseline
def hf_peft(cfg, device: str, data: Data, timed: list[int], warm: list[int], batch: int, max_len: int, warmup: int,
            memory: PeakMemory, pad_modes: list[str], profile: bool = False) -> dict:
    """The bare loop: plain transformers + peft, images spliced by hand."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from models.conversation import IGNORE_INDEX
    from models.language import resolve_llm_source
    from models.tokenizer import load_tokenizer
    from models.vision import DTYPES
    from ray_jobs.packing import StepBatch

    lc, lora = cfg.llm, cfg.llm.lora
    tok = load_tokenizer(cfg)
    folder = resolve_llm_source(lc, tok)  # the job's weights: the same folder
    t = time.perf_counter()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=DTYPES[lc.compute_dtype]) if lc.load_in_4bit else None
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[lc.dtype], quantization_config=quant,
                                                 device_map={"": device}, attn_implementation=lc.attn_implementation)
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=lc.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif lc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    hidden = model.get_input_embeddings().weight.shape[1]
    dim = data.features.shape[-1]
    pdtype = DTYPES[lc.compute_dtype if lc.load_in_4bit else lc.dtype]
    projector = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(),
                                    torch.nn.Linear(hidden, hidden)).to(device=device, dtype=pdtype)
    params = [p for p in model.parameters() if p.requires_grad] + list(projector.parameters())
    opt = torch.optim.AdamW(params, lr=2e-4)
    load_s = time.perf_counter() - t
    image_id = tok.ids.image
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
                else torch.autocast("cpu", enabled=False))
    model.train()

    def collate_to(idx: list[int], width: int | None):
        rows = [data.encoded[i] for i in idx]
        w = width or max(len(e) for e in rows)
        ids = torch.full((len(rows), w), tok.ids.pad, dtype=torch.long)
        labels = torch.full((len(rows), w), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), w), dtype=torch.long)
        for r, e in enumerate(rows):
            ids[r, :len(e)] = torch.tensor(e.input_ids)
            labels[r, :len(e)] = torch.tensor(e.labels)
            mask[r, :len(e)] = 1
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return StepBatch(inputs, list(idx), sum(len(e) for e in rows), int((labels != IGNORE_INDEX).sum()))

    def step(idx: list[int], width: int | None):
        b = collate_to(idx, width)
        ids = b.inputs["input_ids"].to(device)
        is_image = ids == image_id
        feats = data.feats(b.samples)
        with autocast:
            embeds = model.get_input_embeddings()(ids.masked_fill(is_image, 0))
            if feats is not None:
                projected = projector(feats.to(device, pdtype)).reshape(-1, hidden)
                embeds = embeds.masked_scatter(is_image.unsqueeze(-1), projected.to(embeds.dtype))
            loss = model(inputs_embeds=embeds, attention_mask=b.inputs["attention_mask"].to(device),
                         labels=b.inputs["labels"].to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item(), b

    def batches(ids: list[int]) -> list[list[int]]:
        return [ids[k:k + batch] for k in range(0, len(ids), batch)]

    out = {}
    for mode in pad_modes:
        width = max_len if mode == "max_length" else None
        r = timed_steps(lambda idx, width=width: step(idx, width), batches(timed), batches(warm), warmup, device,
                        memory, profile=profile and mode == "max_length")
        out[f"hf_peft_{mode}"] = {"batching": f"padding={mode!r}, data order", "loss": "transformers", **r}
    return {"load_s": load_s, "trainable_params": sum(p.numel() for p in params), "variants": out}


# ---------------------------------------------------------------------- job
def job(cfg, device: str, data: Data, timed: list[int], warm: list[int], batch: int, max_len: int, warmup: int,
        memory: PeakMemory, variants: list[str], profile: bool = False) -> dict:
    """The Ray Train worker's step, in this process."""
    import torch

    from models.kernels import CompiledSteps, apply_kernels
    from models.language import set_frozen_dtype, upcasts_frozen
    from models.lora_forward import fuse_lora
    from models.multimodal import MultimodalPhi3
    from models.vision import DTYPES
    from ray_jobs import strategy
    from ray_jobs.packing import TrainingForward
    from ray_jobs.train import TrainSettings, epoch_plan, make_optimizer, step_batch

    t = time.perf_counter()
    model = MultimodalPhi3.from_config(cfg, device=device, with_vision=False, trainable=True)
    base = TrainSettings(stage="qlora", data="", embeddings="", out="", batch_size=batch, steps=10_000, warmup=1)
    load_s = time.perf_counter() - t
    pad = model.tokenizer.ids.pad
    model.train()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out = {}
    queue, retried = list(variants), {}  # retried: the error of a compiled job side, which then runs eager
    while queue:
        name = queue.pop(0)
        changes = {**JOB_VARIANTS[name], **({"compile": "off"} if name in retried else {})}
        s = TrainSettings(**{**base.__dict__, **{k: v for k, v in changes.items() if k not in MODEL_SETTINGS}})
        # the loader's rule, with the variant's frozen_fp32
        llm_cfg = replace(cfg.llm, frozen_fp32=changes.get("frozen_fp32", cfg.llm.frozen_fp32))
        frozen_dtype = torch.float32 if upcasts_frozen(llm_cfg) else DTYPES[cfg.llm.dtype]
        set_frozen_dtype(model.llm, frozen_dtype)
        with torch.no_grad():  # every variant starts from the same weights and a fresh optimizer
            for n, p in model.named_parameters():
                if n in start:
                    p.copy_(start[n])
        opt, sched = make_optimizer(model, base)
        replicas = strategy.make("ddp", TrainingForward(model, s.loss_chunk, s.last_layer), opt, sched, world=1,
                                 device=device, batch_size=batch)

        def plan(ids: list[int], s=s) -> list:
            lengths = [len(data.encoded[i]) for i in ids]
            return [_remap(item, ids) for item in epoch_plan(lengths, s, max_len, 0, 0, 1)]

        # the worker's rule: compiled on a GPU by default (eager again after a compiled side, or after a
        # compilation error)
        steps = CompiledSteps.start(model.llm, s.compile, device, "ddp", s.kernels,
                                    zero_grad=lambda opt=opt: opt.zero_grad(set_to_none=True))

        def train_step(inputs, image_features, replicas=replicas):
            loss = replicas.loss(inputs, image_features)
            replicas.step(loss)
            return loss

        def run_step(item, s=s, steps=steps):
            b = step_batch(data.encoded, item, pad, s.packing)
            return steps(train_step, b.inputs, data.feats(b.samples)).item(), b

        try:
            apply_kernels(model.llm, s.kernels, device)
            fuse_lora(model.llm, s.lora_forward)
            r = timed_steps(run_step, plan(timed), plan(warm), warmup, device, memory, profile=profile and name == "job")
        except Exception as e:  # an optional accelerator that fails here is a result, not the end of the run
            error = f"{type(e).__name__}: {e}"[:2000]
            if steps.compiled and name not in retried:
                # the compiled job failed in a way its own fall-back does not catch (that one catches the
                # compiler's errors): the figure of the eager job is still a result; the error says why
                print(f"  {name} failed compiled, measuring it eager: {error}", flush=True)
                retried[name] = error
                queue.insert(0, name)
                free(device)
                continue
            if name not in GPU_ONLY:
                raise
            print(f"  {name} failed: {error}", flush=True)
            out[name] = {"error": error, "settings": JOB_VARIANTS[name]}
            free(device)
            continue
        batching = (f"packed: {batch} rows of <= {max_len} tokens, block-diagonal attention" if s.packing
                    else f"length buckets of {batch} (ray_jobs.data.length_batches), padded to the longest")
        out[name] = {"batching": batching, "loss": f"chunked ({s.loss_chunk} tokens)" if s.loss_chunk else "transformers",
                     "settings": JOB_VARIANTS[name], "frozen_dtype": str(frozen_dtype).removeprefix("torch."),
                     "compiled": steps.compiled, "compile": steps.reason,
                     **({"compiled_error": retried[name]} if name in retried else {}), **r}
    return {"load_s": load_s, "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
            "variants": out}


def _remap(item: list, ids: list[int]) -> list:
    """Plan entries index ``ids``; map them back to data indices (rows too)."""
    return [_remap(x, ids) if isinstance(x, list) else ids[x] for x in item]


# --------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="tiny | phi3-mini (random weights of its shape) | a YAML file")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--gpu", action="store_true", help="run on the GPU (CUDA)")
    ap.add_argument("--batch", type=int, default=None, help=f"conversations per step (CPU {CPU_DEFAULTS['batch']}, "
                                                            f"GPU {GPU_DEFAULTS['batch']})")
    ap.add_argument("--max-len", type=int, default=None,
                    help=f"context length (CPU {CPU_DEFAULTS['max_len']}, GPU {GPU_DEFAULTS['max_len']})")
    ap.add_argument("--steps", type=int, default=None, help="timed baseline steps: --steps x --batch conversations "
                                                            f"(CPU {CPU_DEFAULTS['steps']}, GPU {GPU_DEFAULTS['steps']})")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per side first (2)")
    ap.add_argument("--median-text", type=float, default=None,
                    help="median text tokens per conversation (default 200 x max-len / 1024)")
    ap.add_argument("--sigma", type=float, default=0.6, help="lognormal sigma of the text lengths")
    ap.add_argument("--image-share", type=float, default=0.9, help="share of conversations with an image")
    ap.add_argument("--variants", default=None,
                    help=f"job variants to time, comma-separated, from {', '.join(JOB_VARIANTS)} "
                         f"(default: all; {', '.join(sorted(GPU_ONLY))} with --gpu only)")
    ap.add_argument("--no-longest", action="store_true", help="skip the padding='longest' baseline")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--profile", action="store_true",
                    help="profile one extra step of the max-length baseline and of the job: top operators/kernels "
                         "and time by kind in the JSON (compare shares: the two steps differ in size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/train-<device>.json)")
    args = ap.parse_args(argv)
    defaults = GPU_DEFAULTS if args.gpu else CPU_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.variants is None:
        args.variants = ",".join(v for v in JOB_VARIANTS if args.gpu or v not in GPU_ONLY)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(JOB_VARIANTS)
    if unknown or not args.variants:
        ap.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(JOB_VARIANTS)}")
    if not args.gpu and set(args.variants) & GPU_ONLY:
        ap.error(f"--variants: {', '.join(sorted(set(args.variants) & GPU_ONLY))} need --gpu")
    # a variant that patches the model goes last, so the others run unpatched
    args.variants.sort(key=lambda v: (v in GPU_ONLY, v == "job_liger"))
    if args.median_text is None:
        args.median_text = 200 * args.max_len / 1024
    return args


def run(args: argparse.Namespace) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import peft
    import torch
    import transformers

    from models.config import load_config
    from models.tokenizer import load_tokenizer
    from models.vision import vision_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device here")
    overrides = offline_overrides(args.preset) + [f"tokenizer.max_length={args.max_len}"] + list(args.overrides)
    cfg = load_config(args.preset, overrides)
    if not args.gpu and cfg.llm.random_init and cfg.llm.random_init.get("hidden_size", 0) >= 2048:
        raise SystemExit(f"--preset {args.preset} is a full-size model: run it with --gpu")
    spec = vision_spec(cfg.vision)
    tok = load_tokenizer(cfg)
    t = time.perf_counter()
    n_timed, n_warm = args.steps * args.batch, max(args.warmup, 1) * args.batch * 4
    data = make_data(tok, n_timed + n_warm, max_len=args.max_len, num_image_tokens=spec["num_tokens"],
                     feature_dim=spec["feature_dim"], median_text=args.median_text, sigma=args.sigma,
                     image_share=args.image_share, seed=args.seed)
    timed, warm = list(range(n_timed)), list(range(n_timed, n_timed + n_warm))
    timed_data = Data([data.encoded[i] for i in timed], [data.images[i] for i in timed], data.features)
    print(f"{n_timed + n_warm} conversations in {time.perf_counter() - t:.1f} s: "
          f"{json.dumps({k: round(v, 3) for k, v in data_stats(timed_data, args.max_len, spec['num_tokens']).items()})}",
          flush=True)
    memory = PeakMemory(device)
    common = {"batch": args.batch, "max_len": args.max_len, "warmup": args.warmup, "memory": memory,
              "profile": args.profile}
    modes = ["max_length"] + ([] if args.no_longest else ["longest"])
    print(f"baseline: plain transformers + peft ({', '.join('padding=' + m for m in modes)}) ...", flush=True)
    base = hf_peft(cfg, device, data, timed, warm, pad_modes=modes, **common)
    free(device)  # the baseline's model is gone with its function's frame: its memory is not the job's
    print(f"job: {', '.join(args.variants)} ...", flush=True)
    mine = job(cfg, device, data, timed, warm, variants=args.variants, **common)
    free(device)

    ref = base["variants"]["hf_peft_max_length"]
    longest = base["variants"].get("hf_peft_longest")
    sides = {**base["variants"], **mine["variants"]}
    for r in sides.values():
        if "error" in r:
            continue
        r["ratio_vs_hf_peft"] = r["tokens_per_s"] / ref["tokens_per_s"]
        if longest:
            r["ratio_vs_hf_peft_longest"] = r["tokens_per_s"] / longest["tokens_per_s"]
    first_job = mine["variants"][args.variants[0]]
    res = {
        "benchmark": "train", "card": card_name(device), "device": device, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "preset": args.preset, "overrides": list(args.overrides), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "torch_threads": torch.get_num_threads(),
        "model": {"llm": cfg.llm.random_init or cfg.llm.name_or_path, "dtype": cfg.llm.dtype,
                  "load_in_4bit": cfg.llm.load_in_4bit, "compute_dtype": cfg.llm.compute_dtype,
                  "gradient_checkpointing": cfg.llm.gradient_checkpointing,
                  "attn_implementation": cfg.llm.attn_implementation,
                  "lora": {"r": cfg.llm.lora.r, "alpha": cfg.llm.lora.alpha, "dropout": cfg.llm.lora.dropout,
                           "target_modules": list(cfg.llm.lora.target_modules)},
                  "vision": cfg.vision.model, "image_tokens": spec["num_tokens"], "feature_dim": spec["feature_dim"],
                  "trainable_params": {"hf_peft": base["trainable_params"], "job": mine["trainable_params"]}},
        "batch": args.batch, "max_len": args.max_len, "steps": args.steps, "warmup": args.warmup,
        "data": {"text_tokens": f"lognormal, median {args.median_text:g}, sigma {args.sigma:g}, whole sentences, "
                                f"cut to fit max_len", "image_share_asked": args.image_share, "seed": args.seed,
                 **data_stats(timed_data, args.max_len, spec["num_tokens"])},
        "peak_memory": memory.what,
        "load_s": {"hf_peft": base["load_s"], "job": mine["load_s"]},
        "variants": sides,
        "job_variant": args.variants[0],
        "ratio_vs_hf_peft": first_job["ratio_vs_hf_peft"],
        "ratio_vs_hf_peft_longest": first_job.get("ratio_vs_hf_peft_longest"),
        "peak_gib": first_job["peak_gib"], "baseline_peak_gib": ref["peak_gib"],
    }
    print_table(res)
    out = Path(args.out or f"bench/results/train-{card_slug(res['card'])}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")
    return res


def print_table(res: dict) -> None:
    d = res["data"]
    m = res["model"]
    print(f"\ntraining benchmark: {res['card']}, preset {res['preset']}, batch {res['batch']}, max_len {res['max_len']}, "
          f"4-bit {m['load_in_4bit']}, checkpointing {m['gradient_checkpointing']}, LoRA r{m['lora']['r']}; "
          f"{d['conversations']} conversations, mean {d['mean_tokens']:.0f} tokens (median {d['median_tokens']:.0f}, "
          f"p90 {d['p90_tokens']}, max {d['max_tokens']}), {d['image_share']:.0%} with an image of {d['image_tokens']} tokens")
    head = (f"{'side':<22} {'steps':>5} {'real tok/s':>11} {'sup. tok/s':>11} {'step s':>8} {'padding':>8} "
            f"{'peak GiB':>9} {'vs HF max':>9} {'vs HF longest':>13}")
    print(head)
    for name, r in res["variants"].items():
        if "error" in r:
            print(f"{name:<22} failed: {r['error'][:200]}")
            continue
        longest = r.get("ratio_vs_hf_peft_longest")
        print(f"{name:<22} {r['steps']:>5} {r['tokens_per_s']:>11,.0f} {r['supervised_tokens_per_s']:>11,.0f} "
              f"{r['step_s_median']:>8.3f} {r['padding_share']:>8.1%} {r['peak_gib']:>9.2f} "
              f"{r['ratio_vs_hf_peft']:>9.2f} {'' if longest is None else f'{longest:.2f}':>13}")
    print(f"real tokens: conversation tokens without padding (every side the same {d['conversations']} conversations); "
          f"step s: median; padding: share of computed positions that are padding; peak: {res['peak_memory']}")
    for name, r in res["variants"].items():
        p = r.get("profile")
        if p:
            kinds = ", ".join(f"{k} {v:.0%}" for k, v in p["by_kind_share"].items())
            top = "; ".join(f"{t['name'][:48]} {t['share']:.0%}" for t in p["top"][:5])
            print(f"profile {name} ({p['measured']}, {p['total_ms']:,.0f} ms): {kinds}\n    top: {top}")
            if p.get("top_ops"):
                ops = "; ".join(f"{t['name'][:32]} {t['share']:.0%}" for t in p["top_ops"][:8])
                print(f"    operators: {ops}")


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
