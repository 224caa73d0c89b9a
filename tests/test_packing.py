"""Packed steps and the chunked loss are exact: a conversation packed with
others gets the losses and gradients it gets alone (no cross-contamination
through attention, positions or shifted labels), and the chunked loss is
Hugging Face's loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.conversation import IGNORE_INDEX, collate, encode_for_training
from ray_jobs.packing import (
    TrainingForward,
    causal_lm_loss,
    pack_batches,
    packed_batch,
    padded_batch,
)


def _messages(k: int, image: bool) -> list[dict]:
    words = ["red", "blue", "circle", "square", "left", "right", "small", "large", "one", "two", "three"]
    q = " ".join(words[(k + j) % len(words)] for j in range(3 + k % 4))
    a = " ".join(words[(2 * k + j) % len(words)] for j in range(2 + 3 * (k % 5)))
    user = ([{"type": "image"}] if image else []) + [{"type": "text", "text": f"What is {q}?"}]
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": a}]
    if k % 3 == 0:  # some multi-turn
        msgs += [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": a.upper()}]
    return msgs


@pytest.fixture(scope="module")
def model():
    from models.config import load_config
    from models.multimodal import MultimodalPhi3

    cfg = load_config("tiny", ["llm.lora.dropout=0.0"])
    m = MultimodalPhi3.from_config(cfg, device="cpu", with_vision=False, trainable=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero: give the adapters a say in the outputs
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    m.train()
    return m


@pytest.fixture(scope="module")
def convs(model):
    tok = model.tokenizer
    images = [k % 3 != 1 for k in range(7)]
    enc = [encode_for_training(tok, _messages(k, img), model.num_image_tokens, 1024) for k, img in enumerate(images)]
    g = torch.Generator().manual_seed(1)
    feats = {k: torch.randn(model.num_image_tokens, model.projector.in_dim, generator=g)
             for k, img in enumerate(images) if img}
    return enc, feats


def _features(samples, feats):
    chosen = [feats[i] for i in samples if i in feats]
    return torch.stack(chosen) if chosen else None


def _token_losses(model, inputs, image_features):
    """Per-token next-token losses (rows, width-1); IGNORE_INDEX targets give 0."""
    embeds = model.embed(inputs["input_ids"], image_features)
    logits = model.llm(inputs_embeds=embeds, attention_mask=inputs.get("attention_mask"),
                       position_ids=inputs.get("position_ids"), use_cache=False).logits
    targets = inputs["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX,
                           reduction="none")


ROWS = [[0, 1, 2], [3, 4], [5, 6]]


def test_packed_layout(model, convs):
    enc, _ = convs
    b = packed_batch(enc, ROWS, model.tokenizer.ids.pad)
    x = b.inputs
    assert set(x) == {"input_ids", "labels", "position_ids"}  # no attention mask: positions make the blocks
    assert b.samples == [0, 1, 2, 3, 4, 5, 6]
    assert b.real_tokens == sum(len(e) for e in enc)
    assert b.supervised_tokens == sum(sum(label != IGNORE_INDEX for label in e.labels) for e in enc)
    assert x["input_ids"].shape[1] == max(sum(len(enc[i]) for i in row) for row in ROWS)
    at = 0
    for i in ROWS[0]:
        n = len(enc[i])
        assert x["input_ids"][0, at:at + n].tolist() == enc[i].input_ids
        assert x["position_ids"][0, at:at + n].tolist() == list(range(n))
        assert x["labels"][0, at] == IGNORE_INDEX
        at += n
    # the padding of a shorter row is a block of its own, never a target
    width = x["input_ids"].shape[1]
    tail = width - sum(len(enc[i]) for i in ROWS[1])
    if tail:
        assert x["position_ids"][1, -tail:].tolist() == list(range(tail))
        assert (x["labels"][1, -tail:] == IGNORE_INDEX).all()


def test_packed_per_conversation_losses_equal_alone(model, convs):
    enc, feats = convs
    b = packed_batch(enc, ROWS, model.tokenizer.ids.pad)
    with torch.no_grad():
        packed = _token_losses(model, b.inputs, _features(b.samples, feats))
        for r, row in enumerate(ROWS):
            at = 0
            for i in row:
                n = len(enc[i])
                alone = _token_losses(model, collate([enc[i]], model.tokenizer.ids.pad), _features([i], feats))[0]
                mine = packed[r, at:at + n - 1]
                torch.testing.assert_close(mine, alone, rtol=1e-4, atol=1e-5)
                assert alone.sum() > 0
                at += n
        # the check can fail: the same rows as one causal sequence each mix the conversations
        mixed = dict(b.inputs, position_ids=None)
        mixed = _token_losses(model, mixed, _features(b.samples, feats))
        n0 = len(enc[ROWS[0][0]])
        second = slice(n0, n0 + len(enc[ROWS[0][1]]) - 1)
        assert not torch.allclose(mixed[0, second], packed[0, second], atol=1e-3)


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_same(a, b, tol=1e-5):
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    assert set(a[1]) == set(b[1]) and len(a[1]) > 4
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], rtol=tol * 10, atol=tol, msg=n)


@pytest.mark.parametrize("chunk", [7, 4096])
def test_chunked_loss_is_hf_loss_with_the_same_gradients(model, convs, chunk):
    enc, feats = convs
    idx = [0, 1, 2, 3, 4, 5, 6]
    b = padded_batch(enc, idx, model.tokenizer.ids.pad)
    f = _features(b.samples, feats)
    hf = _loss_and_grads(model, lambda: model(**b.inputs, image_features=f).loss)
    ours = _loss_and_grads(model, lambda: causal_lm_loss(model, **b.inputs, image_features=f, chunk=chunk))
    _assert_same(ours, hf)
    # and the projector and LoRA both learn from it
    assert any("projector" in n for n in ours[1]) and any("lora_" in n for n in ours[1])


@pytest.mark.parametrize("chunk", [0, 16])
def test_a_packed_step_is_the_padded_step(model, convs, chunk):
    """Same conversations, padded one per row or packed: same loss, same gradients."""
    enc, feats = convs
    fwd = TrainingForward(model, chunk)
    pad = model.tokenizer.ids.pad
    padded = padded_batch(enc, [0, 1, 2, 3, 4, 5, 6], pad)
    packed = packed_batch(enc, ROWS, pad)
    assert packed.slots < padded.slots
    a = _loss_and_grads(model, lambda: fwd(**padded.inputs, image_features=_features(padded.samples, feats)).loss)
    b = _loss_and_grads(model, lambda: fwd(**packed.inputs, image_features=_features(packed.samples, feats)).loss)
    _assert_same(b, a)


def test_no_supervised_token_gives_zero_loss_with_a_graph(model, convs):
    enc, feats = convs
    b = padded_batch(enc, [1], model.tokenizer.ids.pad)
    b.inputs["labels"][:] = IGNORE_INDEX
    loss = causal_lm_loss(model, **b.inputs, image_features=_features([1], feats), chunk=8)
    assert loss.item() == 0.0 and loss.requires_grad


def test_qlora_with_checkpointing_chunked_equals_hf():
    """The phi3-mini path (4-bit NF4 base, gradient checkpointing) at tiny size."""
    from models.config import load_config
    from models.multimodal import MultimodalPhi3

    cfg = load_config("tiny", ["llm.load_in_4bit=true", "llm.gradient_checkpointing=true"])
    m = MultimodalPhi3.from_config(cfg, device="cpu", with_vision=False, trainable=True)
    m.train()
    tok = m.tokenizer
    enc = [encode_for_training(tok, _messages(k, k != 2), m.num_image_tokens, 1024) for k in range(4)]
    f = torch.randn(3, m.num_image_tokens, m.projector.in_dim, generator=torch.Generator().manual_seed(2))
    padded = padded_batch(enc, [0, 1, 2, 3], tok.ids.pad)
    packed = packed_batch(enc, [[0, 1], [2, 3]], tok.ids.pad)
    hf = _loss_and_grads(m, lambda: m(**padded.inputs, image_features=f).loss)
    ours = _loss_and_grads(m, lambda: TrainingForward(m, 8)(**packed.inputs, image_features=f).loss)
    _assert_same(ours, hf, tol=1e-4)


def _last_mlp_rows(model, fn):
    """``fn()``'s loss, and how many token rows the last decoder layer's MLP saw."""
    from models.language import base_causal_lm

    seen = []
    mlp = base_causal_lm(model.llm).get_decoder().layers[-1].mlp
    handle = mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    try:
        loss = fn()
    finally:
        handle.remove()
    return loss, seen


@pytest.mark.parametrize("packed", [False, True])
def test_the_last_layer_runs_at_answer_positions_only(model, convs, packed):
    """Same loss and gradients as the whole last layer, which its MLP computes
    for every token; the trimmed one computes it for the supervised ones."""
    enc, feats = convs
    pad = model.tokenizer.ids.pad
    b = packed_batch(enc, ROWS, pad) if packed else padded_batch(enc, [0, 1, 2, 3, 4, 5, 6], pad)
    f = _features(b.samples, feats)
    whole = _loss_and_grads(model, lambda: causal_lm_loss(model, **b.inputs, image_features=f, last_layer="all"))
    (_, rows_all) = _last_mlp_rows(model, lambda: causal_lm_loss(model, **b.inputs, image_features=f, last_layer="all"))
    trimmed = _loss_and_grads(model, lambda: causal_lm_loss(model, **b.inputs, image_features=f))
    (_, rows) = _last_mlp_rows(model, lambda: causal_lm_loss(model, **b.inputs, image_features=f))
    _assert_same(trimmed, whole)
    assert rows_all == [b.slots]
    supervised = int((b.inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert rows == [supervised] and supervised < b.slots / 2
    with pytest.raises(ValueError, match="last_layer"):
        causal_lm_loss(model, **b.inputs, image_features=f, last_layer="some")


def test_the_trimmed_last_layer_is_not_fooled_by_an_in_place_rotary_kernel(model, convs, monkeypatch):
    """--kernels liger replaces Phi-3's rotary function with a kernel that
    rotates its query and key tensors in place; the trimmed layer rotates with
    its own function, so such a replacement leaves its loss the whole layer's."""
    from transformers.models.phi3 import modeling_phi3 as mp

    hf_rope = mp.apply_rotary_pos_emb

    def in_place(q, k, cos, sin, *args, **kwargs):  # an in-place kernel: q, then k, overwritten; both returned
        q.copy_(hf_rope(q, q, cos, sin, *args, **kwargs)[0])
        k.copy_(hf_rope(k, k, cos, sin, *args, **kwargs)[1])
        return q, k

    enc, feats = convs
    b = padded_batch(enc, [0, 1, 2, 3, 4, 5, 6], model.tokenizer.ids.pad)
    f = _features(b.samples, feats)
    monkeypatch.setattr(mp, "apply_rotary_pos_emb", in_place)
    with torch.no_grad():
        whole = causal_lm_loss(model, **b.inputs, image_features=f, last_layer="all")
        trimmed = causal_lm_loss(model, **b.inputs, image_features=f)
    assert trimmed.item() == pytest.approx(whole.item(), rel=1e-5, abs=1e-6)


def test_a_compiled_last_layer_runs_whole(model):
    """A layer given to torch.compile keeps its compiled forward: the trimmed path steps aside."""
    from models.language import base_causal_lm
    from ray_jobs.packing import _trimmable

    decoder = base_causal_lm(model.llm).get_decoder()
    assert _trimmable(decoder)
    decoder.layers[-1].compile(dynamic=True)  # compiles on its first call, which never comes here
    try:
        assert not _trimmable(decoder)
    finally:
        decoder.layers[-1]._compiled_call_impl = None
    assert _trimmable(decoder)


def test_trimmed_last_layer_with_grouped_queries_and_a_sliding_window():
    """Grouped-query attention (2 key/value heads for 4 queries) and a window
    of 6 tokens, shorter than the conversations: the trimmed layer masks like
    Hugging Face's (against its own loss), and packed like padded."""
    from models.config import load_config
    from models.multimodal import MultimodalPhi3

    cfg = load_config("tiny", ["llm.random_init.num_key_value_heads=2", "llm.random_init.sliding_window=6",
                               "llm.lora.dropout=0.0"])
    m = MultimodalPhi3.from_config(cfg, device="cpu", with_vision=False, trainable=True)
    m.train()
    decoder_cfg = m.llm.get_base_model().config if hasattr(m.llm, "get_base_model") else m.llm.config
    assert decoder_cfg.num_key_value_heads == 2 and decoder_cfg.sliding_window == 6
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    tok = m.tokenizer
    enc = [encode_for_training(tok, _messages(k, k != 2), m.num_image_tokens, 1024) for k in range(5)]
    f = torch.randn(4, m.num_image_tokens, m.projector.in_dim, generator=torch.Generator().manual_seed(5))
    padded = padded_batch(enc, [0, 1, 2, 3, 4], tok.ids.pad)
    packed = packed_batch(enc, [[0, 1], [2, 3, 4]], tok.ids.pad)
    hf = _loss_and_grads(m, lambda: m(**padded.inputs, image_features=f).loss)
    ours = _loss_and_grads(m, lambda: causal_lm_loss(m, **padded.inputs, image_features=f, chunk=8))
    _assert_same(ours, hf)
    ours_packed = _loss_and_grads(m, lambda: causal_lm_loss(m, **packed.inputs, image_features=f, chunk=8))
    _assert_same(ours_packed, hf)
    # the window matters here: without it the same weights give another loss
    decoder_cfg.sliding_window = None
    try:
        with torch.no_grad():
            unwindowed = causal_lm_loss(m, **padded.inputs, image_features=f, chunk=8)
    finally:
        decoder_cfg.sliding_window = 6
    assert abs(unwindowed.item() - hf[0].item()) > 1e-3


def test_pack_batches_fill_rows_without_overlap():
    g = torch.Generator().manual_seed(3)
    lengths = [int(x) for x in torch.randint(20, 300, (500,), generator=g)]
    cap, rows = 512, 4
    steps = pack_batches(lengths, rows, cap, seed=1, epoch=0, rank=0, world=1)
    seen = [i for step in steps for row in step for i in row]
    assert sorted(seen) == list(range(500))  # one worker: every conversation exactly once
    assert all(sum(lengths[i] for i in row) <= cap for step in steps for row in step)
    assert sum(len(step) == rows for step in steps) >= len(steps) - 1  # at most one partial step
    fill = sum(lengths) / (cap * sum(len(step) for step in steps))
    assert fill > 0.9, fill
    # two workers: disjoint, the same number of steps, deterministic, another order next epoch
    shards = [pack_batches(lengths, rows, cap, seed=1, epoch=0, rank=r, world=2) for r in range(2)]
    a, b = ({i for step in s for row in step for i in row} for s in shards)
    assert not a & b and len(shards[0]) == len(shards[1])
    assert shards[0] == pack_batches(lengths, rows, cap, seed=1, epoch=0, rank=0, world=2)
    assert shards[0] != pack_batches(lengths, rows, cap, seed=1, epoch=1, rank=0, world=2)
    with pytest.raises(ValueError, match="does not fit"):
        pack_batches([600], rows, cap, seed=0, epoch=0, rank=0, world=1)


def test_validation_loss_and_token_accuracy_are_hugging_faces(model, convs):
    """The job's evaluation (logits at answer positions only, batches of
    similar length) gives the mean loss and the token accuracy of the model's
    full logits over every supervised token."""
    from types import SimpleNamespace

    from ray_jobs.train import evaluate

    from dataclasses import replace

    enc, feats = convs
    samples = [SimpleNamespace(image=f"{k}.png" if k in feats else None) for k in range(len(enc))]
    store = SimpleNamespace(batch=lambda images: torch.stack([feats[int(p[:-4])] for p in images]) if images else None)
    pad = model.tokenizer.ids.pad
    losses, right, total = 0.0, 0, 0
    with torch.no_grad():
        # every other supervised label becomes the model's own prediction (the inputs stay): about half right
        guessed = []
        for k, e in enumerate(enc):
            logits = model(**collate([e], pad), image_features=_features([k], feats)).logits[0]
            labels = list(e.labels)
            supervised = [i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX]
            for i in supervised[::2]:
                labels[i] = int(logits[i - 1].argmax())
            guessed.append(replace(e, labels=labels))
        enc = guessed
        for k, e in enumerate(enc):  # one at a time: no padding, no batching
            inputs = collate([e], pad)
            f = _features([k], feats)
            losses += float(_token_losses(model, inputs, f).sum())
            logits = model(**inputs, image_features=f).logits[0, :-1]
            targets = inputs["labels"][0, 1:]
            keep = targets != IGNORE_INDEX
            right += int((logits.argmax(-1)[keep] == targets[keep]).sum())
            total += int(keep.sum())
    r = evaluate(model, model.tokenizer, enc, samples, store, [], 1, 0, 3)
    assert model.training  # evaluation hands the model back in training mode
    assert r["val_loss"] == pytest.approx(losses / total, rel=1e-5)
    assert r["token_accuracy"] == pytest.approx(right / total)
    assert 0.3 < right / total < 0.7  # the accuracy check can fail either way
    answers_only = evaluate(model, model.tokenizer, enc, samples, store, [], 1, 0, 3, loss=False)
    assert "val_loss" not in answers_only and answers_only["answer_accuracy"] == {}
