"""The settings, declared once: the Config fields are train.py's flags, the saved config and the
Flower app's run config; presets are overrides resolved once; bad flags are refused with one
line before anything is written."""

import argparse
import dataclasses
import os
import sys

import pytest
import torch

import settings
from settings import PRESETS, REAL_DATA, Config, add_arguments, config_from_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return config_from_args(p.parse_args(argv), p)


def flower_run_config() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "flower", "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def test_every_setting_has_one_flag_with_help_and_one_flower_key_and_nothing_else_names_a_setting():
    p = argparse.ArgumentParser()
    add_arguments(p)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    actions = {a.dest: a for a in p._actions if a.dest != "help"}
    assert set(actions) == set(fields)  # one flag per field, and no flag without a field
    for name, action in actions.items():
        assert action.help and len(fields[name].metadata["help"]) > 10, name
        assert action.option_strings[0] == settings.flag_of(fields[name])
    # the Flower app's run config: a key per field (its flag's name), plus the variants of
    # `python -m experiments train` and the server's own keys, and nothing else
    pytest.importorskip("flwr")
    from flower.segviz_flower.task import SERVER_KEYS, SETTING_KEYS, VARIANTS

    keys = set(flower_run_config())
    assert set(SETTING_KEYS.values()) == set(fields)
    assert {settings.flag_of(f)[2:] for f in fields.values()} <= keys, (
        "a Config field lacks a run-config key"
    )
    assert keys == set(SETTING_KEYS) | set(VARIANTS) | set(SERVER_KEYS), (
        "a run-config key names no setting"
    )
    # the presets override fields, nothing else
    for overrides in (*PRESETS.values(), *REAL_DATA.values()):
        assert set(overrides) <= set(fields)


def test_defaults_come_from_the_preset_and_flags_override_them(tmp_path):
    cfg = parse(["--out", str(tmp_path / "a")])
    assert cfg == dataclasses.replace(
        Config(), roi=Config().patch, val_split="0", device="cpu", out=str(tmp_path / "a")
    )
    cfg = parse(
        ["--preset", "paper", "--lr", "0.01", "--seeds", "3", "4", "--out", str(tmp_path / "b")]
    )
    assert (cfg.norm, cfg.loss, cfg.lr, cfg.seed, cfg.roi) == (
        "batch",
        "dice",
        0.01,
        3,
        (160, 160, 160),
    )
    assert all(getattr(cfg, k) == v for k, v in PRESETS["paper"].items() if k != "lr")
    # the sliding window follows the patch unless the preset or a flag sets it
    assert parse(["--patch", "32", "32", "16", "--out", str(tmp_path / "c")]).roi == (32, 32, 16)


def test_real_data_has_its_own_rounds_patch_augmentation_and_clean_up_unless_given(tmp_path):
    real = REAL_DATA["phantom"]
    assert set(real) == {"rounds", "patch", "p_affine", "p_intensity", "largest"}
    assert all(real[k] != getattr(Config(), k) for k in real)
    cfg = parse(["--data-root", str(tmp_path), "--out", str(tmp_path / "a")])
    assert all(getattr(cfg, k) == v for k, v in real.items())
    assert cfg.roi == real["patch"]
    assert (
        parse(["--data", f"liver={tmp_path}", "--out", str(tmp_path / "b")]).rounds
        == real["rounds"]
    )
    assert (
        parse(["--data-root", str(tmp_path), "--rounds", "7", "--out", str(tmp_path / "c")]).rounds
        == 7
    )
    assert parse(["--out", str(tmp_path / "d")]).rounds == Config().rounds


def test_the_default_out_folder_is_named_after_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse(["--mode", "segviz", "--fedbn", "--nodes", "3"]).out == os.path.join(
        "runs", "segviz-fedbn-3"
    )
    # runs that differ in preset or data get folders of their own
    assert parse(["--preset", "paper"]).out == os.path.join("runs", "segviz-4-paper")
    root = tmp_path / "msd"
    root.mkdir()
    assert parse(["--data-root", str(root) + os.sep]).out == os.path.join("runs", "segviz-4-msd")
    assert parse(["--data", f"test={root}"]).out == os.path.join("runs", "segviz-4-data")
    assert parse(["--preset", "paper", "--data-root", "."]).out == os.path.join(
        "runs", f"segviz-4-paper-{tmp_path.name}")


def test_the_help_gives_each_default_and_the_presets_overrides():
    p = argparse.ArgumentParser()
    add_arguments(p)
    rounds = next(a for a in p._actions if a.dest == "rounds").help
    assert "default 100" in rounds and "paper preset 50" in rounds and "on real data 200" in rounds


@pytest.mark.parametrize("argv, message", [
    (["--mode", "bogus"], "invalid choice"),
    (["--nodes", "5"], "invalid choice"),
    # a variant of python -m experiments train, not train.py
    (["--loss", "marginal"], "invalid choice"),
    (["--device", "tpu"], "--device tpu"),
    (["--mode", "fedavg", "--fedbn"], "--fedbn"),
    (["--rounds", "0"], "--rounds"),
    (["--local-steps", "0"], "--local-epochs"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--spacing", "3", "nan", "3"], "--spacing"),
    (["--task-stages", "0"], "--task-stages"),
    (["--val-split", "half"], "--val-split half"),
    (["--data", "lungs=/x"], "SITE=PATH"),
    (["--channels", "8,x"], "comma-separated"),
    (["--channels", "8"], "at least two levels"),
    (["--channels", "8,16,32,64,128,256,512"], "divisible by 64"),
    (["--channels", "8,16", "--task-stages", "2"], "--task-stages"),
    (["--keep", "best"], "--keep best needs --val-every"),
    (["--overlap", "1"], "--overlap"),
    (["--p-affine", "1.5"], "--p-affine"),
    (["--patches-per-volume", "0"], "--patches-per-volume"),
])
def test_bad_flags_exit_2_with_one_line(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        parse([*argv, "--out", str(out)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--device", "cuda", "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_a_saved_config_reads_back_as_the_same_config(tmp_path):
    cfg = parse(
        ["--preset", "paper", "--data", f"liver={tmp_path}", "--out", str(tmp_path / "run")]
    )
    back = settings.from_saved(settings.saved(cfg), device=cfg.device, out=cfg.out)
    assert back == cfg
    assert "device" not in settings.saved(cfg) and "out" not in settings.saved(cfg)


def test_a_resumed_config_takes_the_saved_settings_and_only_device_and_rounds(tmp_path, capsys):
    saved = settings.saved(parse(["--nodes", "2", "--out", str(tmp_path)]))
    p = argparse.ArgumentParser()
    add_arguments(p)
    p.add_argument("--resume")
    allowed = lambda name: name in ("device", "rounds")  # noqa: E731
    argv = ["--resume", str(tmp_path), "--rounds", "200"]
    cfg = settings.resumed_config(saved, str(tmp_path), p.parse_args(argv), p, allowed)
    assert (cfg.nodes, cfg.rounds, cfg.channels) == (2, 200, Config().channels)
    for argv, message in [(["--resume", "x", "--mode", "fedavg"], "--mode cannot be given"),
                          (["--resume", "x", "--rounds", "2"], "fewer than the run's 100")]:
        with pytest.raises(SystemExit) as e:
            settings.resumed_config(saved, "x", p.parse_args(argv), p, allowed)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_automatic_split_holds_cases_out_only_for_a_run_that_validates(tmp_path):
    # real data, phantom preset: nothing reads validation cases unless asked, so every case trains
    real = {"data_root": str(tmp_path)}
    assert settings.resolve(real).val_split == "0"
    assert settings.resolve({**real, "val_every": 10}).val_split == "auto"
    assert settings.resolve({**real, "finetune_epochs": 5}).val_split == "auto"
    # head fine-tuning runs for the binary modes only: a multi-class model's flag reads nothing
    assert settings.resolve({**real, "mode": "fedavg", "finetune_epochs": 5}).val_split == "0"
    # the paper preset keeps the best round on validation; a split given by hand is kept as given
    assert settings.resolve({**real, "preset": "paper"}).val_split == "auto"
    assert settings.resolve({**real, "val_split": "0.25"}).val_split == "0.25"
