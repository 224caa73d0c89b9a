"""A preallocated KV cache for Phi-3 decoding, and CUDA graphs of its step.

The LLM deployment's continuous batcher (``serve.batching``) keeps every
running request in a row of one cache allocated once per replica: per layer,
keys and values of shape ``(rows, kv_heads, max_len, head_dim)``. Requests
are prefilled alone by the Hugging Face model (a ``DynamicCache``) and their
keys and values copied into a free row; each decoding step then runs one
token per row through :meth:`StaticDecoder.decode`, a forward pass of the
same modules (embedding, norms, projections, MLP, LM head, LoRA layers if
unmerged) that writes each row's new key and value at that row's own
position and attends over the row's columns ``0..position`` (and within the
sliding window, as Phi-3's mask does).

Nothing in the step depends on data on the host, so on a GPU it is captured
once per (rows, length) bucket as a CUDA graph and replayed: one launch per
token instead of a few hundred kernel launches from Python. Rows beyond the
running ones and columns beyond the longest row are padding of a bucket; a
padding row writes only into a free row's first column. Rows stay dense
(``0..n-1``): the batcher moves the last row into the hole a finished request
leaves (:meth:`move`).

Greedy answers equal those of the dynamic cache and of ``generate``
(``tests/test_static_cache.py``).
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.kernels import fused_rms_norm as _rms_norm, rotary as _rope, signed
from models.language import base_causal_lm

log = logging.getLogger("ray.serve")


class UnsupportedModel(ValueError):
    """The static decoder knows Phi-3's layer layout only."""


def kv_bytes_per_token(llm) -> int:
    """Bytes of keys and values one token takes in every layer."""
    base = base_causal_lm(llm)
    cfg = base.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * base.get_input_embeddings().weight.element_size()


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def gpu_share() -> float:
    """The part of its GPU this process was given by Ray (``num_gpus``), 1 outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            share = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0) or 0)
            if 0 < share < 1:
                return share
    except Exception:  # noqa: BLE001 - not in a Ray worker
        pass
    return 1.0


def cache_budget(device: torch.device, fraction: float) -> int:
    """Bytes the static cache may take: on a GPU, ``fraction`` of this
    replica's part of the card (Ray's ``num_gpus`` share of its memory, less
    what this process holds already: the weights), and never more than 90 %
    of what is free; on the CPU, ``fraction`` of the available RAM."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        room = gpu_share() * total - torch.cuda.memory_reserved(device)
        return int(max(0.0, min(fraction * room, 0.9 * free)))
    return int(fraction * _available_ram())


def plan_cache(rows: int, context: int, per_token: int, budget: int, *, min_len: int = 2048) -> tuple[int, int]:
    """(rows, max_len) of a cache that fits in ``budget`` bytes: every row
    first, with the length shrunk (in steps of 64) down to ``min_len`` (an
    image, a question and a long answer), then fewer rows of that length.
    ``ValueError`` when not even one row fits."""
    min_len = min(min_len, context)
    if rows * context * per_token <= budget:
        return rows, context
    length = budget // (rows * per_token) // 64 * 64
    if length >= min_len:
        return rows, int(length)
    fit = budget // (min_len * per_token)
    if fit < 1:
        raise ValueError(f"a KV cache row of {min_len} tokens needs {min_len * per_token / 2**20:.0f} MiB; "
                         f"the budget is {budget / 2**20:.0f} MiB")
    return int(min(rows, fit)), min_len


def _buckets(limit: int, first: int, step_after: int | None = None) -> list[int]:
    """Powers of two from ``first`` (then multiples of ``step_after``, if
    given, past it), capped by and ending with ``limit``."""
    out, v = [], first
    while v < limit:
        out.append(v)
        v = v * 2 if step_after is None or v < step_after else v + step_after
    out.append(limit)
    return out


def _add_linear(x: torch.Tensor, linear: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """``x + linear(inp)``; for a plain bias-free ``nn.Linear`` (bf16 weights,
    the LoRA merged) one GEMM that adds into ``x``."""
    if type(linear) is nn.Linear and linear.bias is None:
        return torch.addmm(x, inp, linear.weight.t())
    return x + linear(inp)


class StaticDecoder:
    """``rows`` x ``max_len`` tokens of keys and values and a one-token
    decoding step over the first ``n`` rows. ``cuda_graphs`` captures the
    step per bucket on a CUDA device (ignored elsewhere); a capture that
    fails turns graphs off for this decoder and the step runs eagerly."""

    def __init__(self, llm, rows: int, max_len: int, *, cuda_graphs: bool = True):
        base = base_causal_lm(llm)
        cfg = base.config
        if getattr(cfg, "model_type", None) != "phi3":
            raise UnsupportedModel(f"the static KV cache supports Phi-3 models, not {getattr(cfg, 'model_type', '?')!r}")
        core = base.model
        self.layers = list(core.layers[: cfg.num_hidden_layers])
        self.embed_tokens, self.norm, self.lm_head = core.embed_tokens, core.norm, base.lm_head
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.window = getattr(cfg, "sliding_window", None)
        self.rows, self.max_len = int(rows), int(max_len)
        weight = self.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        shape = (self.rows, self.kv_heads, self.max_len, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.cos, sin = self._rope_table(core.rotary_emb, cfg)
        self.signed_sin = signed(sin)
        self.columns = torch.arange(self.max_len, device=self.device)
        self.row_index = torch.arange(self.rows, device=self.device)
        self.tokens = torch.zeros(self.rows, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(self.rows, dtype=torch.long, device=self.device)
        self.use_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        # steps padded to the buckets below (rows, columns), as graphs need;
        # eager steps take the exact shape unless a test asks for buckets
        self.bucketed = self.use_graphs
        self.moves = 0
        self.capture_s: float | None = None
        self.graph_error: str | None = None
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.row_buckets = _buckets(self.rows, 1)
        self.length_buckets = _buckets(self.max_len, 64, step_after=1024)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @torch.no_grad()
    def _rope_table(self, rotary, cfg) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of every position, as the model's rotary module gives
        them for a sequence that ends at that position (``longrope`` switches
        factors past the original context, and so does this table)."""
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = rotary(probe, torch.arange(self.max_len, device=self.device)[None])
        cos, sin = cos[0].clone(), sin[0].clone()
        original = getattr(cfg, "original_max_position_embeddings", None)
        if original and original < self.max_len:
            c, s = rotary(probe, torch.arange(original, device=self.device)[None])
            cos[:original], sin[:original] = c[0], s[0]
        return cos, sin

    # ------------------------------------------------------------- rows
    def load(self, row: int, cache) -> None:
        """Copy a one-request ``DynamicCache`` into ``row`` (columns ``0..len-1``)."""
        layers = cache.layers
        n = layers[0].keys.shape[-2]
        if n > self.max_len:
            raise ValueError(f"a prompt of {n} tokens does not fit a KV cache row of {self.max_len}")
        for layer, k, v in zip(layers, self.keys, self.values):
            k[row, :, :n].copy_(layer.keys[0])
            v[row, :, :n].copy_(layer.values[0])

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Exchange rows ``a`` (its first ``length_a`` columns) and ``b``
        (``length_b``), one layer at a time through a copy of ``a``'s columns."""
        self.moves += 2
        for k, v in zip(self.keys, self.values):
            for t in (k, v):
                keep = t[a, :, :length_a].clone()
                t[a, :, :length_b].copy_(t[b, :, :length_b])
                t[b, :, :length_a].copy_(keep)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` columns into row ``dst``."""
        self.moves += 1
        for k, v in zip(self.keys, self.values):
            k[dst, :, :length].copy_(k[src, :, :length])
            v[dst, :, :length].copy_(v[src, :, :length])

    # ------------------------------------------------------------- step
    @torch.no_grad()
    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Feed ``tokens[i]`` at ``positions[i]`` to row ``i``; logits ``(n, vocab)``."""
        n = len(tokens)
        need = max(positions) + 1
        if n > self.rows or need > self.max_len:
            raise ValueError(f"{n} rows up to position {need - 1} exceed the KV cache's {self.rows} rows of "
                             f"{self.max_len} tokens")
        if self.bucketed:
            b = next(x for x in self.row_buckets if x >= n)
            length = next(x for x in self.length_buckets if x >= need)
        else:
            b, length = n, need
        self.tokens[:b].copy_(torch.tensor(tokens + [0] * (b - n), dtype=torch.long))
        # a padding row writes its key and value at the last column, which no request uses (a prompt and
        # its answer fit max_len, and the answer's last token is never fed): the rows past the running
        # ones keep what they hold (a finished request's prefix, kept for reuse) whatever the bucket
        self.positions[:b].copy_(torch.tensor(positions + [self.max_len - 1] * (b - n), dtype=torch.long))
        if self.use_graphs:
            try:
                return self._replay(b, length)[:n]
            except Exception as e:  # noqa: BLE001 - an op the capture refuses: run eagerly from now on
                self._graphs_failed(e)
        return self._forward(b, length)[:n]

    def _graphs_failed(self, e: Exception) -> None:
        self.use_graphs = False
        self.graph_error = f"{type(e).__name__}: {e}"
        self.graphs.clear()
        log.warning("CUDA graph capture failed, decoding eagerly from now on: %s", self.graph_error)

    @torch.no_grad()
    def capture_all(self) -> None:
        """Capture every (rows, length) bucket now, while no row is in use,
        so that no request waits for a capture later. A no-op without graphs."""
        import time

        if not self.use_graphs:
            return
        t = time.perf_counter()
        self.tokens.zero_()
        self.positions.zero_()
        try:
            for b in self.row_buckets:
                for length in self.length_buckets:
                    if (b, length) not in self.graphs:
                        self.graphs[(b, length)] = self._capture(b, length)
        except Exception as e:  # noqa: BLE001 - as in decode: eager from now on
            self._graphs_failed(e)
        torch.cuda.synchronize(self.device)
        self.capture_s = round(time.perf_counter() - t, 2)
        log.info("captured %d decoding graphs in %.1f s", len(self.graphs), self.capture_s)

    def _replay(self, b: int, length: int) -> torch.Tensor:
        key = (b, length)
        if key not in self.graphs:
            self.graphs[key] = self._capture(b, length)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _capture(self, b: int, length: int):
        # warm-up runs on a side stream, as capture requires; they write the
        # same keys and values the step writes, so running them is harmless
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(b, length)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a generate call running in another thread of the
        # replica does not break the capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self._forward(b, length)
        self._pool = graph.pool()
        log.debug("captured the decoding step for %d rows x %d columns", b, length)
        return graph, out

    def _forward(self, b: int, length: int) -> torch.Tensor:
        """One token for rows ``0..b-1``, attending over columns ``0..length-1``.
        Hidden states stay ``(b, hidden)``; norms, rotary embedding and the
        residual adds take few kernels (a replayed graph still pays a few
        microseconds for each of its kernels)."""
        tokens, pos, rows = self.tokens[:b], self.positions[:b], self.row_index[:b]
        x = self._layers(self.embed_tokens(tokens), rows[:, None], pos[:, None], slice(0, b), length)
        return self.lm_head(_rms_norm(x, self.norm))

    @torch.no_grad()
    def prefill(self, row0: int, embeds: list[torch.Tensor], starts: list[int]) -> torch.Tensor:
        """Continue rows ``row0..row0+k-1``, whose first ``starts[j]`` columns
        hold a prefix already: run ``embeds[j]`` (``(tokens, hidden)``, image
        features spliced in) at positions ``starts[j]..``, writing their keys
        and values into the rows; the logits of each row's last token, ``(k, vocab)``.
        The rows run together, padded to the longest; a padding token writes
        only past its row's real columns (its later tokens overwrite them)."""
        k, lens = len(embeds), [int(e.shape[0]) for e in embeds]
        width, need = max(lens), max(p + n for p, n in zip(starts, lens))
        if row0 + k > self.rows or need > self.max_len:
            raise ValueError(f"rows {row0}..{row0 + k - 1} up to position {need - 1} exceed the KV cache's "
                             f"{self.rows} rows of {self.max_len} tokens")
        x = embeds[0].new_zeros(k, width, embeds[0].shape[-1], dtype=self.dtype)
        for j, e in enumerate(embeds):
            x[j, :lens[j]] = e
        pos = (torch.tensor(starts, device=self.device)[:, None] + torch.arange(width, device=self.device))
        pos = pos.clamp_(max=self.max_len - 1)  # (k, width)
        rows = torch.arange(row0, row0 + k, device=self.device)[:, None]
        x = self._layers(x.view(k * width, -1), rows, pos, slice(row0, row0 + k), need)
        last = x.view(k, width, -1)[torch.arange(k, device=self.device), torch.tensor(lens, device=self.device) - 1]
        return self.lm_head(_rms_norm(last, self.norm))

    def _layers(self, x: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, kv_rows: slice,
                length: int) -> torch.Tensor:
        """Every decoder layer over ``x`` (``(n * width, hidden)``: ``width``
        tokens for each of ``n`` rows), writing token ``(i, t)``'s key and
        value at row ``rows[i, 0]``, column ``pos[i, t]`` (both ``(n, width)``
        or broadcast to it) and attending over the cache rows ``kv_rows``,
        columns ``0..length-1`` (causal, and within the sliding window). The
        hidden states after the last layer, before the final norm."""
        n, width = pos.shape
        cos = self.cos[pos][:, None]  # (n, 1, width, dim)
        sin = self.signed_sin[pos][:, None]
        cols = self.columns[:length]
        mask = cols <= pos[..., None]
        if self.window is not None:
            mask = mask & (cols > pos[..., None] - self.window)
        mask = mask[:, None]  # (n, 1, width, length)
        q_end = self.heads * self.head_dim
        k_end = q_end + self.kv_heads * self.head_dim
        gqa = self.kv_heads != self.heads
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = attn.qkv_proj(_rms_norm(x, layer.input_layernorm)).view(n, width, -1)
            qk = _rope(qkv[..., :k_end].view(n, width, self.heads + self.kv_heads, self.head_dim).transpose(1, 2),
                       cos, sin)
            keys[rows, :, pos] = qk[:, self.heads:].transpose(1, 2)
            values[rows, :, pos] = qkv[..., k_end:].view(n, width, self.kv_heads, self.head_dim)
            out = F.scaled_dot_product_attention(qk[:, :self.heads], keys[kv_rows, :, :length],
                                                 values[kv_rows, :, :length], attn_mask=mask, scale=self.scale,
                                                 enable_gqa=gqa)
            x = _add_linear(x, attn.o_proj, out.transpose(1, 2).reshape(n * width, -1))
            h = _rms_norm(x, layer.post_attention_layernorm)
            if hasattr(mlp, "gate_up_proj") and hasattr(mlp, "activation_fn"):  # Phi3MLP's own steps
                gate, up = mlp.gate_up_proj(h).chunk(2, dim=-1)
                x = _add_linear(x, mlp.down_proj, up * mlp.activation_fn(gate))
            else:
                x = x + mlp(h)
        return x

    def describe(self) -> dict:
        return {"rows": self.rows, "max_len": self.max_len, "gib": round(self.nbytes / 2**30, 3), "moves": self.moves,
                "cuda_graphs": self.use_graphs, "graphs_captured": len(self.graphs), "capture_s": self.capture_s, "graph_error": self.graph_error}
