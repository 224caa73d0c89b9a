"""Shared fixtures: offline, a private weights cache, the tiny preset."""
from __future__ import annotations

import os
import shutil
import tempfile

# Before anything imports transformers / huggingface_hub: never wait on the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the run's own weights cache (tiny tokenizers, ...), removed when pytest ends
OWN_CACHE = None
if "MMPHI_CACHE" not in os.environ:
    OWN_CACHE = os.environ["MMPHI_CACHE"] = tempfile.mkdtemp(prefix="mmphi-test-cache-")

import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    session.config._mmphi_exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process once pytest is done (results and summary
    written), without the interpreter's teardown: a thread of a native
    library (Ray's core worker, xgrammar, tokenizers) crashed the process
    once at that point after every test had passed, turning a green run red.
    A Ray left running is shut down and the run's own weights cache removed
    first; ``MMPHI_TEST_FULL_TEARDOWN=1`` keeps the normal exit."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    if OWN_CACHE is not None:
        shutil.rmtree(OWN_CACHE, ignore_errors=True)
    status = getattr(config, "_mmphi_exit_status", None)
    if status is None or os.environ.get("MMPHI_TEST_FULL_TEARDOWN") == "1":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@pytest.fixture
def replica():
    """The LLM deployment's class without Ray (tiny preset, CPU), shut down after the test."""
    from serve.deployments import LLM

    llm = LLM.func_or_class({"preset": "tiny", "device": "cpu", "torch_threads": 0})
    yield llm
    llm.shutdown()


def streamed(llm, call: dict, **extra) -> list:
    """The messages the deployment's ``generate`` streams for ``call`` (with ``extra`` on top)."""
    import asyncio

    async def run() -> list:
        return [m async for m in llm.generate({**call, **extra})]

    return asyncio.run(run())


def answer_ids(llm, call: dict, **extra) -> list[int]:
    """The token ids of those messages, in order."""
    return [t for m in streamed(llm, call, **extra) for t in m]


def sentencepiece_tokenizer(pieces: list[str], specials: tuple[str, ...] = ()):
    """A tokenizer of Phi-3's kind (SentencePiece BPE with byte fallback:
    ``<0x0A>`` tokens, ``\u2581`` for a space) from a few ``pieces``, built
    offline; ``specials`` are added as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for piece in pieces:
        vocab[piece] = len(vocab)
    sp = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>")
    if specials:
        hf.add_special_tokens({"additional_special_tokens": list(specials)})
    return hf


@pytest.fixture(scope="session")
def tiny_cfg():
    from models.config import load_config

    return load_config("tiny")


@pytest.fixture(scope="session")
def tok(tiny_cfg):
    from models.tokenizer import load_tokenizer

    return load_tokenizer(tiny_cfg)


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    """A frozen (inference) tiny model with its vision tower; do not train it."""
    from models.multimodal import MultimodalPhi3

    model = MultimodalPhi3.from_config(tiny_cfg, device="cpu", trainable=False)
    model.eval()
    return model


class Handed(dict):
    """The keyword arguments a stand-in ``TorchTrainer`` got; it raised ``Handed.Stop``."""

    class Stop(Exception):
        pass


@pytest.fixture
def handed(monkeypatch):
    """The keyword arguments the next ``TorchTrainer`` gets (it then raises
    ``handed.Stop``): what a training run hands Ray Train, without Ray."""
    import ray.train.torch

    import data_pipelines.embed
    import data_pipelines.resources

    seen = Handed()

    def trainer(*a, **kw):
        seen.update(kw)
        raise Handed.Stop

    monkeypatch.setattr(data_pipelines.embed, "init_ray", lambda address: None)
    monkeypatch.setattr(data_pipelines.resources, "warn_if_absent", lambda *a: [])
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", trainer)
    return seen


@pytest.fixture(scope="session")
def cpu_bench(tmp_path_factory):
    """One run of ``make bench-gpu``'s CPU rehearsal (``bench/gpu_bench.py
    --cpu``: the embedding, training and serving benchmarks on the tiny
    preset), shared by the tests of the command and of each stage script:
    ``.result`` is its JSON, ``.stdout`` its table, ``.stage(name)`` the JSON
    that stage's own script wrote (``serve_bench.py``, ``train_bench.py``,
    ``embed_bench.py``)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    root = Path(__file__).resolve().parents[1]
    tmp = tmp_path_factory.mktemp("cpu-bench")
    out, work = tmp / "gpu.json", tmp / "w"
    proc = subprocess.run([sys.executable, str(root / "bench" / "gpu_bench.py"), "--cpu", "--workdir", str(work),
                           "--out", str(out)], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return SimpleNamespace(result=json.loads(out.read_text()), stdout=proc.stdout,
                           stage=lambda name: json.loads((work / f"{name}.json").read_text()))


def write_train_inputs(root: Path) -> Path:
    """A data set ``root/d`` of a few image conversations (the images
    themselves absent) and an embeddings manifest ``root/e`` of the tiny
    preset's encoder: what a training driver checks before Ray starts (for
    tests that stop before the workers)."""
    import json

    from data_pipelines.embed import FORMAT
    from models.config import load_config
    from models.vision import vision_identity

    (root / "d" / "images").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 4), ("val", 1)):
        records = [{"id": f"{split}{i}", "image": f"{split}{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "Red."}]}
            for i in range(n)]
        (root / "d" / f"{split}.json").write_text(json.dumps(records))
    (root / "e").mkdir(exist_ok=True)
    (root / "e" / "manifest.json").write_text(json.dumps(
        {"format": FORMAT, "encoder": vision_identity(load_config("tiny").vision), "shape": [1, 1],
         "dtype": "float16", "shards": []}))
    return root


def scraped(name: str, **labels) -> list[float]:
    """The values of metric ``name``'s series with ``labels`` on this node's
    Ray metrics port (Prometheus text; Ray adds the ``ray_`` prefix), one per
    series (e.g. per worker process)."""
    import httpx

    from serve.app import metrics_url

    url = metrics_url()
    assert url, "no metrics port on this Ray node"
    values = []
    for line in httpx.get(url, timeout=30).text.splitlines():
        if not line.startswith(f"ray_{name}{{") and not line.startswith(f"ray_{name} "):
            continue
        series, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            values.append(float(value))
    return values


def scrape(name: str, **labels) -> float:
    """The sum of :func:`scraped`'s values (0 where no series matches)."""
    return sum(scraped(name, **labels))


GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$application": "mmphi", "$run": ".+"}


def promql_selectors(expr: str) -> list[tuple[str, frozenset]]:
    """Parse PromQL ``expr`` (Grafana's variables filled in; a syntax error
    raises ValueError) and return, for each series selector in it, the
    metric's name and the labels of the nearest ``by (...)`` around it."""
    import promql_parser as pq

    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"an unknown Grafana variable in {expr}"
    found = []

    def walk(node, by: frozenset) -> None:
        if isinstance(node, pq.VectorSelector):
            found.append((node.name, by))
            return
        if isinstance(node, pq.MatrixSelector):
            return walk(node.vector_selector, by)
        if isinstance(node, pq.AggregateExpr) and node.modifier is not None \
                and node.modifier.type == pq.AggModifierType.By:
            by = frozenset(node.modifier.labels)
        for attr in ("expr", "lhs", "rhs", "param"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (int, float, str)):
                walk(child, by)
        for child in getattr(node, "args", None) or []:
            walk(child, by)

    walk(pq.parse(expr), frozenset())
    return found
