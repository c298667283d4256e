"""Resource benchmarks: real-data preprocessing (time, cache size, peak memory), what leaves a
site per round, and the memory of simulating N clients in one process.

`preprocess` measures (1) a real abdominal CT (--ct FILE; by default the one in
$SEGVIZ_REAL_CT or ../shared/data/real_ct beside the checkout) through the whole
real-data path (read, RAS, 1.5 x 1.5 x 2 mm, body crop, cache write): seconds per volume and
bytes in the cache; and (2) the peak resident memory of preprocessing one synthetic
512 x 512 x 600 CT (the size of a large MSD Liver scan), written to a temporary folder and run
in a fresh process so that its peak is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from settings import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
# a real abdominal CT with TotalSegmentator labels: $SEGVIZ_REAL_CT's folder, else ../shared
SHARED_CT = os.path.join(os.path.dirname(ROOT), "shared", "data", "real_ct")
REAL_CT = os.path.join(os.environ.get("SEGVIZ_REAL_CT", SHARED_CT), "ct.nii.gz")
REAL_SPACING = PRESETS["paper"]["spacing"]  # the original's working spacing


def child(*args: str) -> dict:
    """`python -m bench` run in a fresh process (so that its peak memory is its own); its last
    line of output, as JSON."""
    path = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": ROOT + (os.pathsep + path if path else "")}
    r = subprocess.run(
        [sys.executable, "-m", "bench", *args], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def synthetic_ct(path: str, shape: tuple[int, int, int] = (512, 512, 600),
                 spacing: tuple[float, float, float] = (0.8, 0.8, 1.0)) -> None:
    """An int16 CT of the given size: air, an elliptic body, a brighter 'organ', and its label."""
    import nibabel as nib

    x, y = np.ogrid[: shape[0], : shape[1]]
    cx, cy = shape[0] / 2, shape[1] / 2
    body = ((x - cx) / (0.45 * shape[0])) ** 2 + ((y - cy) / (0.35 * shape[1])) ** 2 < 1
    organ = ((x - cx * 0.7) / (0.1 * shape[0])) ** 2 + ((y - cy) / (0.1 * shape[1])) ** 2 < 1
    img = np.full(shape, -1000, np.int16)
    lab = np.zeros(shape, np.uint8)
    rng = np.random.default_rng(0)
    for z in range(shape[2]):
        img[:, :, z][body] = 40
        img[:, :, z][organ] = 110
        lab[:, :, z][organ] = 1
    img += rng.integers(-15, 16, size=shape, dtype=np.int16)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # L,P,S storage, as many scanners
    for name, arr in (("image", img), ("label", lab)):
        nib.save(nib.Nifti1Image(arr, affine), os.path.join(path, f"{name}.nii.gz"))


def preprocess_child(image: str, label: str, cache: str) -> None:
    """Run in a fresh process: preprocess one pair into the cache and report time and peak RSS."""
    from realdata.archives import Pair, Source
    from realdata.preprocess import load_source

    source = Source("liver", "msd", os.path.dirname(image), [Pair("big", image, label)], (0, 1))
    t = time.time()
    load_source(source, REAL_SPACING, cache)
    seconds = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak}))


def bench_preprocess(args: argparse.Namespace) -> dict:
    import torch

    from realdata.archives import Pair, Source
    from realdata.nifti import read_nifti
    from realdata.preprocess import load_source

    torch.set_num_threads(args.threads)
    out = {
        "machine": f"{os.cpu_count()} CPU(s), torch {torch.__version__}",
        "threads": args.threads,
    }
    labels = os.path.join(os.path.dirname(args.ct), "labels_totalsegmentator.nii.gz")
    pair = Pair("ct", args.ct, labels if os.path.isfile(labels) else None)
    source = Source("test", "folders", os.path.dirname(args.ct), [pair], None)
    shape = read_nifti(args.ct)[0].shape
    cold, warm, size = [], [], 0
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            t = time.time()
            case = load_source(source, REAL_SPACING, cache)[0]
            cold.append(time.time() - t)
            t = time.time()
            load_source(source, REAL_SPACING, cache)
            warm.append(time.time() - t)
            size = sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache))
    out["real_ct"] = {
        "file": os.path.abspath(args.ct),
        "shape": list(shape),
        "working_shape": list(case.hu.shape),
        "spacing_mm": list(REAL_SPACING),
        "seconds_first_load": float(np.median(cold)),
        "seconds_cached_load": float(np.median(warm)),
        "cache_bytes": size,
    }
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        synthetic_ct(tmp, tuple(args.shape))
        written = time.time() - t
        peak = child("_child", os.path.join(tmp, "image.nii.gz"), os.path.join(tmp, "label.nii.gz"),
                     os.path.join(tmp, "cache"))
    n = int(np.prod(args.shape))
    out["large_ct"] = {
        "shape": list(args.shape),
        "voxels": n,
        "int16_bytes": 2 * n,
        "seconds_to_synthesise": round(written, 1),
        "seconds": round(peak["seconds"], 1),
        "peak_rss_bytes": peak["peak_rss_bytes"],
    }
    return out


def report(r: dict) -> str:
    ct, big = r["real_ct"], r["large_ct"]
    return "\n".join(
        [
            f"machine: {r['machine']}, {r['threads']} torch thread(s)",
            f"real CT {'x'.join(map(str, ct['shape']))} -> "
            f"{'x'.join(map(str, ct['working_shape']))} at {ct['spacing_mm']} mm: "
            f"{ct['seconds_first_load']:.2f} s first load (read, preprocess, cache), "
            f"{ct['seconds_cached_load']:.3f} s from the cache, "
            f"{ct['cache_bytes'] / 1e6:.2f} MB in the cache",
            f"synthetic CT {'x'.join(map(str, big['shape']))} ({big['int16_bytes'] / 1e6:.0f} MB "
            f"as int16): {big['seconds']:.1f} s, peak resident memory "
            f"{big['peak_rss_bytes'] / 1e9:.2f} GB",
        ]
    )


def bench_exchange(args: argparse.Namespace) -> dict:
    """Keys and bytes each site sends (and receives) per round, per preset and mode."""
    from dataclasses import replace

    from segviz import MODES
    from settings import resolve
    from train import exchanged_keys
    from unet3d import UNet3D, UNetConfig

    out = {}
    for preset_name in PRESETS:
        preset = resolve({"preset": preset_name})
        rows = {}
        for mode, fedbn in (
            ("single", False),
            ("central", False),
            ("fedavg", False),
            ("segviz", False),
            ("segviz", True),
        ):
            classes = 2 if MODES[mode].binary else 5
            net = UNet3D(UNetConfig(classes=classes, channels=preset.channels, norm=preset.norm))
            state = net.state_dict()
            keys = exchanged_keys(net, replace(preset, mode=mode, fedbn=fedbn))
            sent = sum(state[k].numel() * state[k].element_size() for k in keys)
            rows[mode + ("+fedbn" if fedbn else "")] = {
                "keys_sent": len(keys),
                "keys_total": len(state),
                "bytes_up_per_site": sent,
                "bytes_down_per_site": sent,
                "model_bytes": sum(v.numel() * v.element_size() for v in state.values()),
                "note": "the images and labels themselves (pooled training)"
                if mode == "central"
                else "nothing"
                if mode == "single"
                else "",
            }
        out[preset_name] = rows
    return out


def clients_child(n: int, rounds: int, steps: int) -> None:
    """Run in a fresh process: N clients, one live model, a few rounds; report peak RSS."""
    import torch

    import fl
    import segviz
    from data import NODE_SITES, WINDOWS
    from phantom import PhantomSpec, phantom_federation
    from sampler import SamplerConfig, site_sampler
    from settings import resolve
    from train import dice_ce_loss, on_device
    from unet3d import UNet3D, UNetConfig

    torch.set_num_threads(2)
    preset = resolve({"preset": "phantom"})
    sites = NODE_SITES[4]
    cases, _ = phantom_federation(sites, seed=0, spec=PhantomSpec(spacing=preset.spacing),
                                  cache_dir=preset.cache)
    cfg = SamplerConfig(patch=preset.patch, volumes_per_batch=preset.volumes_per_batch,
                        patches_per_volume=preset.patches_per_volume)
    # the data stay fixed (one sampler per site, shared by that site's clients): only clients grow
    samplers = {
        s: site_sampler(cases[s], WINDOWS[s], True, cfg, "cpu", i) for i, s in enumerate(sites)
    }
    model = UNet3D(UNetConfig(channels=preset.channels, norm=preset.norm)).to(
        memory_format=torch.channels_last_3d
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=preset.lr)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    clients = [
        fl.new_client(
            f"c{i}", model, optimizer, on_device(samplers[sites[i % 4]].sample, "cpu"), dice_ce_loss
        )
        for i in range(n)
    ]
    keys = segviz.shared_keys(clients[0].model_state, "segviz")
    t = time.time()
    for _ in range(rounds):
        fl.federated_round(model, optimizer, clients, steps, keys)
    seconds = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "clients": n,
                "peak_rss_bytes": peak,
                "rss_before_clients": before,
                "state_bytes_per_client": fl.state_bytes(model),
                "seconds_per_round": seconds / rounds,
            }
        )
    )


def bench_clients(args: argparse.Namespace) -> dict:
    rows = [child("_clients", str(n), str(args.rounds), str(args.local_steps)) for n in args.n]
    return {"preset": "phantom", "device": "cpu", "rows": rows}


def exchange_table(r: dict) -> str:
    lines = [
        "| preset | mode | keys sent | MB up per site per round | MB down | what else leaves |",
        "|---|---|---|---|---|---|",
    ]
    for preset, rows in r.items():
        for mode, x in rows.items():
            lines.append(
                f"| {preset} | {mode} | {x['keys_sent']}/{x['keys_total']} | "
                f"{x['bytes_up_per_site'] / 1e6:.3f} | {x['bytes_down_per_site'] / 1e6:.3f} | "
                f"{x['note'] or '-'} |"
            )
    return "\n".join(lines)


def clients_table(r: dict) -> str:
    first = r["rows"][0]["clients"]
    lines = [
        f"| clients | peak RSS (MB) | growth over {first} clients (MB) | one client's state (MB) "
        "| s per round |",
        "|---|---|---|---|---|",
    ]
    base = r["rows"][0]["peak_rss_bytes"]
    for x in r["rows"]:
        lines.append(
            f"| {x['clients']} | {x['peak_rss_bytes'] / 1e6:.0f} | "
            f"{(x['peak_rss_bytes'] - base) / 1e6:.0f} | "
            f"{x['state_bytes_per_client'] / 1e6:.2f} | {x['seconds_per_round']:.2f} |"
        )
    return "\n".join(lines)
