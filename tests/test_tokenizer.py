"""The offline tokenizer: deterministic, Phi-3's control tokens, and the
loading path real checkpoints use."""
from __future__ import annotations

import json

import pytest

from models.config import ConfigError, load_config
from models.tokenizer import BASE_SPECIAL, PHI3_ADDED, ChatTokenizer, _build_bpe, load_tokenizer


def test_build_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _build_bpe(a, 2048, "<image>")
    _build_bpe(b, 2048, "<image>")
    ta, tb = json.loads((a / "tokenizer.json").read_text()), json.loads((b / "tokenizer.json").read_text())
    assert ta["model"]["vocab"] == tb["model"]["vocab"]
    assert ta["model"]["merges"] == tb["model"]["merges"]
    assert len(ta["model"]["merges"]) > 500


def test_phi3_control_tokens_in_phi3_order(tok):
    vocab = tok.hf.get_vocab()
    assert [vocab[t] for t in BASE_SPECIAL] == [0, 1, 2]  # <unk>, <s>, </s> as in Phi-3
    added = [vocab[t] for t in PHI3_ADDED]
    assert added == list(range(added[0], added[0] + len(PHI3_ADDED)))  # 32000.. in Phi-3, same order here
    assert vocab["<image>"] == added[-1] + 1
    assert tok.ids.bos == 1 and tok.ids.eos == vocab["<|endoftext|>"] == tok.ids.pad
    assert set(tok.stop_ids) == {vocab["<|end|>"], vocab["<|endoftext|>"], vocab["<|assistant|>"]}


def test_round_trip_of_ordinary_text(tok):
    text = "A small red circle is on the left of the picture. Ünïcode & emoji 🎨 ok?\nNew line."
    assert tok.decode(tok.encode_text(text), skip_special_tokens=False) == text
    # the generated corpus' words are single or few tokens
    assert len(tok.encode_text(" red circle on the left")) <= 6


def test_tool_corpus_makes_tool_prompts_and_calls_cost_tokens_by_the_word(tok):
    """``tokenizer.build.tool_corpus``: the offline BPE learns the tool form
    too, so a tool prompt and a call cost tokens by the word, as in Phi-3's
    tokenizer; without it they are spelt almost character by character. The
    other text encodes alike, but the vocabulary is larger (a different
    random draw of the tiny Phi-3, whose vocabulary is the tokenizer's)."""
    from data_pipelines.synthetic import TOOLS
    from models.tools import call_text, response_text, tools_prompt

    tools_tok = load_tokenizer(load_config("tiny", ["tokenizer.build.tool_corpus=true"]))
    for text in (tools_prompt(TOOLS), call_text("order_paint", {"colour": "purple"}),
                 response_text('{"status": "moved", "cell": "top left"}')):
        ids = tools_tok.encode_text(text)
        assert tools_tok.decode(ids, skip_special_tokens=False) == text
        assert len(ids) <= len(text) / 2.5, (len(ids), len(text))  # about 3 characters a token
        assert len(tok.encode_text(text)) >= len(text) / 1.6  # about 1.4 without
    plain = "Where is the small red circle? Top left."
    assert tools_tok.hf.tokenize(plain) == tok.hf.tokenize(plain) and len(tools_tok) > len(tok)
    with pytest.raises(ConfigError, match="tool_corpus must be true or false"):
        load_tokenizer(load_config("tiny", ["tokenizer.build.tool_corpus=yes please"]))


def test_loading_path_adds_image_token_when_missing(tmp_path):
    """A tokenizer folder lacking the configured image token (as Phi-3's own
    lacks one) gets it added as a special token with the next id."""
    from transformers import AutoTokenizer

    folder = tmp_path / "plain"
    folder.mkdir()
    _build_bpe(folder, 1024, "<image>")
    n_before = len(AutoTokenizer.from_pretrained(folder))
    cfg = load_config("tiny", ["tokenizer.build=null", f"tokenizer.name_or_path={folder}",
                               "tokenizer.image_token=<|image|>"])
    loaded = load_tokenizer(cfg)
    assert len(loaded) == n_before + 1
    assert loaded.ids.image == n_before
    assert loaded.hf.convert_tokens_to_ids("<|image|>") == loaded.ids.image
    assert loaded.ids.image not in loaded.encode_text("<|image|>")


def test_non_phi3_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>").save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="lacks the Phi-3 chat token"):
        ChatTokenizer.load(tmp_path)


def test_missing_tokenizer_folder_is_a_config_error(tmp_path):
    cfg = load_config("tiny", ["tokenizer.build=null", f"tokenizer.name_or_path={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="cannot load tokenizer"):
        load_tokenizer(cfg)


def test_fetching_phi3s_vocabulary_refuses_another_archive_and_names_an_index_it_cannot_reach(tmp_path, monkeypatch):
    """``models.phi3_vocab.fetch`` against a package index in a folder: an
    archive of the right name but other bytes is refused (nothing kept), and
    an index that is not there is named in the error."""
    import io
    import tarfile

    from models.phi3_vocab import ARCHIVE, GGUF, VocabError, fetch

    index = tmp_path / "simple"
    (index / "llama-cpp-python").mkdir(parents=True)
    with tarfile.open(tmp_path / ARCHIVE, "w:gz") as tar:
        data = b"not a vocabulary"
        info = tarfile.TarInfo(f"llama_cpp_python/vendor/llama.cpp/models/{GGUF}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (index / "llama-cpp-python" / "index.html").write_text(f'<a href="../../{ARCHIVE}#sha256=0">{ARCHIVE}</a>')
    monkeypatch.setenv("PIP_INDEX_URL", index.as_uri())
    with pytest.raises(VocabError, match=f"does not match {ARCHIVE}'s SHA-256"):
        fetch(tmp_path / "vocab", quiet=True)
    assert not (tmp_path / "vocab" / GGUF).exists()
    (index / "llama-cpp-python" / "index.html").write_text("<a href='other.tar.gz'>other</a>")
    with pytest.raises(VocabError, match=f"lists no {ARCHIVE}"):
        fetch(tmp_path / "vocab", quiet=True)
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "nowhere").as_uri())
    with pytest.raises(VocabError, match="could not download .* from file://.*nowhere"):
        fetch(tmp_path / "vocab", quiet=True)
