"""The settings: one Config dataclass is train.py's flags and the saved config; bad flags are
refused with one line before anything is written."""

import argparse
import dataclasses
import os

import pytest
import torch

import config
from config import Config, add_config_arguments, config_of


def parse(argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return config_of(p.parse_args(argv), p)


def test_the_flags_are_the_config_fields_one_for_one():
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    flags = {a.dest for a in p._actions if a.dest != "help"}
    fields = {f.name for f in dataclasses.fields(Config)}
    # --seeds runs one Config per seed (Config.seed); --no-test is Config.test negated
    assert flags - {"seeds", "no_test"} == fields - {"seed", "test"}
    assert len(flags) + 1 <= 25, "train.py's --help lists at most 25 flags (with --resume)"


def test_defaults_come_from_the_preset_and_flags_override_them(tmp_path):
    cfg = parse(["--out", str(tmp_path / "a")])
    phantom = config.PRESETS["phantom"]
    assert (cfg.rounds, cfg.local_steps, cfg.lr, cfg.channels, cfg.spacing) == (
        phantom.rounds, phantom.local_steps, phantom.lr, phantom.channels, phantom.spacing)
    cfg = parse(["--preset", "paper", "--lr", "0.01", "--seeds", "3", "4", "--out", str(tmp_path / "b")])
    assert (cfg.norm, cfg.loss, cfg.lr, cfg.seed) == ("batch", "dice", 0.01, 3)


def test_real_data_defaults_to_its_own_rounds_patch_augmentation_and_scoring_unless_given(tmp_path):
    phantom = config.PRESETS["phantom"]
    assert set(phantom.real) == {"rounds", "patch", "p_affine", "p_intensity", "largest"}
    assert all(phantom.real[k] != getattr(phantom, k) for k in phantom.real)
    real = ["--data-root", str(tmp_path), "--out", str(tmp_path / "a")]
    assert (parse(real).rounds, parse(real).largest) == (phantom.real["rounds"], phantom.real["largest"])
    on_real = config.preset_of(parse(real))
    assert all(getattr(on_real, k) == v for k, v in phantom.real.items())
    assert config.preset_of(parse(["--out", str(tmp_path / "e")])) == phantom
    assert parse(["--data", f"liver={tmp_path}", "--out", str(tmp_path / "b")]).rounds == phantom.real["rounds"]
    assert parse([*real[:2], "--rounds", "7", "--out", str(tmp_path / "c")]).rounds == 7
    assert parse(["--out", str(tmp_path / "d")]).rounds == phantom.rounds


def test_the_default_out_folder_is_named_after_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse(["--mode", "segviz", "--fedbn", "--nodes", "3"]).out == os.path.join("runs", "segviz-fedbn-3")


@pytest.mark.parametrize("argv, message", [
    (["--mode", "bogus"], "invalid choice"),
    (["--nodes", "5"], "invalid choice"),
    (["--loss", "marginal"], "invalid choice"),  # a variant of experiments.py, not train.py
    (["--device", "tpu"], "--device tpu"),
    (["--mode", "fedavg", "--fedbn"], "--fedbn"),
    (["--rounds", "0"], "--rounds"),
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


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_is_refused_as_non_root(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(SystemExit) as e:
        parse(["--out", str(locked / "run")])
    assert e.value.code == 2


def test_a_resumed_config_takes_the_saved_settings_and_only_device_and_rounds(tmp_path, capsys):
    saved = {k: list(v) if isinstance(v, tuple) else v
             for k, v in dataclasses.asdict(parse(["--nodes", "2", "--out", str(tmp_path)])).items()}
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    p.add_argument("--resume")
    argv = ["--resume", str(tmp_path), "--rounds", "200"]
    cfg = config.resumed_config(saved, str(tmp_path), argv, p.parse_args(argv), p)
    assert (cfg.nodes, cfg.rounds, cfg.channels) == (2, 200, config.PRESETS["phantom"].channels)
    for argv, message in [(["--resume", "x", "--mode", "fedavg"], "--mode cannot be given"),
                          (["--resume", "x", "--rounds", "2"], "fewer than the run's 100")]:
        with pytest.raises(SystemExit) as e:
            config.resumed_config(saved, "x", argv, p.parse_args(argv), p)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_automatic_split_holds_cases_out_only_for_a_run_that_validates(tmp_path):
    # real data, phantom preset: nothing reads validation cases unless asked, so every case trains
    real = Config(data_root=str(tmp_path), out=str(tmp_path / "run"))
    assert config.resolve(real).val_split == "0"
    assert config.resolve(dataclasses.replace(real, val_every=10)).val_split == "auto"
    assert config.resolve(dataclasses.replace(real, finetune_epochs=5)).val_split == "auto"
    # head fine-tuning runs for the binary modes only: a multi-class model's flag reads nothing
    assert config.resolve(dataclasses.replace(real, mode="fedavg", finetune_epochs=5)).val_split == "0"
    # the paper preset keeps the best round on validation; a split given by hand is kept as given
    assert config.resolve(dataclasses.replace(real, preset="paper")).val_split == "auto"
    assert config.resolve(dataclasses.replace(real, val_split="0.25")).val_split == "0.25"
