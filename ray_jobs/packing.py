"""How a training step lays out its conversations, and how its loss is computed.

**Padded** (the default): a step is ``batch_size`` conversations from
``ray_jobs.data.length_batches`` (grouped by similar length), one per row,
right-padded to the longest; a 2D attention mask hides the padding.

**Packed** (``TrainSettings.packing``): a step is ``batch_size`` rows of at
most ``max_length`` tokens, each filled with whole conversations (best fit in
windows of shuffled conversations), so a step holds about ``batch_size x
max_length`` real tokens and a varying number of conversations. Each row
carries per-conversation ``position_ids`` that restart at 0 and no attention
mask: Hugging Face then gives every conversation its own causal block (a
block-diagonal mask with SDPA or eager attention, variable-length kernels with
flash attention), and rotary positions are those of the conversation alone.
No token sees another conversation, and the first token of every conversation
is never a target, so the loss equals that of the conversations run one by one
(``tests/test_packing.py``).

**Loss** (``TrainSettings.loss_chunk``): the decoder's hidden states are kept
only at answer positions (those whose next token is supervised), and the LM
head and cross-entropy run over those in chunks of ``loss_chunk`` tokens, each
chunk recomputed in the backward pass instead of stored. The mean over
supervised tokens is Hugging Face's loss, without ever holding full-vocabulary
logits for the whole batch (Phi-3-mini: 32,064 floats per token). ``0`` uses
the model's own loss.

**Last layer at answer positions** (``causal_lm_loss(last_layer="answers")``,
the default): the last decoder layer's output at a position feeds only that
position's logits, so the loss needs it at answer positions alone. That layer
computes its keys and values for every position (the answers attend to them)
and its queries, attention, output projection and MLP only where the next token
is supervised, with its own mask (causal, the padding, a packed row's blocks,
the sliding window). The rest of the model runs as Hugging Face's. On the
synthetic data's short answers (about 14 % of the tokens) this skips about a
third of a tiny 2-layer Phi-3's forward and backward work; with 32 layers it
is worth about a layer. It needs the layer's Phi-3 structure, so a compiled
last layer (``models.kernels.compile_layers``) runs whole.

None of these changes the weights, the checkpoint format or what a checkpoint holds.
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.conversation import IGNORE_INDEX, Encoded, collate
from models.kernels import rotary, signed
from models.language import base_causal_lm
from models.options import LAST_LAYER, check_last_layer  # noqa: F401 (the choices live in a torch-free module)


# ------------------------------------------------------------------ batches
@dataclass
class StepBatch:
    """One step's model inputs and what they hold."""

    inputs: dict[str, torch.Tensor]  # input_ids, labels, and attention_mask (padded) or position_ids (packed)
    samples: list[int]  # sample indices in the order their image placeholders occur (row by row)
    real_tokens: int  # tokens of the conversations (no padding)
    supervised_tokens: int  # tokens whose label is not IGNORE_INDEX

    @property
    def slots(self) -> int:
        """Tokens the model computes: rows x width, padding included."""
        return int(self.inputs["input_ids"].numel())


def padded_batch(encoded: Sequence[Encoded], idx: Sequence[int], pad_id: int) -> StepBatch:
    """One conversation per row, right-padded to the longest (``models.conversation.collate``)."""
    chosen = [encoded[i] for i in idx]
    inputs = collate(chosen, pad_id)
    return StepBatch(inputs, list(idx), sum(len(e) for e in chosen),
                     int((inputs["labels"] != IGNORE_INDEX).sum()))


def packed_batch(encoded: Sequence[Encoded], rows: Sequence[Sequence[int]], pad_id: int) -> StepBatch:
    """Several conversations per row, each with positions 0..n-1; rows right-padded
    to the longest row (the padding restarts its positions too: it is a block of
    its own, with labels IGNORE_INDEX)."""
    if not rows or not all(rows):
        raise ValueError("a packed batch needs at least one row and no empty row")
    lengths = [[len(encoded[i]) for i in row] for row in rows]
    width = max(sum(r) for r in lengths)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            e = encoded[i]
            k = len(e)
            ids[r, at:at + k] = torch.tensor(e.input_ids)
            labels[r, at:at + k] = torch.tensor(e.labels)
            labels[r, at] = IGNORE_INDEX  # never predict a conversation's first token from the one before
            positions[r, at:at + k] = torch.arange(k)
            at += k
        positions[r, at:] = torch.arange(width - at)
    samples = [i for row in rows for i in row]
    return StepBatch({"input_ids": ids, "labels": labels, "position_ids": positions}, samples,
                     sum(map(sum, lengths)), int((labels != IGNORE_INDEX).sum()))


def _best_fit(items: list[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each conversation (longest first) into the fullest row it fits."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in sorted(items, key=lambda j: -lengths[j]):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
        else:
            room, r = capacity, len(rows)
            rows.append([i])
        bisect.insort(free, (room - lengths[i], r))
    return rows


def _pack_shard(mine: list[int], lengths: Sequence[int], rows: int, capacity: int, window_steps: int) -> list[list[list[int]]]:
    steps: list[list[list[int]]] = []
    budget = rows * capacity * window_steps
    carry: list[int] = []
    pos = 0
    while pos < len(mine) or carry:
        window, tokens = list(carry), sum(lengths[i] for i in carry)
        while pos < len(mine) and tokens < budget:
            window.append(mine[pos])
            tokens += lengths[mine[pos]]
            pos += 1
        packed = _best_fit(window, lengths, capacity)
        packed.sort(key=lambda r: -sum(lengths[i] for i in r))  # fullest rows first
        full = len(packed) - len(packed) % rows
        if pos >= len(mine):  # the last window: keep a partial step too
            full = len(packed)
        steps += [packed[k:k + rows] for k in range(0, full, rows)]
        carry = [i for row in packed[full:] for i in row]  # the rows of an incomplete step wait for the next window
    return steps


def pack_batches(lengths: Sequence[int], rows: int, capacity: int, seed: int, epoch: int, rank: int, world: int,
                 window_steps: int = 8) -> list[list[list[int]]]:
    """This worker's packed steps for one epoch: lists of ``rows`` rows of sample
    indices, each row at most ``capacity`` tokens. Shuffled and sharded like
    ``ray_jobs.data.length_batches`` (same shuffle, same shards), packed by
    best fit inside windows of about ``window_steps`` steps of tokens;
    every worker gets the same number of steps (the shortest shard's).
    Deterministic in (seed, epoch, rank, world)."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"a conversation of {max(lengths)} tokens does not fit rows of {capacity}")
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    usable = len(order) - len(order) % world
    shards = [_pack_shard(order[r:usable:world], lengths, rows, capacity, window_steps) for r in range(world)]
    steps = shards[rank][: min(len(s) for s in shards)]
    rng.shuffle(steps)
    return steps


# --------------------------------------------------------------------- loss
def _ce_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class _LastLayerInput(Exception):
    """Raised by the last decoder layer's stand-in to stop the forward pass there."""


def _run_below_last_layer(decoder, embeds, attention_mask, position_ids):
    """The decoder up to its last layer: that layer's input and Hugging Face's
    rotary ``(cos, sin)`` for it. The last layer's ``forward`` is swapped for
    one that records its arguments and stops the pass (no final norm, no
    output)."""
    last = decoder.layers[-1]
    seen = {}

    def stand_in(hidden_states, *args, position_embeddings=None, **kwargs):
        seen["hidden"], seen["rope"] = hidden_states, position_embeddings
        raise _LastLayerInput

    before = last.__dict__.get("forward")
    last.forward = stand_in
    try:
        decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    except _LastLayerInput:
        pass
    finally:
        if before is None:
            del last.forward
        else:
            last.forward = before
    if "hidden" not in seen:
        raise RuntimeError("the decoder never reached its last layer")
    rope = seen["rope"]
    if rope is None:  # a decoder that leaves the rotary embedding to its layers
        width = embeds.shape[1]
        pos = position_ids if position_ids is not None else torch.arange(width, device=embeds.device)[None]
        rope = decoder.rotary_emb(seen["hidden"], pos)
    return seen["hidden"], rope


def _last_layer_at(layer, hidden, rope, at, attention_mask, position_ids, sliding_window):
    """A Phi-3 decoder layer's output at chosen positions only, ``(n, dim)``:
    keys and values from every position; queries, attention, ``o_proj`` and
    the MLP at those positions. ``at`` is ``(rows, cols, slot, width_q)``: the
    positions in row-major order, each one's index among its row's, and the
    most any row has."""
    attn = layer.self_attn
    cfg = attn.config
    batch, width = hidden.shape[:2]
    hd, heads, kv_heads = attn.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    qkv = attn.qkv_proj(layer.input_layernorm(hidden))
    nq, nkv = heads * hd, kv_heads * hd
    k = qkv[..., nq:nq + nkv].view(batch, width, kv_heads, hd).transpose(1, 2)
    v = qkv[..., nq + nkv:].view(batch, width, kv_heads, hd).transpose(1, 2)
    # the chosen queries, row by row, right-padded to the row with the most
    rows, cols, slot, width_q = at
    q = qkv.new_zeros(batch, width_q, nq)
    q[rows, slot] = qkv[rows, cols, :nq]
    q = q.view(batch, width_q, heads, hd).transpose(1, 2)
    qpos = torch.zeros(batch, width_q, dtype=torch.long, device=rows.device)
    qpos[rows, slot] = cols
    # Phi-3's rotary embedding, as models.kernels computes it (pure torch): not modeling_phi3's function,
    # which --kernels liger replaces with a kernel that rotates its query and key tensors in place
    cos, sin = rope
    cos, sin = cos.expand(batch, *cos.shape[1:]), sin.expand(batch, *sin.shape[1:])
    row = torch.arange(batch, device=rows.device)[:, None]
    q = rotary(q, cos[row, qpos][:, None], signed(sin[row, qpos])[:, None])
    k = rotary(k, cos[:, None], signed(sin)[:, None])
    # who each query sees: keys up to its own position, not padding, in its block, inside the window
    key = torch.arange(width, device=rows.device)
    allowed = key[None, None, :] <= qpos[:, :, None]
    if attention_mask is not None:
        allowed &= attention_mask.bool()[:, None, :]
    if position_ids is not None:  # a packed row: a block starts where positions restart at 0
        block = torch.cumsum((position_ids == 0).long(), dim=1)
        allowed &= block[:, None, :] == block.gather(1, qpos)[:, :, None]
    if sliding_window:
        allowed &= key[None, None, :] > qpos[:, :, None] - sliding_window
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed[:, None], scale=attn.scaling, enable_gqa=heads != kv_heads,
        dropout_p=attn.attention_dropout if attn.training else 0.0)
    out = out.transpose(1, 2).reshape(batch, width_q, nq)[rows, slot]
    h = hidden[rows, cols] + layer.resid_attn_dropout(attn.o_proj(out))
    return h + layer.resid_mlp_dropout(layer.mlp(layer.post_attention_layernorm(h)))


def _trimmable(decoder) -> bool:
    """Whether the last layer is a Phi-3 layer this module can run at chosen
    positions: eager (not compiled), with its dropout and attention parts."""
    layers = getattr(decoder, "layers", None)
    if not layers:
        return False
    last = layers[-1]
    attn = getattr(last, "self_attn", None)
    return (getattr(last, "_compiled_call_impl", None) is None and attn is not None
            and hasattr(attn, "qkv_proj") and hasattr(last, "resid_mlp_dropout")
            and type(last).__name__ == "Phi3DecoderLayer")


def answer_states(model, input_ids: torch.Tensor, labels: torch.Tensor, *, image_features=None,
                  attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                  last_layer: str = "answers") -> tuple[torch.Tensor, torch.Tensor]:
    """The final hidden states (after the last norm) of a ``MultimodalPhi3``
    batch at answer positions, those whose next token is supervised, ``(n, dim)``
    row by row, and those next tokens ``(n,)``: the LM head's inputs and targets.

    The answer positions are found on the host from CPU ``labels`` and sent
    ahead of the forward pass (pinned, asynchronous), so the step never waits
    for the device mid-way: a wait there empties the queue of launched
    kernels, and the GPU then idles wherever the host launches slower than it
    computes. (With the labels sent after the forward pass and a boolean
    index, two such waits, the chunked loss measured 0.16-0.18 s a step
    slower than the model's own loss on an H200.)"""
    check_last_layer(last_layer)
    device = model.device
    llm = base_causal_lm(model.llm)
    width = labels.shape[1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    # where labels live: on the host, no wait; labels already on the device wait for it once here
    rows, cols = keep.nonzero(as_tuple=True)
    t = targets[rows, cols]
    # each answer position's slot among its row's (the trimmed last layer's query layout), while on the host
    counts = torch.bincount(rows, minlength=labels.shape[0])
    slot = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    width_q = int(counts.max()) if rows.numel() else 0
    moved = []
    for x in (rows, cols, slot, t):
        if x.device != device:
            x = x.pin_memory() if device.type == "cuda" else x
            x = x.to(device, non_blocking=True)
        moved.append(x)
    rows, cols, slot, t = moved
    embeds = model.embed(input_ids.to(device), image_features)
    decoder = llm.get_decoder()
    mask = None if attention_mask is None else attention_mask.to(device)
    positions = None if position_ids is None else position_ids.to(device)
    if last_layer == "answers" and t.numel() and _trimmable(decoder):
        hidden, rope = _run_below_last_layer(decoder, embeds, mask, positions)
        h = _last_layer_at(decoder.layers[-1], hidden, rope, (rows, cols, slot, width_q), mask, positions,
                           getattr(decoder.config, "sliding_window", None))
        return decoder.norm(h), t
    hidden = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                     use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows * width + cols), t  # rows of hidden.view(-1, dim)


def causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, *, image_features=None,
                   attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                   chunk: int = 1024, last_layer: str = "answers") -> torch.Tensor:
    """The mean next-token cross-entropy over supervised tokens of a
    ``MultimodalPhi3`` batch (Hugging Face's loss), computed on answer
    positions only (:func:`answer_states`), ``chunk`` tokens of logits at a
    time, each chunk recomputed in the backward pass."""
    h, t = answer_states(model, input_ids, labels, image_features=image_features, attention_mask=attention_mask,
                         position_ids=position_ids, last_layer=last_layer)
    if t.numel() == 0:
        return h.sum() * 0.0  # zero, with a graph
    head = base_causal_lm(model.llm).get_output_embeddings()
    total = torch.zeros((), device=h.device, dtype=torch.float32)
    for start in range(0, t.numel(), chunk):
        total = total + checkpoint(_ce_sum, head, h[start:start + chunk], t[start:start + chunk], use_reentrant=False)
    return total / t.numel()


class TrainingForward(nn.Module):
    """What the training strategies call: ``module(**batch, image_features=...).loss``
    for padded and packed batches, with the chunked loss (``chunk > 0``; its last
    decoder layer at answer positions only with ``last_layer="answers"``) or the
    model's own. It holds the model as its only submodule: the same parameters,
    in the same order, so optimizers and checkpoints see no difference."""

    def __init__(self, model, chunk: int = 1024, last_layer: str = "answers"):
        super().__init__()
        check_last_layer(last_layer)
        self.model = model
        self.chunk = chunk
        self.last_layer = last_layer

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, image_features=None):
        if self.chunk > 0:
            loss = causal_lm_loss(self.model, input_ids, labels, image_features=image_features,
                                  attention_mask=attention_mask, position_ids=position_ids, chunk=self.chunk,
                                  last_layer=self.last_layer)
        else:
            loss = self.model(input_ids, attention_mask=attention_mask, labels=labels, image_features=image_features,
                              position_ids=position_ids, use_cache=False).loss
        return SimpleNamespace(loss=loss)
