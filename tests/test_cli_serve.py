"""``mmphi serve``'s checks before any Ray process starts: a wrong preset,
override, checkpoint, Serve config file, port or CPU count is refused at
once with a message naming it (the replicas would only fail a minute later,
saying no more than that a deployment failed)."""
from __future__ import annotations

import shutil

import pytest

from models.config import ConfigError
from serve.app import check_model_source, read_serve_config
from serve.settings import ServeSettings, SettingsError


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    return tiny_model.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "final")


def test_a_good_source_passes(checkpoint):
    check_model_source(ServeSettings.from_dict({"checkpoint": str(checkpoint)}))
    check_model_source(ServeSettings.from_dict({"preset": "tiny", "overrides": ["llm.lora.r=4"]}))


@pytest.mark.parametrize("settings, message", [
    ({"preset": "nope"}, "unknown preset 'nope'"),
    ({"preset": "tiny", "overrides": ["llm.lora.r=abc"]}, "llm.lora.r has the wrong type"),
])
def test_a_wrong_preset_or_override_is_a_config_error(settings, message):
    with pytest.raises(ConfigError, match=message):
        check_model_source(ServeSettings.from_dict(settings))


def test_a_damaged_checkpoint_is_named(checkpoint, tmp_path):
    bad_meta = tmp_path / "bad-meta"
    shutil.copytree(checkpoint, bad_meta)
    (bad_meta / "mmphi.json").write_text("{\n oops")
    with pytest.raises((SettingsError, ConfigError), match="bad-meta"):
        check_model_source(ServeSettings.from_dict({"checkpoint": str(bad_meta)}))
    cut = tmp_path / "cut"
    shutil.copytree(checkpoint, cut)
    data = (cut / "projector.safetensors").read_bytes()
    (cut / "projector.safetensors").write_bytes(data[:5])
    with pytest.raises(SettingsError, match=r"projector\.safetensors is not a readable safetensors file"):
        check_model_source(ServeSettings.from_dict({"checkpoint": str(cut)}))


@pytest.mark.parametrize("text, message", [
    ("base: [\n", "is not a readable YAML file"),
    ("just a string\n", "no 'applications' list"),
    ("applications:\n- args: {}\n  deployments:\n  - num_replicas: 1\n", "needs a 'name'"),
])
def test_a_wrong_serve_config_file_is_named(tmp_path, text, message):
    f = tmp_path / "serve.yaml"
    f.write_text(text)
    with pytest.raises(SettingsError, match=message):
        read_serve_config(f)
    with pytest.raises(SettingsError, match="no such Serve config file"):
        read_serve_config(tmp_path / "missing.yaml")


def test_port_and_cpus_are_checked_by_the_parser(capsys):
    from mmphi.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve", "--port", "8123", "--num-cpus", "2"]).port == 8123
    for argv, message in ((["--port", "99999"], "99999 is out of range (1 to 65535)"),
                          (["--port", "x"], "'x' is not an integer"), (["--num-cpus", "0"], "0 is below 1")):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", *argv])
        assert message in capsys.readouterr().err


def test_a_run_folder_is_refused_naming_its_final_checkpoint(checkpoint, tmp_path, capsys, monkeypatch):
    """``mmphi serve --checkpoint RUNS/NAME`` (the run, not its ``final``)
    says which folder was meant, before the serving config is read or Ray starts."""
    import serve.app
    from mmphi.cli import main

    run = tmp_path / "run"
    shutil.copytree(checkpoint, run / "final")
    monkeypatch.setattr(serve.app, "read_serve_config", lambda *a: pytest.fail("read the serving config"))
    assert main(["serve", "--checkpoint", str(run)]) == 2
    err = capsys.readouterr().err
    assert err == f"mmphi serve: {run} is a training run's folder, not a checkpoint: its finished model is {run / 'final'}\n"
    (run / "final" / "mmphi.json").write_text("[]")
    assert main(["serve", "--checkpoint", str(run / "final")]) == 2
    assert "mmphi.json holds a JSON list, not a checkpoint's description" in capsys.readouterr().err


def test_listening_beyond_this_machine_without_a_key_is_warned_of(monkeypatch):
    """``--host 0.0.0.0`` (or any address other than loopback, or a host
    name) with no API key in the environment: a warning naming the
    variable; loopback, or a key set, says nothing."""
    from serve.app import exposure_warning

    s = ServeSettings.from_dict({"api_key_env": "MMPHI_TEST_KEY_X"})
    monkeypatch.delenv("MMPHI_TEST_KEY_X", raising=False)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert exposure_warning(host, 8000, s) is None, host
    for host in ("0.0.0.0", "::", "10.1.2.3", "myhost.example"):
        msg = exposure_warning(host, 8000, s)
        assert msg.startswith(f"listening on {host}:8000 with no API key") and "set MMPHI_TEST_KEY_X" in msg, host
    monkeypatch.setenv("MMPHI_TEST_KEY_X", "k")
    assert exposure_warning("0.0.0.0", 8000, s) is None
