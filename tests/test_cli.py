"""The ``mmphi`` console script, run as a user runs it: in a subprocess,
offline, with the test session's private weights cache."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("mmphi")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "mmphi"]
PROMPT = "What colour is the shape?"


def cli_env(cache: str | os.PathLike | None = None) -> dict:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["MMPHI_CACHE"] = str(cache or os.environ["MMPHI_CACHE"])  # set by tests/conftest.py
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def mmphi(*args: str, cwd: Path, cache=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMAND, *map(str, args)], cwd=cwd, env=cli_env(cache), capture_output=True,
                          text=True, timeout=timeout)


def describe(p: subprocess.CompletedProcess) -> str:
    return f"rc={p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


def make_image(path: Path) -> Path:
    img = Image.new("RGB", (64, 64), (50, 50, 50))
    img.paste((220, 30, 30), (16, 16, 48, 48))
    img.save(path)
    return path


def make_wav(path: Path) -> Path | None:
    if shutil.which("ffmpeg") is None:
        return None
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi",
                    "-i", "sine=frequency=440:duration=1", str(path)], check=True, timeout=60)
    return path


@pytest.fixture(scope="module")
def files(work) -> dict:
    corrupt = work / "corrupt.png"
    corrupt.write_bytes(np.random.RandomState(0).bytes(3000))
    txt = work / "notes.txt"
    txt.write_text("this is not audio\n")
    return {
        "image": make_image(work / "red square.png"),  # a space in the name: argv, not a shell
        "corrupt": corrupt, "txt": txt,
        "wav": make_wav(work / "tone.wav"),
    }


@pytest.fixture(scope="module")
def runs(work, files, tmp_path_factory, tiny_model):
    """Every quick CLI run of this module, started together (each pays the
    torch import). Values are futures of ``CompletedProcess``.

    ``chat`` uses the session cache, which ``tiny_model`` (tests/conftest.py)
    has filled with the tiny weights; ``chat_cold`` gets an empty cache of its
    own, so it always materialises the random weights first."""
    chat = ["chat", "--image", files["image"], "--prompt", PROMPT, "--max-new-tokens", 4]
    jobs = {
        "chat_cold": (chat, tmp_path_factory.mktemp("cold-cache")), "chat": (chat, None),
        "help": (["--help"], None), "none": ([], None), "presets": (["presets"], None),
        "presets_tiny": (["presets", "tiny", "--set", "llm.lora.r=4"], None),
        "presets_nosuch": (["presets", "nosuch"], None),
        "presets_bad_set": (["presets", "tiny", "--set", "vision.tokn_mode=x"], None),
        "chat_corrupt": (["chat", "--image", files["corrupt"], "--prompt", PROMPT], None),
        "chat_empty": (["chat"], None),
        "transcribe_txt": (["transcribe", files["txt"]], None),
    }
    if files["wav"] is not None:
        jobs["transcribe_wav"] = (["transcribe", files["wav"]], None)
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {k: pool.submit(mmphi, *args, cwd=work, cache=cache) for k, (args, cache) in jobs.items()}


def result(runs, name: str) -> subprocess.CompletedProcess:
    if name not in runs:
        pytest.skip(f"{name} was not run (ffmpeg is not installed)")
    return runs[name].result()


# ---------------------------------------------------------------- help / presets


def test_help_lists_commands(runs):
    p = result(runs, "help")
    assert p.returncode == 0, describe(p)
    listed = {m.group(1) for m in re.finditer(r"^ {2,}([a-z]+) {2,}\S", p.stdout, re.M)}
    assert {"demo", "presets", "chat", "transcribe"} <= listed, p.stdout


def test_version_is_the_installed_packages(capsys):
    """``mmphi --version`` names the version the package was installed as
    (pyproject.toml's), so a bug report can say which one it ran."""
    import importlib.metadata

    from mmphi.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    declared = re.search(r'^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert capsys.readouterr().out == f"mmphi {declared}\n"
    assert importlib.metadata.version("mmphi") == declared


def test_the_parser_imports_no_model_library():
    """Every command's flags (the training job's kernel, compile and loss
    choices included) come without torch, Ray or transformers: ``mmphi
    --help`` and a usage error answer at once."""
    code = ("import sys, mmphi.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'ray', 'transformers', 'peft', 'open_clip') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, describe(p)
    assert p.stdout.strip() == "[]", p.stdout


def test_every_command_has_its_help():
    """``mmphi COMMAND [SUB] --help`` formats for every command and
    subcommand (argparse formats help texts with %: a bare one breaks it)."""
    import argparse

    from mmphi.cli import build_parser

    def walk(parser, path):
        text = parser.format_help()
        assert text.startswith("usage:"), path
        seen = [path]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    seen += walk(sub, f"{path} {name}")
        return seen

    seen = walk(build_parser(), "mmphi")
    assert {"mmphi demo", "mmphi train qlora", "mmphi data embed", "mmphi serve"} <= set(seen), seen


def test_no_command_is_a_usage_error(runs):
    p = result(runs, "none")
    assert p.returncode == 2 and "usage" in p.stderr.lower(), describe(p)


def test_presets_lists_names(runs):
    p = result(runs, "presets")
    assert p.returncode == 0, describe(p)
    names = p.stdout.split()
    assert "tiny" in names and "phi3-mini" in names


def test_presets_prints_resolved_yaml(runs):
    p = result(runs, "presets_tiny")
    assert p.returncode == 0, describe(p)
    data = yaml.safe_load(p.stdout)
    assert isinstance(data, dict)
    assert data["llm"]["lora"]["r"] == 4
    assert data["name"] == "tiny" and data["vision"]["model"] == "mmphi-tiny-vit"


def test_presets_unknown_name(runs):
    p = result(runs, "presets_nosuch")
    assert p.returncode == 2, describe(p)
    assert "unknown preset" in p.stderr and "nosuch" in p.stderr
    assert p.stdout == ""


def test_presets_bad_override(runs):
    p = result(runs, "presets_bad_set")
    assert p.returncode == 2, describe(p)
    assert "vision.tokn_mode" in p.stderr


# ---------------------------------------------------------------- chat


def test_chat_answers_one_line(runs):
    warm = result(runs, "chat")
    assert warm.returncode == 0, describe(warm)
    lines = warm.stdout.splitlines()
    assert len(lines) == 1, describe(warm)
    assert warm.stdout.endswith("\n") and lines[0].strip()


def test_chat_is_deterministic(runs):
    first, warm = result(runs, "chat_cold"), result(runs, "chat")
    assert first.returncode == 0, describe(first)
    # the answer (last stdout line) of the seeded random model is the same run to run
    assert first.stdout.splitlines()[-1] == warm.stdout.splitlines()[-1]


def test_chat_answers_one_line_on_a_cold_cache(runs):
    first = result(runs, "chat_cold")
    assert first.returncode == 0
    assert len(first.stdout.splitlines()) == 1, first.stdout


def test_chat_corrupt_image(runs, files):
    p = result(runs, "chat_corrupt")
    assert p.returncode == 2, describe(p)
    assert "could not decode an image" in p.stderr and str(files["corrupt"]) in p.stderr
    assert p.stdout == ""


def test_chat_needs_a_prompt_or_an_image(runs):
    p = result(runs, "chat_empty")
    assert p.returncode == 2, describe(p)
    assert "--prompt" in p.stderr and "--image" in p.stderr
    assert p.stdout == ""


# ---------------------------------------------------------------- transcribe


def test_transcribe_wav(runs, files):
    p = result(runs, "transcribe_wav")
    wav = files["wav"]
    assert p.returncode == 0, describe(p)
    lines = [line for line in p.stdout.splitlines() if line.startswith(str(wav))]
    assert len(lines) == 1, describe(p)
    assert lines[0].startswith(f"{wav}\t")


def test_transcribe_text_file(runs, files):
    p = result(runs, "transcribe_txt")
    txt = files["txt"]
    assert p.returncode == 1, describe(p)
    assert "could not decode audio" in p.stderr and str(txt) in p.stderr
    assert f"{txt}\t" not in p.stdout


def test_transcribe_takes_a_language_and_a_temperature(files, capsys, monkeypatch):
    """``--language`` (a code or a name) and ``--temperature`` reach Whisper; a
    language it does not know is refused before the model loads."""
    from mmphi.cli import main
    from models import speech

    if files["wav"] is None:
        pytest.skip("ffmpeg is not installed")
    calls = []
    real = speech.SpeechRecognizer.recognize

    def recognize(self, source, *, language=None, temperature=None):
        calls.append((language, temperature))
        return real(self, source, language=language, temperature=temperature)

    monkeypatch.setattr(speech.SpeechRecognizer, "recognize", recognize)
    assert main(["transcribe", str(files["wav"]), "--language", "German", "--temperature", "0.5"]) == 0
    assert capsys.readouterr().out.startswith(f"{files['wav']}\t") and calls == [("de", 0.5)]
    assert main(["transcribe", str(files["wav"])]) == 0 and calls[-1] == (None, None)  # the preset's

    def no_load(*a, **k):
        raise AssertionError("Whisper was loaded for a language it does not know")

    monkeypatch.setattr(speech, "load_whisper", no_load)
    assert main(["transcribe", str(files["wav"]), "--language", "klingon"]) == 2
    assert capsys.readouterr().err == ("mmphi transcribe: language 'klingon' is not supported; use a language code "
                                       "such as 'en' or a name such as 'english' (the languages Whisper knows)\n")
    for bad in ("1.5", "warm", "nan"):
        with pytest.raises(SystemExit) as e:
            main(["transcribe", str(files["wav"]), "--temperature", bad])
        assert e.value.code == 2 and "--temperature" in capsys.readouterr().err


def test_audio_that_does_not_decode_costs_no_model_load(files, tmp_path, capsys, monkeypatch):
    """``transcribe`` and ``chat --audio`` decode a file before Whisper loads:
    a missing or non-audio file is named without loading a model, and
    Whisper loads once, at the first file that decodes."""
    from mmphi.cli import main
    from models import speech

    real = speech.load_whisper
    loads = []

    def counted(*a, **k):
        loads.append(1)
        return real(*a, **k)

    monkeypatch.setattr(speech, "load_whisper", counted)
    missing = tmp_path / "nosuch.wav"
    assert main(["transcribe", str(missing), str(files["txt"])]) == 1
    err = capsys.readouterr().err.splitlines()
    assert loads == [] and len(err) == 2, err
    assert err[0] == f"mmphi transcribe: could not decode audio from {str(missing)!r}: no such file"
    assert err[1].startswith(f"mmphi transcribe: could not decode audio from {str(files['txt'])!r}: ffmpeg says: ")
    assert main(["chat", "--prompt", "hi", "--audio", str(files["txt"])]) == 2
    assert loads == [] and capsys.readouterr().err.startswith("mmphi chat: could not decode audio from ")
    if files["wav"] is None:
        return
    assert main(["transcribe", str(missing), str(files["wav"]), str(files["wav"])]) == 1
    out = capsys.readouterr()
    assert loads == [1] and "no such file" in out.err
    assert [line.split("\t")[0] for line in out.out.splitlines()] == [str(files["wav"])] * 2


def test_data_embed_names_a_bad_input_before_ray_starts(tmp_path, capsys):
    """``mmphi data embed`` refuses a missing data set or a bad setting with one
    line naming it, exit status 2, before a Ray cluster starts."""
    import ray

    from mmphi.cli import main

    missing = tmp_path / "nosuch"
    out = str(tmp_path / "emb")
    assert main(["data", "embed", "--data", str(missing), "--out", out]) == 2
    assert capsys.readouterr().err == f"mmphi data embed: data set folder {missing} does not exist\n"
    assert main(["data", "embed", "--data", str(tmp_path), "--out", out, "--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmphi data embed: --batch-size ") and len(err.splitlines()) == 1, err
    assert not ray.is_initialized()


def test_an_output_folder_that_is_a_file_is_named_before_work_starts(tmp_path, capsys):
    """``--out`` of ``data embed``, ``train`` and ``demo`` that is a file, or
    lies under one, is one line naming it (exit 2) before Ray starts or
    anything is written; a data set folder that is a file is called a file."""
    import ray

    from mmphi.cli import main

    f = tmp_path / "notes.txt"
    f.write_text("x")
    assert main(["data", "embed", "--data", str(tmp_path), "--out", str(f)]) == 2
    assert capsys.readouterr().err == f"mmphi data embed: --out {f} is a file, not a folder\n"
    assert main(["train", "projector", "--data", str(tmp_path), "--embeddings", str(tmp_path), "--out", str(f)]) == 2
    assert capsys.readouterr().err == f"mmphi train: --out {f} is a file, not a folder\n"
    assert main(["demo", "--out", str(f / "run"), "--serve", "off"]) == 2
    assert capsys.readouterr().err == f"mmphi demo: --out {f / 'run'}: {f} is a file, so no folder can be made under it\n"
    assert main(["data", "embed", "--data", str(f), "--out", str(tmp_path / "emb")]) == 2
    assert capsys.readouterr().err == f"mmphi data embed: data set folder {f} is a file, not a folder\n"
    assert main(["demo", "--out", str(tmp_path / "run"), "--tool-records", "-0.5", "--serve", "off"]) == 2
    assert capsys.readouterr().err == "mmphi demo: --tool-records must be in [0, 10], got -0.5\n"
    assert not ray.is_initialized() and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_eval_names_a_bad_setting_before_the_checkpoint_loads(tmp_path, capsys):
    from mmphi.cli import main

    base = ["eval", "--checkpoint", str(tmp_path), "--data", str(tmp_path), "--embeddings", str(tmp_path)]
    assert main(base + ["--device", "banana"]) == 2
    assert capsys.readouterr().err == "mmphi eval: 'banana' is not a device: choose cpu, cuda, cuda:N or mps\n"
    assert main(base + ["--samples", "0"]) == 2
    assert capsys.readouterr().err == "mmphi eval: --samples must be an integer of 1 or more, got 0\n"
    assert main(base) == 2  # the folders are there but hold no embeddings
    assert capsys.readouterr().err == f"mmphi eval: {tmp_path} has no manifest.json: run the embedding job first\n"
    from conftest import write_train_inputs

    write_train_inputs(tmp_path)
    (tmp_path / "d" / "val.json").write_text("[]")  # nothing held out: said before the (missing) checkpoint loads
    assert main(["eval", "--checkpoint", str(tmp_path / "nosuch"), "--data", str(tmp_path / "d"),
                 "--embeddings", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err == f"mmphi eval: the val split of {tmp_path / 'd'} is empty: there is nothing to evaluate\n"


# ---------------------------------------------------------------- demo


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_demo_learns_from_the_image_and_reuses_everything(work):
    """The main job at its defaults (6,000 synthetic images, Ray Data embedding,
    stage 1, stage 2 with 2 Ray Train workers) reads colour, position and
    count from the image: >= 90 % held-out answer accuracy on colour and
    position, >= 60 % on counting up to six objects (chance 1/6), blind
    accuracy at most 10 points above chance everywhere, in at most 15 minutes
    from the start to the trained, evaluated checkpoint."""
    from mmphi.commands.demo import SINGLE_SHARE, STEPS

    out = work / "demo"
    port = _free_port()
    p = mmphi("demo", "--out", out, "--serve", "check", "--port", port, cwd=work, timeout=3000)
    assert p.returncode == 0, describe(p)
    assert "Reporting training result" not in p.stdout + p.stderr  # Ray Train's line per report and worker
    assert "POST /v1/chat/completions" not in p.stdout + p.stderr  # no access-log line per checked question
    assert "gemm_4bit_forward" not in p.stdout + p.stderr  # bitsandbytes' optional-kernel notice, once per process
    assert "Got updated endpoints" not in p.stdout + p.stderr  # the HTTP proxy's INFO line listing every route
    s = json.loads((out / "summary.json").read_text())
    s1, s2a, s2 = s["stage1"], s["stage2_single"], s["stage2"]
    acc, blind, chance, n = s2["answer_accuracy"], s2["blind_answer_accuracy"], s2["chance"], s2["answer_counts"]
    report = {q: (acc[q], blind.get(q), chance.get(q), n[q]) for q in acc}
    assert acc["colour"] >= 0.9 and acc["position"] >= 0.9, report
    assert chance["count"] <= 1 / 6 + 1e-9 and acc["count"] >= 0.6, report
    assert set(blind) == set(acc), report
    assert s1["blind_answer_accuracy"] == s2a["blind_answer_accuracy"] == {}  # the final run's only
    for q in acc:
        if chance.get(q):  # every image question: the accuracy comes from the image
            # blind (every image replaced by the training mean) does no better than chance. It may do worse:
            # what the model answers about an image it never saw is arbitrary (a rare answer, a non-answer),
            # and which one changes with the host's floating-point kernels (count: 6 % on one CPU, 18 % on another)
            assert blind[q] <= chance[q] + 0.10, report
            assert n[q] >= 40, report
    for q in ("colour", "position", "count"):  # the gap to blind is what the model reads from the image
        assert acc[q] - blind[q] >= 0.5, report
    assert s["timings"]["trained"] <= 15 * 60, s["timings"]
    assert abs(s1["first_loss"] - s1["ln_vocab"]) <= 0.15 * s1["ln_vocab"], s1
    single = max(round(STEPS * SINGLE_SHARE), 1)
    assert (s1["steps"], s2a["steps"], s2["steps"]) == (STEPS // 10, single, STEPS - single)
    assert s2["workers"] == s2a["workers"] == 2
    assert s2["val_loss"] < s1["val_loss"], (s1, s2)
    # step 7: the trained checkpoint served by Ray Serve answers over HTTP exactly as in-process
    assert s["served"]["url"] == f"http://127.0.0.1:{port}/"
    assert s["served"]["answer"] == s["in_process_answer"], s
    # the held-out questions the training job scored, asked over HTTP: same counts, accuracy within 5 points
    assert s["served"]["answer_counts"] == {q: n for q, n in s2["answer_counts"].items() if q in s["served"]["answer_counts"]}
    job_acc = sum(acc[q] * k for q, k in s["served"]["answer_counts"].items()) / sum(s["served"]["answer_counts"].values())
    assert abs(s["served"]["accuracy"] - job_acc) <= 0.05, (s["served"], s2)
    assert s["images"] == 6000  # every synthetic image embedded once
    assert s["store_matches_live_encoder"] is True
    assert Path(s["checkpoint"], "adapter", "adapter_model.safetensors").is_file()
    manifest = json.loads((out / "embeddings" / "tiny" / "manifest.json").read_text())
    assert manifest["count"] == s["images"] and manifest["missing"] == 0
    progress = (out / "runs" / "stage2" / "progress.jsonl").read_text()
    # a rerun reuses the data, the embeddings and the finished training runs
    again = mmphi("demo", "--out", out, "--serve", "off", cwd=work, timeout=1200)
    assert again.returncode == 0, describe(again)
    assert "reusing" in again.stdout
    for run in ("stage1", "stage2-single", "stage2"):  # finished runs are reused without starting Ray Train
        assert f"{run}: finished at step " in again.stdout, describe(again)
    assert json.loads((out / "embeddings" / "tiny" / "manifest.json").read_text())["last_run"]["embedded"] == 0
    assert (out / "runs" / "stage2" / "progress.jsonl").read_text() == progress  # no step trained again


# ---------------------------------------------------------------- flags refused at once


@pytest.mark.parametrize("argv, message", [
    (["chat", "--prompt", "hi", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 is below 1"),
    (["chat", "--prompt", "hi", "--max-new-tokens", "-5"], "argument --max-new-tokens: -5 is below 1"),
    (["chat", "--prompt", "hi", "--device", "banana"], "'banana' is not a device: choose cpu, cuda, cuda:N or mps"),
    (["serve", "--device", "cuda0"], "argument --device: 'cuda0' is not a device: choose cpu, cuda, cuda:N or mps"),
    (["chat", "--temperature", "2.5"], "argument --temperature: 2.5 is not between 0 and 2"),
    (["chat", "--temperature", "nan"], "argument --temperature: nan is not between 0 and 2"),
    (["chat", "--top-p", "0"], "argument --top-p: 0 keeps no token"),
    (["chat", "--top-p", "1.5"], "argument --top-p: 1.5 is not between 0 and 1"),
    (["chat", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["transcribe", "a.wav", "--device", "gpu"], "argument --device: 'gpu' is not a device"),
    (["demo", "--steps", "-1"], "argument --steps: -1 is below 1"),
    (["demo", "--images", "0"], "argument --images: 0 is below 1"),
    (["demo", "--batch-size", "0"], "argument --batch-size: 0 is below 1"),
    (["demo", "--workers", "0"], "argument --workers: 0 is below 1"),
    (["demo", "--lr", "nan"], "argument --lr: 'nan' is not a finite number above 0"),
])
def test_bad_numbers_and_devices_are_usage_errors(argv, message, capsys):
    from mmphi.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert message in capsys.readouterr().err


def test_chat_refuses_a_blank_prompt_and_a_missing_checkpoint(tmp_path, capsys):
    from mmphi.cli import main

    assert main(["chat", "--prompt", "   "]) == 2
    assert "give --prompt (not blank), --image or --audio" in capsys.readouterr().err
    assert main(["chat", "--prompt", "hi", "--checkpoint", str(tmp_path / "nosuch")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmphi chat: ") and "nosuch does not exist" in err and len(err.splitlines()) == 1


def test_chat_hears_audio_with_the_checkpoints_whisper(tiny_model, files, tmp_path, monkeypatch, capsys):
    """``chat --checkpoint C --audio F`` transcribes with the Whisper C's saved
    config names (as serving C does), not the --preset's; audio in which
    Whisper hears nothing, with no prompt or image, is said so before the
    language model loads."""
    import json

    from mmphi.cli import main
    from models import speech
    from models.multimodal import MultimodalPhi3

    if files["wav"] is None:
        pytest.skip("ffmpeg is not installed")
    ckpt = tiny_model.save_checkpoint(tmp_path / "ckpt")
    meta = json.loads((ckpt / "mmphi.json").read_text())
    meta["config"]["speech"]["seed"] = 7  # a Whisper the tiny preset does not name
    (ckpt / "mmphi.json").write_text(json.dumps(meta))
    seeds = []

    class Stop(Exception):
        pass

    def record(cfg, device="cpu"):
        seeds.append(cfg.seed)
        raise Stop

    monkeypatch.setattr(speech, "load_whisper", record)
    for where, seed in (([], 0), (["--checkpoint", str(ckpt)], 7)):
        with pytest.raises(Stop):
            main(["chat", "--prompt", "hi", "--audio", str(files["wav"]), *where])
        assert seeds[-1] == seed, where

    def no_load(*a, **k):
        raise AssertionError("the model was built for a request with nothing in it")

    monkeypatch.setattr(speech, "load_whisper", lambda cfg, device="cpu": None)
    monkeypatch.setattr(speech.SpeechRecognizer, "transcribe", lambda self, source, **k: "")
    monkeypatch.setattr(MultimodalPhi3, "from_config", no_load)
    monkeypatch.setattr(MultimodalPhi3, "from_checkpoint", no_load)
    assert main(["chat", "--audio", str(files["wav"]), "--checkpoint", str(ckpt)]) == 2
    assert capsys.readouterr().err == (f"mmphi chat: Whisper heard no words in {files['wav']}, and there is no "
                                       "--prompt or --image\n")


def test_chat_checks_the_context_length(tiny_model):
    from mmphi.commands.model import ContextLengthExceeded, check_context

    cfg, tok = tiny_model.cfg, tiny_model.tokenizer
    context = cfg.tokenizer.max_length
    short = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    n = check_context(cfg, tok, short, 4)
    with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    assert check_context(cfg, tok, with_image, 4) - n == tiny_model.num_image_tokens  # the tower's count per image
    with pytest.raises(ContextLengthExceeded, match="--max-new-tokens is 100000"):
        check_context(cfg, tok, short, 100000)
    with pytest.raises(ContextLengthExceeded, match="over the model's context"):
        check_context(cfg, tok, short, context - n + 1)
    long = [{"role": "user", "content": [{"type": "text", "text": "red " * context}]}]
    with pytest.raises(ContextLengthExceeded, match="shorten the prompt"):
        check_context(cfg, tok, long, 4)


def test_chat_refuses_a_long_prompt_before_loading_the_model(tiny_model, tmp_path, monkeypatch, capsys):
    from mmphi.cli import main
    from models.multimodal import MultimodalPhi3

    ckpt = tiny_model.save_checkpoint(tmp_path / "ckpt")

    def no_load(*a, **k):
        raise AssertionError("the model was built for a prompt that does not fit")

    monkeypatch.setattr(MultimodalPhi3, "from_config", no_load)
    monkeypatch.setattr(MultimodalPhi3, "from_checkpoint", no_load)
    for where in ([], ["--checkpoint", str(ckpt)]):  # the preset's tokenizer, the checkpoint's own
        assert main(["chat", "--prompt", "red " * 5000, *where]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mmphi chat: the prompt needs ") and "shorten the prompt" in err, (where, err)
    tok_json = Path(ckpt, "tokenizer", "tokenizer.json")
    tok_json.write_text("{")  # a damaged tokenizer: named in one line, the model still not loaded
    assert main(["chat", "--prompt", "hi", "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmphi chat: {tok_json} is ") and "cut short or damaged" in err, err
    assert len(err.splitlines()) == 1, err
    tok_json.unlink()  # gone: named as missing
    assert main(["chat", "--prompt", "hi", "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err == f"mmphi chat: {tok_json} is missing: the checkpoint is incomplete (mmphi.json lists it)\n", err


def test_eval_refuses_no_samples():
    from ray_jobs.evaluate import evaluate_checkpoint

    with pytest.raises(ValueError, match="--samples must be an integer of 1 or more, got 0"):
        evaluate_checkpoint("ckpt", "data", "emb", samples=0)


@pytest.mark.parametrize("flags, message", [
    ({"batch_size": 0}, "--batch-size must be a positive integer"), ({"actors": 0}, "--actors must be"),
    ({"shard_size": -1}, "--shard-size must be"), ({"limit": 0}, "--limit must be a positive integer, got 0"),
])
def test_embed_refuses_bad_numbers_before_ray(flags, message, tmp_path, monkeypatch):
    from data_pipelines import embed

    monkeypatch.setattr(embed, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    with pytest.raises(embed.EmbedError, match=message):
        embed.run(embed.EmbedSettings(out=str(tmp_path / "emb"), data=str(tmp_path), **flags))


def test_chat_says_when_the_answer_is_empty(tiny_model, monkeypatch, capsys):
    """A model that ends its turn at once (a stage-1 checkpoint can) prints
    an empty line on stdout, as scripts expect, and says so on stderr, as
    the chat page shows "(empty answer)"; a non-empty answer adds no note."""
    import torch

    from mmphi.cli import main
    from models.multimodal import MultimodalPhi3

    end = tiny_model.tokenizer.ids.end
    monkeypatch.setattr(MultimodalPhi3, "from_config", classmethod(lambda cls, *a, **k: tiny_model))
    monkeypatch.setattr(MultimodalPhi3, "generate", lambda self, *a, **k: torch.tensor([[end]]))
    assert main(["chat", "--prompt", "hi"]) == 0
    out, err = capsys.readouterr()
    assert out == "\n" and err == "mmphi chat: the answer is empty (the model ended its turn at once)\n"
    word = tiny_model.tokenizer.encode_text("red")
    monkeypatch.setattr(MultimodalPhi3, "generate", lambda self, *a, **k: torch.tensor([[*word, end]]))
    assert main(["chat", "--prompt", "hi"]) == 0
    out, err = capsys.readouterr()
    assert out == "red\n" and "empty" not in err


def test_chat_samples_with_a_seed_as_the_api_does(tiny_model, monkeypatch, capsys):
    """``mmphi chat --temperature T --seed S`` repeats its answer, another
    seed draws another, and the answer is the one the serving batcher draws
    for the same prompt and seed; with no --seed a new one is drawn and
    printed, and giving it back repeats that answer; greedy prints no seed."""
    from mmphi.cli import main
    from models.conversation import encode_conversation
    from models.multimodal import MultimodalPhi3
    from serve.batching import DONE, ContinuousBatcher, GenerationRequest

    monkeypatch.setattr(MultimodalPhi3, "from_config", classmethod(lambda cls, *a, **k: tiny_model))

    def answer(*flags) -> tuple[str, str]:
        assert main(["chat", "--prompt", "Name a colour", "--max-new-tokens", "10", *flags]) == 0
        out, err = capsys.readouterr()
        return out.rstrip("\n"), err

    first, err = answer("--temperature", "1.5", "--seed", "5")
    assert err == "" and first and answer("--temperature", "1.5", "--seed", "5") == (first, "")
    assert answer("--temperature", "1.5", "--seed", "6")[0] != first
    drawn, err = answer("--temperature", "1.5")
    assert err.startswith("mmphi chat: sampling with --seed ") and len(err.splitlines()) == 1, err
    seed = err.split("--seed ")[1].split()[0]
    assert answer("--temperature", "1.5", "--seed", seed) == (drawn, "")
    greedy, err = answer()
    assert err == "" and answer() == (greedy, "")

    tok = tiny_model.tokenizer
    ids = encode_conversation(tok, [{"role": "user", "content": [{"type": "text", "text": "Name a colour"}]}],
                              tiny_model.num_image_tokens, add_generation_prompt=True,
                              system_prompt=tiny_model.cfg.tokenizer.system_prompt).input_ids
    got: list = []
    batcher = ContinuousBatcher(tiny_model, 4, suppress_ids=tiny_model.suppressed_ids,
                                context_length=tiny_model.cfg.tokenizer.max_length)
    batcher.submit(GenerationRequest(ids, None, max_new_tokens=10, temperature=1.5, seed=5), got.append)
    while batcher.active or batcher.waiting:
        batcher.step()
    assert got[-1] is DONE
    served = [t for item in got[:-1] for t in item]
    assert tok.decode(served, skip_special_tokens=True).strip() == first
