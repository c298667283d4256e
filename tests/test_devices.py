"""--device: what auto picks, what a missing device answers, and where the patch sampler runs on
Apple's MPS; tested on any machine by pretending which devices exist."""

import argparse

import pytest
import torch

import data
import training
from common import resolve_device
from data import Case, SamplerConfig


def pretend(monkeypatch, cuda: bool, mps: bool, gpus: int = 1):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus if cuda else 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (True, False, "cuda"),
                                                 (False, True, "mps"), (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_cpu(cuda, mps, expected, monkeypatch):
    pretend(monkeypatch, cuda, mps)
    assert resolve_device("auto", argparse.ArgumentParser()) == torch.device(expected)


@pytest.mark.parametrize("name", ["mps", "cpu", "cuda", "cuda:1"])
def test_a_device_that_exists_is_taken_as_named(name, monkeypatch):
    pretend(monkeypatch, cuda=True, mps=True, gpus=2)
    assert resolve_device(name, argparse.ArgumentParser()) == torch.device(name)


@pytest.mark.parametrize("name, cuda, mps, message", [
    ("mps", True, False, "--device mps: no Apple MPS device"),
    ("cuda", False, True, "--device cuda: no CUDA GPU"),
    ("cuda:2", True, False, "--device cuda:2: this machine has 2 CUDA GPU(s)"),
    ("cuda:x", True, True, "must be auto, cpu, cuda, cuda:N or mps"),
    ("tpu", True, True, "must be auto, cpu, cuda, cuda:N or mps"),
])
def test_a_missing_or_unknown_device_is_one_line_and_exit_2(name, cuda, mps, message, monkeypatch, capsys):
    pretend(monkeypatch, cuda, mps, gpus=2)
    with pytest.raises(SystemExit) as e:
        resolve_device(name, argparse.ArgumentParser(prog="train.py"))
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("train.py: error:") and message in last


def parse(argv):
    from config import add_config_arguments, config_of

    p = argparse.ArgumentParser(prog="train.py")
    add_config_arguments(p)
    return config_of(p.parse_args(argv), p)


def test_train_refuses_mps_without_mps_before_writing_anything(monkeypatch, tmp_path, capsys):
    pretend(monkeypatch, cuda=False, mps=False)
    with pytest.raises(SystemExit) as e:
        parse(["--device", "mps", "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and "--device mps" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device, expected", [("mps", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda:1"),
                                              ("cpu", "cpu")])
def test_the_sampler_stays_on_the_cpu_for_mps_only(device, expected):
    assert data.sampler_device(torch.device(device)) == torch.device(expected)
    assert data.sampler_device(device) == torch.device(expected)


def test_on_mps_the_sampler_is_built_on_the_cpu_and_its_batches_moved_to_the_device():
    label = torch.zeros(20, 20, 20, dtype=torch.uint8)
    label[5:10, 5:10, 5:10] = 1
    case = Case("c", torch.full((20, 20, 20), 100.0), label, (3.0, 3.0, 3.0))
    cfg = SamplerConfig(patch=(8, 8, 8), volumes_per_batch=1, patches_per_volume=2)
    sampler = data.site_sampler([case], (-100, 200), True, cfg, torch.device("mps"), 0)
    assert sampler.device == torch.device("cpu") and sampler.img.device.type == "cpu"
    # "meta" stands in for the MPS device here: any device the CPU batches must be moved to
    x, y = training.on_device(sampler.sample, torch.device("meta"))()
    assert x.device.type == "meta" and y.device.type == "meta"
    assert x.shape == (2, 1, 8, 8, 8) and x.is_contiguous(memory_format=torch.channels_last_3d)
    cpu_x, cpu_y = training.on_device(sampler.sample, "cpu")()
    assert cpu_x.device.type == "cpu" and cpu_y.dtype == torch.long
