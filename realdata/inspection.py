"""`python -m realdata inspect`: check a download before a long run. For each dataset: its
layout, cases, shapes, spacings, axis codes, label values, and every problem by file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tqdm import tqdm

from data import NODE_SITES, SITE_ORGAN, DataError
from realdata.archives import LOOKED_FOR, Source, find_dataset, find_sources, locate
from realdata.nifti import read_pair
from realdata.preprocess import axis_codes
from settings import add_arguments


def inspect_source(source: Source, read_data: bool = True) -> dict:
    """Cases, shapes, spacings, axis codes and label values of a dataset, and its problems."""
    import nibabel as nib

    report = {
        "role": source.role,
        "layout": source.layout,
        "root": os.path.abspath(source.root),
        "cases": len(source.pairs),
        "declared_labels": list(source.declared) if source.declared else None,
        "label_map": {str(k): v for k, v in source.label_map.items()}
        if source.label_map
        else "non-zero",
        "shapes": {},
        "spacings": {},
        "axis_codes": {},
        "label_voxels": {},
        "problems": list(source.problems),
        "notes": list(source.notes),
    }
    organ_found = False
    for pair in tqdm(source.pairs, desc=f"inspect {source.role}", disable=None, leave=False):
        try:
            if not os.path.isfile(pair.image):
                continue  # already a problem of the listing
            img = nib.load(pair.image)
            shape = "x".join(map(str, img.shape))
            spacing = "x".join(f"{z:.2f}" for z in img.header.get_zooms()[:3])
            codes = axis_codes(img.affine)
            for key, value in (("shapes", shape), ("spacings", spacing), ("axis_codes", codes)):
                report[key][value] = report[key].get(value, 0) + 1
            if read_data and pair.label is not None and os.path.isfile(pair.label):
                *_, counts = read_pair(pair, source.declared)
                for v, n in counts.items():
                    report["label_voxels"][str(v)] = report["label_voxels"].get(str(v), 0) + n
                mapped = source.label_map
                organ_found |= any(
                    n > 0 and v != 0 and (mapped is None or v in mapped) for v, n in counts.items()
                )
        except DataError as e:
            report["problems"].append(str(e))
        except Exception as e:  # a header nibabel cannot parse
            report["problems"].append(f"{pair.image}: cannot be read ({type(e).__name__}: {e})")
    if not source.pairs:
        report["problems"].append(f"{source.root}: no labelled case found")
    elif read_data and not organ_found:
        what = "any organ" if source.role == "test" else f"the {SITE_ORGAN[source.role]}"
        report["problems"].append(f"{source.root}: no voxel of {what} is labelled in any case")
    return report


def format_report(r: dict) -> str:
    def counted(d: dict) -> str:
        return ", ".join(f"{k} ({v})" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "-"

    lines = [
        f"{r['role']}: {r['cases']} case(s), {r['layout']} layout, {r['root']}",
        f"  shapes      {counted(r['shapes'])}",
        f"  spacing mm  {counted(r['spacings'])}",
        f"  axis codes  {counted(r['axis_codes'])}",
        "  labels      "
        + (
            ", ".join(
                f"{k}: {v} voxels"
                for k, v in sorted(r["label_voxels"].items(), key=lambda kv: int(kv[0]))
            )
            or "not read"
        ),
        f"  organ map   {r['label_map']}",
    ]
    lines += [f"  note        {n}" for n in r["notes"]]
    lines += [f"  PROBLEM     {p}" for p in r["problems"]] or ["  problems    none"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m realdata inspect",
        description="Check real datasets before training on them: print cases, shapes, "
        "spacings, axis codes, label values and problems.",
    )
    add_arguments(p, only=("data_root", "data", "nodes"))
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--headers-only", action="store_true", help="read headers only (fast; no label values)"
    )
    args = p.parse_args(argv)
    data_root, overrides = getattr(args, "data_root", None), dict(getattr(args, "data", []))
    roles = (*NODE_SITES[getattr(args, "nodes", 4)], "test")
    if not data_root and not overrides:
        p.error("inspect needs --data-root DIR or --data SITE=PATH")
    reports = []
    try:
        if data_root and not os.path.isdir(data_root):
            raise DataError(f"--data-root {data_root}: no such folder")
        paths = {
            r: overrides.get(r) or (locate(data_root, r) if data_root else None) for r in roles
        }
        if all(v is None for v in paths.values()):
            # raises the message naming what was looked for
            find_sources(roles, data_root, overrides)
        for role in roles:
            if paths[role] is None:
                reports.append(
                    {
                        "role": role,
                        "missing": True,
                        "problems": [f"no {role} dataset found (looked for {LOOKED_FOR[role]})"],
                    }
                )
                continue
            try:
                reports.append(
                    inspect_source(find_dataset(paths[role], role), not args.headers_only)
                )
            except DataError as e:
                reports.append({"role": role, "root": paths[role], "problems": [str(e)]})
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        for r in reports:
            print(format_report(r) if "cases" in r else f"{r['role']}:\n" + "\n".join(
                f"  PROBLEM     {x}" for x in r["problems"]))
    return 1 if any(r["problems"] for r in reports) else 0
