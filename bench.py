"""Benchmarks: speed and memory, measured rather than asserted in unit tests.

    python bench.py preprocess            # real-data preprocessing: time, cache size, peak memory
    python bench.py exchange              # what leaves a site per round, per mode and preset
    python bench.py clients               # peak memory of simulating N clients in one process

`preprocess` measures (1) the one real CT in ../shared (or --ct FILE) through the whole
real-data path (read, RAS, 1.5 x 1.5 x 2 mm, body crop, cache write): seconds per volume and
bytes in the cache; and (2) the peak resident memory of preprocessing one synthetic
512 x 512 x 600 CT (the size of a large MSD Liver scan), written to a temporary folder and run
in a fresh process so that its peak is its own. Results are printed and written to bench.json.
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

HERE = os.path.dirname(os.path.abspath(__file__))
REAL_CT = os.path.join(HERE, "..", "shared", "data", "real_ct", "ct.nii.gz")


def synthetic_ct(path: str, shape=(512, 512, 600), spacing=(0.8, 0.8, 1.0)) -> None:
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


def _child(image: str, label: str, cache: str) -> None:
    """Run in a fresh process: preprocess one pair into the cache and report time and peak RSS."""
    import datasets

    source = datasets.Source("liver", "msd", os.path.dirname(image), [datasets.Pair("big", image, label)], (0, 1))
    t = time.time()
    datasets.load_source(source, datasets.REAL_SPACING, cache)
    seconds = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak}))


def bench_preprocess(args) -> dict:
    import torch

    import datasets

    torch.set_num_threads(args.threads)
    out = {"machine": f"{os.cpu_count()} CPU(s), torch {torch.__version__}", "threads": args.threads}
    labels = os.path.join(os.path.dirname(args.ct), "labels_totalsegmentator.nii.gz")
    pair = datasets.Pair("ct", args.ct, labels if os.path.isfile(labels) else None)
    source = datasets.Source("test", "folders", os.path.dirname(args.ct), [pair], None)
    shape = datasets.read_nifti(args.ct)[0].shape
    cold, warm, size = [], [], 0
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            t = time.time()
            case = datasets.load_source(source, datasets.REAL_SPACING, cache)[0]
            cold.append(time.time() - t)
            t = time.time()
            datasets.load_source(source, datasets.REAL_SPACING, cache)
            warm.append(time.time() - t)
            size = sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache))
    out["real_ct"] = {"file": os.path.abspath(args.ct), "shape": list(shape),
                      "working_shape": list(case.hu.shape), "spacing_mm": list(datasets.REAL_SPACING),
                      "seconds_first_load": float(np.median(cold)), "seconds_cached_load": float(np.median(warm)),
                      "cache_bytes": size}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        synthetic_ct(tmp, tuple(args.shape))
        written = time.time() - t
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "_child", os.path.join(tmp, "image.nii.gz"),
                            os.path.join(tmp, "label.nii.gz"), os.path.join(tmp, "cache")],
                           capture_output=True, text=True, check=True)
        child = json.loads(r.stdout.strip().splitlines()[-1])
    n = int(np.prod(args.shape))
    out["large_ct"] = {"shape": list(args.shape), "voxels": n, "int16_bytes": 2 * n,
                       "seconds_to_synthesise": round(written, 1), "seconds": round(child["seconds"], 1),
                       "peak_rss_bytes": child["peak_rss_bytes"]}
    return out


def report(r: dict) -> str:
    ct, big = r["real_ct"], r["large_ct"]
    return "\n".join([
        f"machine: {r['machine']}, {r['threads']} torch thread(s)",
        f"real CT {'x'.join(map(str, ct['shape']))} -> {'x'.join(map(str, ct['working_shape']))} at "
        f"{ct['spacing_mm']} mm: {ct['seconds_first_load']:.2f} s first load (read, preprocess, cache), "
        f"{ct['seconds_cached_load']:.3f} s from the cache, {ct['cache_bytes'] / 1e6:.2f} MB in the cache",
        f"synthetic CT {'x'.join(map(str, big['shape']))} ({big['int16_bytes'] / 1e6:.0f} MB as int16): "
        f"{big['seconds']:.1f} s, peak resident memory {big['peak_rss_bytes'] / 1e9:.2f} GB",
    ])


def bench_exchange(args) -> dict:
    """Keys and bytes each site sends (and receives) per round, per preset and mode."""
    import segviz
    from config import PRESETS
    from unet3d import UNet3D, UNetConfig

    out = {}
    for preset_name, preset in PRESETS.items():
        rows = {}
        for mode, fedbn in (("single", False), ("central", False), ("fedavg", False), ("segviz", False),
                            ("segviz", True)):
            binary = mode in ("single", "segviz")
            cfg = UNetConfig(classes=2 if binary else 5, channels=preset.channels)
            state = UNet3D(cfg).state_dict()
            keys = segviz.shared_keys(state, mode, fedbn) if mode != "central" else []
            sent = sum(state[k].numel() * state[k].element_size() for k in keys)
            rows[mode + ("+fedbn" if fedbn else "")] = {
                "keys_sent": len(keys), "keys_total": len(state), "bytes_up_per_site": sent,
                "bytes_down_per_site": sent, "model_bytes": sum(v.numel() * v.element_size() for v in state.values()),
                "note": "the images and labels themselves (pooled training)" if mode == "central"
                else "nothing" if mode == "single" else ""}
        out[preset_name] = rows
    return out


def _clients_child(n: int, rounds: int, steps: int) -> None:
    """Run in a fresh process: N clients, one live model, a few rounds; report peak RSS."""
    import torch

    import fl
    import segviz
    from config import PRESETS
    from data import NODE_SITES, WINDOWS, SamplerConfig, site_sampler
    from phantom import PhantomSpec, phantom_federation
    from training import dice_ce_loss, on_device
    from unet3d import UNet3D, UNetConfig

    torch.set_num_threads(2)
    preset = PRESETS["phantom"]
    sites = NODE_SITES[4]
    cases, _ = phantom_federation(sites, seed=0, spec=PhantomSpec(spacing=preset.spacing),
                                  cache_dir=os.environ.get("SEGVIZ_CACHE", os.path.expanduser("~/.cache/segviz")))
    cfg = SamplerConfig(patch=preset.patch, volumes_per_batch=preset.volumes_per_batch,
                        patches_per_volume=preset.patches_per_volume)
    # the data stay fixed (one sampler per site, shared by that site's clients): only clients grow
    samplers = {s: site_sampler(cases[s], WINDOWS[s], True, cfg, "cpu", i) for i, s in enumerate(sites)}
    model = UNet3D(UNetConfig(channels=preset.channels)).to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=preset.lr)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    clients = [fl.new_client(f"c{i}", model, optimizer, on_device(samplers[sites[i % 4]].sample, "cpu"),
                             dice_ce_loss) for i in range(n)]
    keys = segviz.shared_keys(clients[0].model_state, "segviz")
    t = time.time()
    for _ in range(rounds):
        fl.federated_round(model, optimizer, clients, steps, keys)
    seconds = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"clients": n, "peak_rss_bytes": peak, "rss_before_clients": before,
                      "state_bytes_per_client": fl.state_bytes(model), "seconds_per_round": seconds / rounds}))


def bench_clients(args) -> dict:
    rows = []
    for n in args.n:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "_clients", str(n), str(args.rounds),
                            str(args.local_steps)], capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return {"preset": "phantom", "device": "cpu", "rows": rows}


# ---------------------------------------------------------------------------------------
# speed: this project's pipeline side by side with MONAI (the original's toolkit)
# ---------------------------------------------------------------------------------------

# What each ratio (this project / MONAI, higher is better) should reach (issue 5).
TARGETS = {"sampling": 10.0, "dice": 5.0, "sliding_window": 1.0, "train_step": 1.0, "surface": 1.0}
SIZES = {  # full sizes, and --quick ones for CI
    "sampling": {"paper": ((256, 256, 128), (128, 128, 32), 4), "phantom": ((110, 86, 86), (48, 48, 32), 2)},
    "dice": {"full": ((256, 256, 128), 8), "quick": ((96, 96, 64), 4)},
    "sliding_window": {"full": (256, 256, 160), "quick": (160, 160, 64)},
}


def _monai():
    """MONAI when installed (requirements-dev.txt), else None: it is a peer, never a dependency."""
    try:
        import monai
    except ImportError:
        return None
    return monai


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def paired_median_seconds(fns: dict, repeats: int, device, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each fn, timed in alternating order so that a change in the machine's
    load during the measurement falls on both sides alike."""
    import statistics

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            _sync(device)
            t = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def median_seconds(fn, repeats: int, device, warmup: int = 1) -> float:
    """Median wall time of fn() after warm-up calls (synchronised on a GPU)."""
    import statistics

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def synthetic_volume(shape, device, seed: int = 0):
    """A windowed image in [0, 1] with two blob organs, and its 0/1 label: what a sampler sees."""
    import torch

    g = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(-1, 1, n) for n in shape]
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    organ = ((x + 0.3) / 0.35) ** 2 + (y / 0.3) ** 2 + (z / 0.6) ** 2 < 1
    other = ((x - 0.4) / 0.2) ** 2 + ((y + 0.2) / 0.2) ** 2 + (z / 0.5) ** 2 < 1
    body = (x / 0.9) ** 2 + (y / 0.75) ** 2 < 1
    img = 0.2 * body + 0.3 * organ + 0.25 * other + 0.05 * torch.randn(shape, generator=g)
    return img.clamp(0, 1).to(device), organ.to(torch.uint8).to(device)


def speed_sampling(args, monai) -> dict:
    """Augmented training patches per second: PatchSampler against the original's MONAI chain."""
    from data import PatchSampler, SamplerConfig

    out = {}
    for preset, (vol_shape, patch, n) in SIZES["sampling"].items():
        if args.quick and preset == "paper":
            vol_shape, patch = (128, 128, 64), (64, 64, 32)
        img, lab = synthetic_volume(vol_shape, args.device)
        sampler = PatchSampler([img], [lab], SamplerConfig(patch=patch, volumes_per_batch=1, patches_per_volume=n),
                               device=args.device, seed=0)
        ours = median_seconds(sampler.sample, args.repeats * 5, args.device, warmup=2)
        row = {"volume": list(vol_shape), "patch": list(patch), "patches_per_call": n,
               "ours_patches_per_s": n / ours}
        if monai is not None:
            chain = _monai_train_chain(monai, patch, n)
            item = {"image": img[None].clone(), "label": lab[None].clone()}
            set_determinism = monai.utils.set_determinism
            set_determinism(seed=0)
            t = median_seconds(lambda chain=chain, item=item: chain(dict(item)), args.repeats, args.device)
            row["monai_patches_per_s"] = n / t
            row["ratio"] = t / ours
            set_determinism(seed=None)
        out[preset] = row
    return out


def _monai_train_chain(monai, patch, n):
    """The original SegViz notebooks' augmentation after loading (pos = neg = 1 crops, intensity
    scale and shift 0.1, a random affine of up to pi/15 about z and 10% scaling)."""
    import math

    from monai import transforms as T

    return T.Compose([
        T.RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=patch, pos=1, neg=1,
                                 num_samples=n, image_key="image", image_threshold=0),
        T.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        T.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        T.RandAffined(keys=["image", "label"], mode=("bilinear", "nearest"), prob=0.5, spatial_size=patch,
                      rotate_range=(0, 0, math.pi / 15), scale_range=(0.1, 0.1, 0.1)),
    ])


def speed_dice(args, monai) -> dict:
    """Per-organ Dice of whole label maps (cases per second) against monai.metrics.DiceMetric."""
    import torch

    import eval as ev

    shape, cases = SIZES["dice"]["quick" if args.quick else "full"]
    g = torch.Generator().manual_seed(0)
    truths, preds = [], []
    for i in range(cases):
        img, lab = synthetic_volume(shape, "cpu", seed=i)
        truth = (lab.long() + 2 * (img > 0.6).long()).clamp(max=4)  # 5 classes, some overlap-free organs
        noise = torch.randint(0, 5, shape, generator=g)
        flip = torch.rand(shape, generator=g) < 0.05
        truths.append(truth.to(args.device))
        preds.append(torch.where(flip, noise, truth).to(args.device))
    k = 4

    def ours():
        return [ev.label_dice(p, t, k) for p, t in zip(preds, truths)]

    t_ours = median_seconds(ours, args.repeats, args.device)
    row = {"shape": list(shape), "cases": cases, "classes": k, "ours_cases_per_s": cases / t_ours}
    if monai is not None:
        from monai.metrics import DiceMetric
        from monai.networks.utils import one_hot

        metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)

        def theirs():
            metric.reset()
            for p, t in zip(preds, truths):
                metric(one_hot(p[None, None], k + 1), one_hot(t[None, None], k + 1))
            return metric.aggregate()

        t_theirs = median_seconds(theirs, args.repeats, args.device)
        a = torch.tensor(ours(), dtype=torch.float64)
        b = theirs().double().cpu()
        row.update(monai_cases_per_s=cases / t_theirs, ratio=t_theirs / t_ours,
                   max_abs_difference=float((a - b).abs().max()))
    return row


def speed_sliding_window(args, monai) -> dict:
    """Whole-volume inference with the phantom preset's network against sliding_window_inference."""
    import torch

    import eval as ev
    from config import PRESETS
    from unet3d import UNet3D, UNetConfig

    preset = PRESETS["phantom"]
    torch.manual_seed(0)
    net = UNet3D(UNetConfig(classes=5, channels=preset.channels)).to(args.device).eval()
    shape = SIZES["sliding_window"]["quick" if args.quick else "full"]
    vol = torch.rand((1, 1, *shape), generator=torch.Generator().manual_seed(0)).to(args.device)
    roi, overlap, batch = preset.patch, 0.25, 4
    row = {"volume": list(shape), "roi": list(roi), "overlap": overlap, "batch": batch}
    outputs = {}

    with torch.no_grad():
        fns = {"ours": lambda: outputs.__setitem__("ours", ev.sliding_window(net, vol, roi, overlap, "gaussian",
                                                                            batch=batch))}
        if monai is not None:
            from monai.inferers import sliding_window_inference

            # the same blending weights (MONAI floors its own Gaussian at 1e-3, eval.py does not)
            weights = ev.importance_map(roi, "gaussian", vol.device)
            fns["monai"] = lambda: outputs.__setitem__("monai", sliding_window_inference(
                vol, roi, batch, net, overlap=overlap, mode="gaussian", roi_weight_map=weights))
        seconds = paired_median_seconds(fns, max(1, args.repeats // 2), args.device, warmup=0)
        row["ours_seconds"] = seconds["ours"]
        if monai is not None:
            row.update(monai_seconds=seconds["monai"], ratio=seconds["monai"] / seconds["ours"],
                       max_abs_difference=float((outputs["ours"] - torch.as_tensor(outputs["monai"])).abs().max()))
    return row


def speed_train_step(args, monai) -> dict:
    """Voxels per second of one optimiser step at the paper preset (quick: the phantom preset)."""
    import torch

    from config import PRESETS
    from training import dice_ce_loss
    from unet3d import UNet3D, UNetConfig

    preset = PRESETS["phantom" if args.quick else "paper"]
    batch = preset.volumes_per_batch * preset.patches_per_volume
    if args.device == "cpu" and not args.quick:
        batch = 2  # a CPU step of 8 patches of 128 x 128 x 32 takes minutes; the ratio is what matters
    x = torch.rand((batch, 1, *preset.patch), device=args.device)
    y = (x[:, 0] > 0.5).long()

    def nets():
        torch.manual_seed(0)
        yield "unet3d", UNet3D(UNetConfig(channels=preset.channels, norm=preset.norm))
        if monai is not None:
            from monai.networks.nets import UNet

            # the same network: MONAI's residual UNet with the preset's norm (affine, as ours)
            norm = "batch" if preset.norm == "batch" else ("instance", {"affine": True})
            yield "monai", UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=preset.channels,
                                strides=(2,) * (len(preset.channels) - 1), num_res_units=2, norm=norm)

    variants = [("fp32", False, False)]
    if torch.device(args.device).type == "cuda":
        variants += [("bf16", True, False), ("bf16+channels_last", True, True)]
    row = {"preset": "phantom" if args.quick else "paper", "batch": batch, "patch": list(preset.patch)}
    models = dict(nets())
    for name, net in models.items():
        row[f"{name}_parameters"] = sum(p.numel() for p in net.to(args.device).parameters())
    for label, bf16, cl in variants:
        steps = {}
        for name, net in models.items():
            m = net.to(memory_format=torch.channels_last_3d) if cl else net
            xx = x.to(memory_format=torch.channels_last_3d) if cl else x
            opt = torch.optim.Adam(m.parameters(), lr=1e-4)

            def step(m=m, xx=xx, opt=opt, bf16=bf16):
                with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=bf16):
                    loss = dice_ce_loss(m(xx).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            steps[name] = step
        seconds = paired_median_seconds(steps, args.repeats, args.device)
        for name, t in seconds.items():
            row[f"{name}_{label}_voxels_per_s"] = x.numel() / t
            if torch.device(args.device).type == "cuda":  # each network's own peak: one more step alone
                torch.cuda.reset_peak_memory_stats()
                steps[name]()
                row[f"{name}_{label}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if monai is not None:
        row["ratio"] = row["unet3d_fp32_voxels_per_s"] / row["monai_fp32_voxels_per_s"]
    return row


def speed_fl_round(args) -> dict:
    """One SegViz round of four phantom clients: the aggregation's share of the time, and bytes."""
    import torch

    import fl
    import segviz
    from config import PRESETS
    from data import PatchSampler, SamplerConfig
    from training import dice_ce_loss
    from unet3d import UNet3D, UNetConfig

    preset = PRESETS["phantom"]
    torch.manual_seed(0)
    model = UNet3D(UNetConfig(channels=preset.channels)).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=preset.lr)
    cfg = SamplerConfig(patch=preset.patch, volumes_per_batch=preset.volumes_per_batch,
                        patches_per_volume=preset.patches_per_volume)
    clients = []
    for i in range(4):
        img, lab = synthetic_volume((110, 86, 86), args.device, seed=i)
        sampler = PatchSampler([img], [lab], cfg, device=args.device, seed=i)
        clients.append(fl.new_client(f"site{i}", model, optimizer, sampler.sample, dice_ce_loss))
    keys = segviz.shared_keys(clients[0].model_state, "segviz")
    spent = {"aggregate": 0.0}

    def timed_average(states, reference, weights=None):
        _sync(args.device)
        t = time.perf_counter()
        out = fl.mean(states, reference, weights)
        _sync(args.device)
        spent["aggregate"] += time.perf_counter() - t
        return out

    steps = 1 if args.quick else preset.local_steps
    fl.federated_round(model, optimizer, clients, steps, keys, timed_average)  # warm-up
    spent["aggregate"] = 0.0
    rounds = max(1, args.repeats)
    _sync(args.device)
    t = time.perf_counter()
    for _ in range(rounds):
        fl.federated_round(model, optimizer, clients, steps, keys, timed_average)
    _sync(args.device)
    total = (time.perf_counter() - t) / rounds
    sent = sum(clients[0].model_state[k].numel() * clients[0].model_state[k].element_size() for k in keys)
    return {"clients": 4, "local_steps": steps, "seconds_per_round": total,
            "aggregate_seconds": spent["aggregate"] / rounds, "aggregate_share": spent["aggregate"] / rounds / total,
            "bytes_up_per_round": 4 * sent, "bytes_down_per_round": 4 * sent}


def speed_surface(args, monai) -> dict:
    """HD95 and surface Dice at 2 mm of one organ-sized ellipsoid against a shifted, wider one, per
    case (metrics.py, CPU) against MONAI's compute_hausdorff_distance and compute_surface_dice."""
    import torch

    import metrics

    shape, spacing = ((96, 96, 48) if args.quick else (160, 160, 80)), (0.8, 0.8, 3.0)
    x, y, z = (torch.linspace(-1, 1, n).view([-1 if i == a else 1 for i in range(3)]) for a, n in enumerate(shape))
    truth = (x / 0.6) ** 2 + (y / 0.45) ** 2 + (z / 0.7) ** 2 < 1
    pred = ((x - 0.04) / 0.6) ** 2 + (y / 0.47) ** 2 + ((z + 0.05) / 0.7) ** 2 < 1  # ~3 voxels off, a little wider

    def ours():
        d = metrics.surface_distances(pred, truth, spacing)
        return metrics.hd95_from_distances(*d), metrics.surface_dice_from_distances(*d, 2.0)

    fns = {"ours": ours}
    if monai is not None:
        from monai.metrics import compute_hausdorff_distance, compute_surface_dice

        p, t = pred[None, None].float(), truth[None, None].float()

        def theirs():
            hd = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)
            return hd.item(), compute_surface_dice(p, t, [2.0], include_background=True, spacing=spacing).item()

        fns["monai"] = theirs
    seconds = paired_median_seconds(fns, args.repeats, "cpu")
    row = {"shape": list(shape), "spacing": list(spacing), "ours_s_per_case": seconds["ours"]}
    if monai is not None:
        row.update(monai_s_per_case=seconds["monai"], ratio=seconds["monai"] / seconds["ours"],
                   max_abs_difference=max(abs(a - b) for a, b in zip(ours(), fns["monai"]())))
    return row


SPEED_PARTS = ("sampling", "dice", "sliding_window", "train_step", "fl_round", "surface")


def bench_speed(args) -> dict:
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    monai = _monai()
    if monai is None:
        print("MONAI is not installed (pip install -r requirements-dev.txt): measuring this project alone",
              file=sys.stderr)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPU(s)"
    out = {"device": args.device, "machine": f"{device_name}, torch {torch.__version__}",
           "monai": getattr(monai, "__version__", None), "quick": args.quick, "targets": TARGETS}
    parts = [("sampling", speed_sampling), ("dice", speed_dice), ("sliding_window", speed_sliding_window),
             ("train_step", speed_train_step), ("fl_round", lambda a, _: speed_fl_round(a)),
             ("surface", speed_surface)]
    for name, fn in tqdm_list([(n, f) for n, f in parts if not args.only or n in args.only]):
        out[name] = {**fn(args, monai), "machine": out["machine"], "monai": out["monai"]}
    return out


def with_sampling_share(r: dict) -> dict:
    """On a GPU, the sampler's share of a paper-preset training step (the issue's < 5%)."""
    r = {k: v for k, v in r.items() if k != "sampling_share_of_paper_step"}
    if r.get("device") == "cuda" and "paper" in r.get("sampling", {}) and "train_step" in r:
        step_s = r["train_step"]["batch"] * 128 * 128 * 32 / r["train_step"]["unet3d_fp32_voxels_per_s"]
        sample_s = r["sampling"]["paper"]["patches_per_call"] / r["sampling"]["paper"]["ours_patches_per_s"]
        r["sampling_share_of_paper_step"] = sample_s / (sample_s + step_s)
    return r


def tqdm_list(items):
    from tqdm import tqdm

    return tqdm(items, desc="speed", unit="benchmark", disable=None)


def speed_table(r: dict) -> str:
    def ratio(x, target):
        if "ratio" not in x:
            return "- | -"
        return f"{x['ratio']:.2f}x | {'met' if x['ratio'] >= target else 'NOT met'} (target {target:g}x)"

    lines = [f"{r['machine']}, device {r['device']}, MONAI {r['monai'] or 'not installed'}"
             f"{' (quick sizes)' if r['quick'] else ''}", "",
             "| benchmark | this project | MONAI | ratio | target |", "|---|---|---|---|---|"]
    for preset, x in r.get("sampling", {}).items():
        if not isinstance(x, dict):  # the part's machine and MONAI version
            continue
        lines.append(f"| sampling, {preset} ({x['patches_per_call']} x {x['patch']} from {x['volume']}) | "
                     f"{x['ours_patches_per_s']:.1f} patches/s | {x.get('monai_patches_per_s', 0):.1f} patches/s | "
                     f"{ratio(x, TARGETS['sampling'])} |")
    if "dice" in r:
        x = r["dice"]
        lines.append(f"| Dice, {x['cases']} cases of {x['shape']}, {x['classes']} organs | "
                     f"{x['ours_cases_per_s']:.2f} cases/s | {x.get('monai_cases_per_s', 0):.2f} cases/s | "
                     f"{ratio(x, TARGETS['dice'])} |")
    if "sliding_window" in r:
        x = r["sliding_window"]
        lines.append(f"| sliding window, {x['volume']}, roi {x['roi']} | {x['ours_seconds']:.1f} s | "
                     f"{x.get('monai_seconds', 0):.1f} s | {ratio(x, TARGETS['sliding_window'])} |")
    if "train_step" in r:
        x = r["train_step"]
        lines.append(f"| training step, {x['preset']} preset, batch {x['batch']} x {x['patch']} | "
                     f"{x['unet3d_fp32_voxels_per_s'] / 1e6:.2f} Mvox/s ({x['unet3d_parameters'] / 1e6:.2f} M "
                     f"params) | {x.get('monai_fp32_voxels_per_s', 0) / 1e6:.2f} Mvox/s "
                     f"({x.get('monai_parameters', 0) / 1e6:.2f} M params) | {ratio(x, TARGETS['train_step'])} |")
    if "surface" in r:
        x = r["surface"]
        lines.append(f"| HD95 + surface Dice, one organ of {x['shape']} at {x['spacing']} mm | "
                     f"{x['ours_s_per_case'] * 1e3:.0f} ms | {x.get('monai_s_per_case', 0) * 1e3:.0f} ms | "
                     f"{ratio(x, TARGETS['surface'])} |")
    if "fl_round" in r:
        f = r["fl_round"]
        lines += ["", f"FL round (4 clients, {f['local_steps']} local steps): {f['seconds_per_round']:.2f} s, "
                  f"aggregation {f['aggregate_seconds'] * 1e3:.1f} ms ({100 * f['aggregate_share']:.2f}%), "
                  f"{f['bytes_up_per_round'] / 1e6:.2f} MB up and {f['bytes_down_per_round'] / 1e6:.2f} MB down"]
    for name in ("dice", "sliding_window", "surface"):
        if "max_abs_difference" in r.get(name, {}):
            lines.append(f"{name}: largest difference from MONAI's output {r[name]['max_abs_difference']:.2e}")
    if "sampling_share_of_paper_step" in r:
        share = r["sampling_share_of_paper_step"]
        lines.append(f"sampling's share of a paper-preset training step: {100 * share:.1f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    q = sub.add_parser("preprocess", help="real-data preprocessing: time per volume, cache size, peak memory")
    q.add_argument("--ct", default=REAL_CT, help="a CT (NIfTI) to time (default: the real CT in ../shared)")
    q.add_argument("--shape", type=int, nargs=3, default=(512, 512, 600), help="size of the synthetic CT")
    q.add_argument("--repeats", type=int, default=3, help="timed repeats of the real CT (median reported)")
    q.add_argument("--threads", type=int, default=2, help="torch threads")
    q.add_argument("--out", default="bench.json", help="where to write the results")
    e = sub.add_parser("exchange", help="keys and bytes that leave each site per round, per mode and preset")
    e.add_argument("--out", default="bench.json")
    m = sub.add_parser("clients", help="peak memory of N simulated clients (phantom preset, CPU)")
    m.add_argument("--n", type=int, nargs="+", default=[2, 4, 8, 16])
    m.add_argument("--rounds", type=int, default=2)
    m.add_argument("--local-steps", type=int, default=2)
    m.add_argument("--out", default="bench.json")
    sp = sub.add_parser("speed", help="sampler, Dice, sliding window, training step and FL round against MONAI")
    sp.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    sp.add_argument("--quick", action="store_true", help="small sizes (CI)")
    sp.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    sp.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    sp.add_argument("--out", default="bench.json")
    sp.add_argument("--only", nargs="+", choices=SPEED_PARTS, metavar="PART",
                    help=f"measure only these ({', '.join(SPEED_PARTS)}); the others keep their earlier "
                         "entry in --out")
    k = sub.add_parser("_clients")
    k.add_argument("n", type=int)
    k.add_argument("rounds", type=int)
    k.add_argument("steps", type=int)
    c = sub.add_parser("_child")
    c.add_argument("image")
    c.add_argument("label")
    c.add_argument("cache")
    args = p.parse_args(argv)
    if getattr(args, "out", None):
        from common import check_writable

        check_writable(args.out, "--out", file=True)
    if args.what == "_child":
        _child(args.image, args.label, args.cache)
        return 0
    if args.what == "_clients":
        _clients_child(args.n, args.rounds, args.steps)
        return 0
    if args.what == "preprocess":
        result = bench_preprocess(args)
        print(report(result))
    elif args.what == "speed":
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                p.error("--device cuda: no CUDA device is visible to PyTorch")
        key = f"speed_{args.device}{'_quick' if args.quick else ''}"
        result = bench_speed(args)
        if args.only:  # a partial run updates the parts it measured; each part names its machine
            result = {**read_json(args.out).get(key, {}), **result}
        result = with_sampling_share(result)
        print(speed_table(result))
        merge_json(args.out, key, result)
        return 0
    elif args.what == "exchange":
        result = bench_exchange(args)
        print(exchange_table(result))
    else:
        result = bench_clients(args)
        print(clients_table(result))
    merge_json(args.out, args.what, result)
    return 0


def exchange_table(r: dict) -> str:
    lines = ["| preset | mode | keys sent | MB up per site per round | MB down | what else leaves |",
             "|---|---|---|---|---|---|"]
    for preset, rows in r.items():
        for mode, x in rows.items():
            lines.append(f"| {preset} | {mode} | {x['keys_sent']}/{x['keys_total']} | "
                         f"{x['bytes_up_per_site'] / 1e6:.3f} | {x['bytes_down_per_site'] / 1e6:.3f} | "
                         f"{x['note'] or '-'} |")
    return "\n".join(lines)


def clients_table(r: dict) -> str:
    lines = ["| clients | peak RSS (MB) | growth over 2 clients (MB) | one client's state (MB) | s per round |",
             "|---|---|---|---|---|"]
    base = r["rows"][0]["peak_rss_bytes"]
    for x in r["rows"]:
        lines.append(f"| {x['clients']} | {x['peak_rss_bytes'] / 1e6:.0f} | {(x['peak_rss_bytes'] - base) / 1e6:.0f} | "
                     f"{x['state_bytes_per_client'] / 1e6:.2f} | {x['seconds_per_round']:.2f} |")
    return "\n".join(lines)


def read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
        return {}


def merge_json(path: str, key: str, value) -> None:
    """Keep every benchmark's latest result in one bench.json."""
    data = read_json(path)
    data[key] = value
    from common import write_json_atomic

    write_json_atomic(path, data)


if __name__ == "__main__":
    sys.exit(main())
