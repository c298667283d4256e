"""`python -m bench speed`: this project's pieces timed side by side with MONAI, the toolkit
the original used (a peer for measuring, never a dependency): the patch sampler, Dice, sliding-
window inference, the training step, the FL round and the surface metrics, on the CPU or CUDA.
See docs/speed.md.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # torch and MONAI are imported where they are measured
    import argparse
    from types import ModuleType

    import torch
    from monai.transforms import Compose

    from fl import Notes, State

_T = TypeVar("_T")

TARGETS = {"sampling": 10.0, "dice": 5.0, "sliding_window": 1.0, "train_step": 1.0, "surface": 1.0}
SIZES = {  # full sizes, and --quick ones for CI
    "sampling": {
        "paper": ((256, 256, 128), (128, 128, 32), 4),
        "phantom": ((110, 86, 86), (64, 64, 32), 2),
    },
    "dice": {"full": ((256, 256, 128), 8), "quick": ((96, 96, 64), 4)},
    "sliding_window": {"full": (256, 256, 160), "quick": (160, 160, 64)},
}


def _monai() -> ModuleType | None:
    """MONAI when installed (requirements-dev.txt), else None: it is a peer, never a dependency."""
    try:
        import monai
    except ImportError:
        return None
    return monai


def _sync(device: torch.device | str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def paired_median_seconds(
    fns: dict, repeats: int, device: torch.device | str, warmup: int = 1
) -> dict[str, float]:
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


def median_seconds(
    fn: Callable[[], object], repeats: int, device: torch.device | str, warmup: int = 1
) -> float:
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


def synthetic_volume(shape: tuple[int, int, int], device: torch.device | str, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
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


def speed_sampling(args: argparse.Namespace, monai: ModuleType | None) -> dict:
    """Augmented training patches per second: PatchSampler against the original's MONAI chain."""
    from sampler import PatchSampler, SamplerConfig

    out = {}
    for preset, (vol_shape, patch, n) in SIZES["sampling"].items():
        if args.quick and preset == "paper":
            vol_shape, patch = (128, 128, 64), (64, 64, 32)
        img, lab = synthetic_volume(vol_shape, args.device)
        sampler = PatchSampler(
            [img],
            [lab],
            SamplerConfig(patch=patch, volumes_per_batch=1, patches_per_volume=n),
            device=args.device,
            seed=0,
        )
        ours = median_seconds(sampler.sample, args.repeats * 5, args.device, warmup=2)
        row = {"volume": list(vol_shape), "patch": list(patch), "patches_per_call": n,
               "ours_patches_per_s": n / ours}
        if monai is not None:
            chain = _monai_train_chain(monai, patch, n)
            item = {"image": img[None].clone(), "label": lab[None].clone()}
            set_determinism = monai.utils.set_determinism
            set_determinism(seed=0)
            t = median_seconds(
                lambda chain=chain, item=item: chain(dict(item)), args.repeats, args.device
            )
            row["monai_patches_per_s"] = n / t
            row["ratio"] = t / ours
            set_determinism(seed=None)
        out[preset] = row
    return out


def _monai_train_chain(monai: ModuleType, patch: tuple[int, int, int], n: int) -> Compose:
    """The original SegViz notebooks' augmentation after loading (pos = neg = 1 crops, intensity
    scale and shift 0.1, a random affine of up to pi/15 about z and 10% scaling)."""
    import math

    from monai import transforms as T

    return T.Compose(
        [
            T.RandCropByPosNegLabeld(
                keys=["image", "label"],
                label_key="label",
                spatial_size=patch,
                pos=1,
                neg=1,
                num_samples=n,
                image_key="image",
                image_threshold=0,
            ),
            T.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            T.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            T.RandAffined(
                keys=["image", "label"],
                mode=("bilinear", "nearest"),
                prob=0.5,
                spatial_size=patch,
                rotate_range=(0, 0, math.pi / 15),
                scale_range=(0.1, 0.1, 0.1),
            ),
        ]
    )


def speed_dice(args: argparse.Namespace, monai: ModuleType | None) -> dict:
    """Per-organ Dice of whole label maps (cases per second) against monai.metrics.DiceMetric."""
    import torch

    import metrics

    shape, cases = SIZES["dice"]["quick" if args.quick else "full"]
    g = torch.Generator().manual_seed(0)
    truths, preds = [], []
    for i in range(cases):
        img, lab = synthetic_volume(shape, "cpu", seed=i)
        # 5 classes, some overlap-free organs
        truth = (lab.long() + 2 * (img > 0.6).long()).clamp(max=4)
        noise = torch.randint(0, 5, shape, generator=g)
        flip = torch.rand(shape, generator=g) < 0.05
        truths.append(truth.to(args.device))
        preds.append(torch.where(flip, noise, truth).to(args.device))
    k = 4

    def ours() -> list[list[float]]:
        return [metrics.label_dice(p, t, k) for p, t in zip(preds, truths)]

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


def speed_sliding_window(args: argparse.Namespace, monai: ModuleType | None) -> dict:
    """Whole-volume inference with the phantom preset's network against sliding_window_inference."""
    import torch

    import eval as ev
    from settings import resolve
    from unet3d import UNet3D, UNetConfig

    preset = resolve({"preset": "phantom"})
    torch.manual_seed(0)
    net = (
        UNet3D(UNetConfig(classes=5, channels=preset.channels, norm=preset.norm))
        .to(args.device)
        .eval()
    )
    shape = SIZES["sliding_window"]["quick" if args.quick else "full"]
    vol = torch.rand((1, 1, *shape), generator=torch.Generator().manual_seed(0)).to(args.device)
    roi, overlap, batch = preset.patch, 0.25, 4
    row = {"volume": list(shape), "roi": list(roi), "overlap": overlap, "batch": batch}
    outputs = {}

    with torch.no_grad():
        fns = {
            "ours": lambda: outputs.__setitem__(
                "ours", ev.sliding_window(net, vol, roi, overlap, "gaussian", batch=batch)
            )
        }
        if monai is not None:
            from monai.inferers import sliding_window_inference

            # the same blending weights (MONAI floors its own Gaussian at 1e-3, eval.py does not)
            weights = ev.importance_map(roi, "gaussian", vol.device)
            fns["monai"] = lambda: outputs.__setitem__("monai", sliding_window_inference(
                vol, roi, batch, net, overlap=overlap, mode="gaussian", roi_weight_map=weights))
        seconds = paired_median_seconds(fns, max(1, args.repeats // 2), args.device, warmup=0)
        row["ours_seconds"] = seconds["ours"]
        if monai is not None:
            row.update(
                monai_seconds=seconds["monai"],
                ratio=seconds["monai"] / seconds["ours"],
                max_abs_difference=float(
                    (outputs["ours"] - torch.as_tensor(outputs["monai"])).abs().max()
                ),
            )
    return row


def speed_train_step(args: argparse.Namespace, monai: ModuleType | None) -> dict:
    """Voxels per second of one optimiser step at the paper preset (quick: the phantom preset)."""
    import torch

    from common import amp_dtype, autocast
    from settings import resolve
    from train import dice_ce_loss
    from unet3d import UNet3D, UNetConfig

    preset = resolve({"preset": "phantom" if args.quick else "paper"})
    batch = preset.volumes_per_batch * preset.patches_per_volume
    if args.device == "cpu" and not args.quick:
        # a CPU step of 8 patches of 128 x 128 x 32 takes minutes; the ratio is what matters
        batch = 2
    x = torch.rand((batch, 1, *preset.patch), device=args.device)
    y = (x[:, 0] > 0.5).long()

    def nets() -> Iterator[tuple[str, torch.nn.Module]]:
        torch.manual_seed(0)
        yield "unet3d", UNet3D(UNetConfig(channels=preset.channels, norm=preset.norm))
        if monai is not None:
            from monai.networks.nets import UNet

            # the same network: MONAI's residual UNet with the preset's norm (affine, as ours)
            norm = "batch" if preset.norm == "batch" else ("instance", {"affine": True})
            yield (
                "monai",
                UNet(
                    spatial_dims=3,
                    in_channels=1,
                    out_channels=2,
                    channels=preset.channels,
                    strides=(2,) * (len(preset.channels) - 1),
                    num_res_units=2,
                    norm=norm,
                ),
            )

    # float32 in the default layout (against MONAI's), and as training takes it (channels-last),
    # with and without --amp (common.amp_dtype); on CUDA also --amp in the default layout
    amp = amp_dtype(args.device)
    variants = [("fp32", None, False), ("fp32+channels_last", None, True), ("amp", amp, True)]
    if torch.device(args.device).type == "cuda":
        variants += [("amp_contiguous", amp, False)]
    row = {
        "preset": "phantom" if args.quick else "paper",
        "batch": batch,
        "patch": list(preset.patch),
    }
    models = dict(nets())
    for name, net in models.items():
        row[f"{name}_parameters"] = sum(p.numel() for p in net.to(args.device).parameters())
    for label, dtype, cl in variants:
        steps = {}
        for name, net in models.items():
            m = copy.deepcopy(net)  # each variant its own copy: .to() changes a module in place
            m = m.to(memory_format=torch.channels_last_3d) if cl else m
            xx = x.to(memory_format=torch.channels_last_3d) if cl else x
            opt = torch.optim.Adam(m.parameters(), lr=1e-4)
            scaler = torch.amp.GradScaler(args.device) if dtype == torch.float16 else None

            def step(
                m: torch.nn.Module = m,
                xx: torch.Tensor = xx,
                opt: torch.optim.Optimizer = opt,
                dtype: torch.dtype | None = dtype,
                scaler: torch.amp.GradScaler | None = scaler,
            ) -> None:  # as fl.local_train takes it
                with autocast(args.device, dtype):
                    out = m(xx)
                loss = dice_ce_loss(out.float(), y)
                opt.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    opt.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()

            steps[name] = step
        seconds = paired_median_seconds(steps, args.repeats, args.device)
        for name, t in seconds.items():
            row[f"{name}_{label}_voxels_per_s"] = x.numel() / t
            # each network's own peak: one more step alone
            if torch.device(args.device).type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                steps[name]()
                row[f"{name}_{label}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if monai is not None:
        row["ratio"] = row["unet3d_fp32_voxels_per_s"] / row["monai_fp32_voxels_per_s"]
    row["amp_dtype"] = str(amp).removeprefix("torch.")
    row["amp_speedup"] = (row["unet3d_amp_voxels_per_s"]
                          / row["unet3d_fp32+channels_last_voxels_per_s"])
    return row


def speed_fl_round(args: argparse.Namespace) -> dict:
    """One SegViz round of four phantom clients: the aggregation's share of the time, and bytes."""
    import torch

    import fl
    import segviz
    from sampler import PatchSampler, SamplerConfig
    from settings import resolve
    from train import dice_ce_loss
    from unet3d import UNet3D, UNetConfig

    preset = resolve({"preset": "phantom"})
    torch.manual_seed(0)
    model = UNet3D(UNetConfig(channels=preset.channels, norm=preset.norm)).to(args.device)
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

    def timed_average(
        states: Sequence[State], reference: State, weights: Sequence[float] | None = None
    ) -> tuple[State, Notes]:
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
    sent = sum(
        clients[0].model_state[k].numel() * clients[0].model_state[k].element_size() for k in keys
    )
    return {
        "clients": 4,
        "local_steps": steps,
        "seconds_per_round": total,
        "aggregate_seconds": spent["aggregate"] / rounds,
        "aggregate_share": spent["aggregate"] / rounds / total,
        "bytes_up_per_round": 4 * sent,
        "bytes_down_per_round": 4 * sent,
    }


def speed_surface(args: argparse.Namespace, monai: ModuleType | None) -> dict:
    """HD95 and surface Dice at 2 mm of one organ-sized ellipsoid against a shifted, wider one, per
    case (metrics.py, CPU) against MONAI's compute_hausdorff_distance and compute_surface_dice."""
    import torch

    import metrics

    shape, spacing = ((96, 96, 48) if args.quick else (160, 160, 80)), (0.8, 0.8, 3.0)
    x, y, z = (
        torch.linspace(-1, 1, n).view([-1 if i == a else 1 for i in range(3)])
        for a, n in enumerate(shape)
    )
    truth = (x / 0.6) ** 2 + (y / 0.45) ** 2 + (z / 0.7) ** 2 < 1
    # ~3 voxels off, a little wider
    pred = ((x - 0.04) / 0.6) ** 2 + (y / 0.47) ** 2 + ((z + 0.05) / 0.7) ** 2 < 1

    def ours() -> tuple[float, float]:
        d = metrics.surface_distances(pred, truth, spacing)
        return metrics.hd95_from_distances(*d), metrics.surface_dice_from_distances(*d, 2.0)

    fns = {"ours": ours}
    if monai is not None:
        from monai.metrics import compute_hausdorff_distance, compute_surface_dice

        p, t = pred[None, None].float(), truth[None, None].float()

        def theirs() -> tuple[float, float]:
            hd = compute_hausdorff_distance(
                p, t, include_background=True, percentile=95, spacing=spacing
            )
            return hd.item(), compute_surface_dice(
                p, t, [2.0], include_background=True, spacing=spacing
            ).item()

        fns["monai"] = theirs
    seconds = paired_median_seconds(fns, args.repeats, "cpu")
    row = {"shape": list(shape), "spacing": list(spacing), "ours_s_per_case": seconds["ours"]}
    if monai is not None:
        row.update(monai_s_per_case=seconds["monai"], ratio=seconds["monai"] / seconds["ours"],
                   max_abs_difference=max(abs(a - b) for a, b in zip(ours(), fns["monai"]())))
    return row


SPEED_PARTS = ("sampling", "dice", "sliding_window", "train_step", "fl_round", "surface")


def bench_speed(args: argparse.Namespace) -> dict:
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    monai = _monai()
    if monai is None:
        print(
            "MONAI is not installed (pip install -r requirements-dev.txt): measuring this project "
            "alone",
            file=sys.stderr,
        )
    device_name = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPU(s)"
    )
    out = {"device": args.device, "machine": f"{device_name}, torch {torch.__version__}",
           "monai": getattr(monai, "__version__", None), "quick": args.quick, "targets": TARGETS}
    parts = [
        ("sampling", speed_sampling),
        ("dice", speed_dice),
        ("sliding_window", speed_sliding_window),
        ("train_step", speed_train_step),
        ("fl_round", lambda a, _: speed_fl_round(a)),
        ("surface", speed_surface),
    ]
    for name, fn in tqdm_list([(n, f) for n, f in parts if not args.only or n in args.only]):
        out[name] = {**fn(args, monai), "machine": out["machine"], "monai": out["monai"]}
    return out


def with_sampling_share(r: dict) -> dict:
    """On a GPU, the sampler's share of a paper-preset training step (the issue's < 5%)."""
    r = {k: v for k, v in r.items() if k != "sampling_share_of_paper_step"}
    if r.get("device") == "cuda" and "paper" in r.get("sampling", {}) and "train_step" in r:
        step_s = (
            r["train_step"]["batch"] * 128 * 128 * 32 / r["train_step"]["unet3d_fp32_voxels_per_s"]
        )
        sample_s = (
            r["sampling"]["paper"]["patches_per_call"]
            / r["sampling"]["paper"]["ours_patches_per_s"]
        )
        r["sampling_share_of_paper_step"] = sample_s / (sample_s + step_s)
    return r


def tqdm_list(items: list[_T]) -> Iterable[_T]:
    from tqdm import tqdm

    return tqdm(items, desc="speed", unit="benchmark", disable=None)


def speed_table(r: dict) -> str:
    def ratio(x: dict, target: float) -> str:
        if "ratio" not in x:
            return "- | -"
        met = "met" if x["ratio"] >= target else "NOT met"
        return f"{x['ratio']:.2f}x | {met} (target {target:g}x)"

    lines = [f"{r['machine']}, device {r['device']}, MONAI {r['monai'] or 'not installed'}"
             f"{' (quick sizes)' if r['quick'] else ''}", "",
             "| benchmark | this project | MONAI | ratio | target |", "|---|---|---|---|---|"]
    for preset, x in r.get("sampling", {}).items():
        if not isinstance(x, dict):  # the part's machine and MONAI version
            continue
        lines.append(
            f"| sampling, {preset} ({x['patches_per_call']} x {x['patch']} from {x['volume']}) | "
            f"{x['ours_patches_per_s']:.1f} patches/s | {x.get('monai_patches_per_s', 0):.1f} "
            f"patches/s | {ratio(x, TARGETS['sampling'])} |"
        )
    if "dice" in r:
        x = r["dice"]
        lines.append(
            f"| Dice, {x['cases']} cases of {x['shape']}, {x['classes']} organs | "
            f"{x['ours_cases_per_s']:.2f} cases/s | {x.get('monai_cases_per_s', 0):.2f} cases/s | "
            f"{ratio(x, TARGETS['dice'])} |"
        )
    if "sliding_window" in r:
        x = r["sliding_window"]
        lines.append(
            f"| sliding window, {x['volume']}, roi {x['roi']} | {x['ours_seconds']:.1f} s | "
            f"{x.get('monai_seconds', 0):.1f} s | {ratio(x, TARGETS['sliding_window'])} |"
        )
    if "train_step" in r:
        x = r["train_step"]
        lines.append(
            f"| training step, {x['preset']} preset, batch {x['batch']} x {x['patch']} | "
            f"{x['unet3d_fp32_voxels_per_s'] / 1e6:.2f} Mvox/s "
            f"({x['unet3d_parameters'] / 1e6:.2f} M "
            f"params) | {x.get('monai_fp32_voxels_per_s', 0) / 1e6:.2f} Mvox/s "
            f"({x.get('monai_parameters', 0) / 1e6:.2f} M params) | "
            f"{ratio(x, TARGETS['train_step'])} |"
        )
    if "surface" in r:
        x = r["surface"]
        lines.append(
            f"| HD95 + surface Dice, one organ of {x['shape']} at {x['spacing']} mm | "
            f"{x['ours_s_per_case'] * 1e3:.0f} ms | {x.get('monai_s_per_case', 0) * 1e3:.0f} ms | "
            f"{ratio(x, TARGETS['surface'])} |"
        )
    if "fl_round" in r:
        f = r["fl_round"]
        lines += [
            "",
            f"FL round (4 clients, {f['local_steps']} local steps): {f['seconds_per_round']:.2f} "
            f"s, aggregation {f['aggregate_seconds'] * 1e3:.1f} ms "
            f"({100 * f['aggregate_share']:.2f}%), {f['bytes_up_per_round'] / 1e6:.2f} MB up and "
            f"{f['bytes_down_per_round'] / 1e6:.2f} MB down",
        ]
    for name in ("dice", "sliding_window", "surface"):
        if "max_abs_difference" in r.get(name, {}):
            lines.append(
                f"{name}: largest difference from MONAI's output "
                f"{r[name]['max_abs_difference']:.2e}"
            )
    if "amp_speedup" in r.get("train_step", {}):
        x = r["train_step"]
        memory = (f"; peak memory {x['unet3d_fp32+channels_last_peak_gib']:.2f} GiB in float32, "
                  f"{x['unet3d_amp_peak_gib']:.2f} GiB under --amp"
                  if "unet3d_amp_peak_gib" in x else "")
        lines.append(f"--amp ({x['amp_dtype']} autocast): the training step at "
                     f"{x['amp_speedup']:.2f}x float32's speed, both channels-last as training "
                     f"runs{memory}")
    if "sampling_share_of_paper_step" in r:
        share = r["sampling_share_of_paper_step"]
        lines.append(f"sampling's share of a paper-preset training step: {100 * share:.1f}%")
    return "\n".join(lines)
