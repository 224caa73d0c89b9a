"""Save -> load reproduces logits exactly; mismatched checkpoints are refused."""
from __future__ import annotations

import json
import re

import pytest
import torch

from models.checkpoint import CheckpointMismatch, identity, load_checkpoint, read_meta
from models.config import load_config
from models.conversation import collate, encode_for_training
from models.multimodal import MultimodalPhi3


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_cfg):
    """A tiny model nudged away from its initialisation, then saved."""
    m = MultimodalPhi3.from_config(tiny_cfg, device="cpu", trainable=True)
    tok = m.tokenizer
    enc = encode_for_training(tok, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                                    {"role": "assistant", "content": "Purple."}], m.num_image_tokens, 1024)
    batch = collate([enc, enc], tok.ids.pad)
    feats = torch.randn(2, m.num_image_tokens, m.projector.in_dim, generator=torch.Generator().manual_seed(1))
    assert m.projector.normalize  # the tiny preset standardises features: the stats travel with the weights
    m.projector.set_feature_stats(torch.linspace(-1, 1, m.projector.in_dim), torch.linspace(0.5, 2, m.projector.in_dim))
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        m(**batch, image_features=feats).loss.backward()
        opt.step()
        opt.zero_grad()
    m.eval()
    path = m.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ck", extra={"step": 3})
    with torch.no_grad():
        logits = m(**batch, image_features=feats).logits
    return m, path, batch, feats, logits


def test_round_trip_reproduces_logits_exactly(trained):
    m, path, batch, feats, logits = trained
    loaded = load_checkpoint(path, device="cpu")
    with torch.no_grad():
        again = loaded(**batch, image_features=feats).logits
    assert torch.equal(logits, again)
    # and the lora weights really moved away from the fresh (zero-B) init
    fresh = MultimodalPhi3.from_config(m.cfg, device="cpu", with_vision=False, trainable=False)
    with torch.no_grad():
        assert not torch.equal(fresh(**batch, image_features=feats).logits, logits)


def test_feature_stats_are_saved_and_applied(trained):
    m, path, _, feats, _ = trained
    loaded = load_checkpoint(path, device="cpu")
    assert torch.equal(loaded.projector.feature_mean, torch.linspace(-1, 1, m.projector.in_dim))
    assert torch.equal(loaded.projector.feature_std, torch.linspace(0.5, 2, m.projector.in_dim))
    with torch.no_grad():
        want = loaded.projector.net((feats - loaded.projector.feature_mean) / loaded.projector.feature_std)
        assert torch.allclose(loaded.projector(feats), want, atol=1e-6)
        assert not torch.allclose(loaded.projector.net(feats), want, atol=1e-3)


def test_layout_and_plain_peft_loading(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from models.language import resolve_llm_source

    m, path, batch, feats, logits = trained
    assert (path / "projector.safetensors").exists() and (path / "adapter" / "adapter_model.safetensors").exists()
    meta = read_meta(path)
    assert meta["extra"] == {"step": 3} and meta["identity"] == identity(m.cfg)
    assert meta["identity"]["vision"]["token_mode"] == "patches"
    # the adapter folder loads in plain transformers + peft and gives the same text-only logits
    base = AutoModelForCausalLM.from_pretrained(resolve_llm_source(m.cfg.llm, m.tokenizer))
    plain = PeftModel.from_pretrained(base, str(path / "adapter")).eval()
    ids = torch.tensor([m.tokenizer.encode_text("hello there")])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, m(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("override", ["vision.token_mode=pooled", "vision.feature_layer=-1", "vision.patch_pool=1",
                                      "vision.jpeg_draft=true", "projector.kind=linear", "llm.seed=7"])
def test_identity_changes_are_refused(trained, override):
    _, path, *_ = trained
    with pytest.raises(CheckpointMismatch, match=override.split("=")[0].split(".")[-1]):
        load_checkpoint(path, device="cpu", overrides=[override])


def test_expected_config_mismatch_is_refused(trained):
    _, path, *_ = trained
    pooled = load_config("tiny", ["vision.token_mode=pooled"])
    with pytest.raises(CheckpointMismatch, match="token_mode: checkpoint .* has 'patches', expected 'pooled'"):
        load_checkpoint(path, device="cpu", expect=pooled)
    # an embeddings manifest style identity (vision only) is checked too
    with pytest.raises(CheckpointMismatch, match="model"):
        load_checkpoint(path, device="cpu", expect={"vision": {**identity(pooled)["vision"], "token_mode": "patches",
                                                              "model": "ViT-L-14-336"}})


def test_runtime_overrides_are_allowed(trained):
    m, path, batch, feats, logits = trained
    loaded = load_checkpoint(path, device="cpu", overrides=["tokenizer.max_length=512"], with_vision=False)
    assert loaded.cfg.tokenizer.max_length == 512 and loaded.vision is None


def test_tampered_weights_are_refused(trained, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, path, *_ = trained
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    meta = json.loads((bad / "mmphi.json").read_text())
    meta["fingerprints"]["llm_embeddings"] = "0" * 16
    (bad / "mmphi.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatch, match="base language model"):
        load_checkpoint(bad, device="cpu", with_vision=False)
    shutil.rmtree(bad)
    shutil.copytree(path, bad)
    state = load_file(str(bad / "projector.safetensors"))
    state["net.0.weight"] = state["net.0.weight"][:, :5].contiguous()
    save_file(state, str(bad / "projector.safetensors"))
    with pytest.raises(CheckpointMismatch, match="projector weights do not fit"):
        load_checkpoint(bad, device="cpu", with_vision=False)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an mmphi checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nosuch does not exist \(a checkpoint is a folder holding mmphi\.json"):
        load_checkpoint(tmp_path / "nosuch")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"notes\.txt is a file, not an mmphi checkpoint"):
        load_checkpoint(tmp_path / "notes.txt")


def test_a_run_folder_given_as_a_checkpoint_names_the_one_inside(trained, tmp_path):
    """``RUNS/NAME`` where ``RUNS/NAME/final`` was meant: the error names the
    final checkpoint, or, in a run that has not finished, its latest one."""
    import shutil

    _, path, *_ = trained
    run = tmp_path / "run"
    for name in ("checkpoint_2026-01-02_10-00-00.000001", "checkpoint_2026-01-02_11-00-00.000002"):
        shutil.copytree(path, run / name)
    (run / "checkpoint_2026-01-02_12-00-00.000003").mkdir()  # one Ray had not filled yet
    with pytest.raises(FileNotFoundError) as e:
        read_meta(run)
    msg = str(e.value)
    assert "training run's folder, not a checkpoint" in msg and "did not finish" in msg
    assert msg.endswith(f"its latest checkpoint is {run / 'checkpoint_2026-01-02_11-00-00.000002'}")
    shutil.copytree(path, run / "final")
    with pytest.raises(FileNotFoundError, match=f"its finished model is {re.escape(str(run / 'final'))}$"):
        load_checkpoint(run)
    assert read_meta(run / "final")["config"] == read_meta(path)["config"]


def test_a_checkpoint_lists_its_files_and_a_copy_cut_short_is_passed_over(trained, tmp_path, monkeypatch):
    """``mmphi.json`` lists every other file of the folder with its size (a
    trainer's state written before it included), so the newest complete
    checkpoint of a run is found from listings alone: nothing is loaded."""
    from pathlib import Path

    from ray_jobs.outputs import RunOutputs

    m = trained[0]
    root = tmp_path / "runs" / "r"
    for step in (4, 8):
        d = root / f"checkpoint_{step}"
        d.mkdir(parents=True)
        torch.save({"step": step, "optimizer": torch.zeros(4096)}, d / "train_state.pt")
        m.save_checkpoint(d, extra={"step": step, "run": "r"})
    newest = root / "checkpoint_8"
    files = read_meta(newest)["files"]
    assert {"train_state.pt", "projector.safetensors", "adapter/adapter_model.safetensors"} <= set(files)
    assert "mmphi.json" not in files
    assert files == {p.relative_to(newest).as_posix(): p.stat().st_size
                     for p in newest.rglob("*") if p.is_file() and p.name != "mmphi.json"}

    def no_load(*a, **kw):
        raise AssertionError("a checkpoint's state was loaded to find the newest")

    out = RunOutputs(str(tmp_path / "runs"), "r")
    monkeypatch.setattr(torch, "load", no_load)
    assert out.newest_checkpoint() == (8, str(newest))
    # a crash while storage received checkpoint_8: a file cut short, then one missing
    projector = newest / "projector.safetensors"
    whole = projector.read_bytes()
    projector.write_bytes(whole[:-16])
    assert out.newest_checkpoint() == (4, str(root / "checkpoint_4"))
    projector.write_bytes(whole)
    assert out.newest_checkpoint() == (8, str(newest))
    (newest / "train_state.pt").unlink()
    assert out.newest_checkpoint() == (4, str(root / "checkpoint_4"))
    monkeypatch.undo()

    # final/: the model without the trainer's state, and its list says so
    out.export_final(str(root / "checkpoint_4"))
    final = Path(out.final)
    assert not (final / "train_state.pt").exists()
    listed = read_meta(final)["files"]
    assert "train_state.pt" not in listed and listed == {k: v for k, v in files.items() if k != "train_state.pt"}
    assert all((final / f).stat().st_size == n for f, n in listed.items())
    assert out.final_step() == 4
    loaded = load_checkpoint(final, device="cpu")
    for a, b in zip(loaded.projector.parameters(), m.projector.parameters(), strict=True):
        assert torch.equal(a, b.detach().float())


def test_a_damaged_checkpoint_names_the_file(trained, tmp_path):
    import shutil

    from models.checkpoint import CheckpointError, read_projector

    _, path, *_ = trained
    bad = tmp_path / "bad-meta"
    shutil.copytree(path, bad)
    (bad / "mmphi.json").write_text("{\n oops")
    with pytest.raises(CheckpointError, match=r"bad-meta/mmphi\.json is not valid JSON"):
        read_meta(bad)
    with pytest.raises(FileNotFoundError, match="nosuch does not exist"):
        read_meta(tmp_path / "nosuch")
    cut = tmp_path / "cut"
    shutil.copytree(path, cut)
    data = (cut / "projector.safetensors").read_bytes()
    (cut / "projector.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"cut/projector\.safetensors is not a readable safetensors file"):
        read_projector(cut)
    with pytest.raises(CheckpointError, match=r"cut/projector\.safetensors is not a readable safetensors file"):
        load_checkpoint(cut, device="cpu", with_vision=False)
    (cut / "projector.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"projector\.safetensors is missing"):
        load_checkpoint(cut, device="cpu", with_vision=False)


def test_overrides_that_change_what_a_checkpoint_is_are_refused(tiny_cfg, tmp_path):
    """Runtime overrides (dtype, attention) pass; ones that change the
    checkpoint's identity or its trained adapter's LoRA settings are refused,
    each field named, in the driver's check as in the replica's load."""
    from models.checkpoint import CheckpointMismatch, checkpoint_config, read_meta, save_checkpoint
    from models.multimodal import MultimodalPhi3
    from serve.app import check_model_source
    from serve.settings import ServeSettings, SettingsError

    lora = tiny_cfg.to_dict()
    lora["llm"]["lora"]["enabled"] = True
    from models.config import config_from_dict

    model = MultimodalPhi3.from_config(config_from_dict(lora), with_vision=False)
    path = save_checkpoint(model, tmp_path / "ckpt")
    meta = read_meta(path)
    assert meta["has_adapter"]
    assert checkpoint_config(path, meta, ["llm.attn_implementation=eager"]).llm.attn_implementation == "eager"
    with pytest.raises(CheckpointMismatch) as e:
        checkpoint_config(path, meta, ["llm.lora.r=4"])
    r = tiny_cfg.llm.lora.r
    assert f"(llm.lora.r: the override has 4, but its adapter was trained with {r}): leave llm.lora.*" in str(e.value)
    with pytest.raises(CheckpointMismatch, match=r"vision.feature_layer: the override has -1, but the checkpoint "
                                                 r"was trained with 1\)"):
        checkpoint_config(path, meta, ["vision.feature_layer=-1"])
    with pytest.raises(CheckpointMismatch, match="llm.lora.alpha: the override has 8"):
        MultimodalPhi3.from_checkpoint(path, overrides=["llm.lora.alpha=8"], with_vision=False)
    with pytest.raises(SettingsError, match="llm.lora.dropout: the override has 0.5"):
        check_model_source(ServeSettings.from_dict({"checkpoint": str(path), "overrides": ["llm.lora.dropout=0.5"]}))
    # the training stage's switch (a projector run on a LoRA model keeps the adapter, frozen) is not a change
    assert not checkpoint_config(path, meta, ["llm.lora.enabled=false"]).llm.lora.enabled
