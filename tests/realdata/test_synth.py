"""`python -m realdata synth`, the independent synthetic federation: the project's own loaders find
all five archives it writes, every organ comes back non-empty with a plausible volume and on
the right side of the body, and a seed fixes the files."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from data import ORGAN_ID, ORGANS
from helpers import ROOT
from realdata import archives
from realdata import synth as sa
from realdata.federation import real_federation
from settings import resolve

COARSEN = 3.0  # in-plane ~2.4 mm: small and quick; the loaders resample to 3 mm anyway
SPACING = (3.0, 3.0, 3.0)
# plausible adult volumes in mL (kidneys: each of the two)
VOLUMES = {"liver": (800, 2500), "spleen": (100, 400), "pancreas": (40, 120), "kidney": (100, 250)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "archives"
    sa.generate(str(out), cases=2, test_cases=1, seed=0, coarsen=COARSEN, log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def loaded(root):
    cfg = resolve({"data_root": str(root), "spacing": SPACING, "cache": None, "val_split": "0"})
    train, test, info = real_federation(ORGANS, cfg, workers=1)
    return train, test, info


def ml(mask, spacing) -> float:
    return float(np.asarray(mask).sum()) * float(np.prod(spacing)) / 1000.0


def test_the_data_root_holds_all_five_archives(root):
    sources = archives.find_sources((*ORGANS, "test"), str(root))
    assert {r: s.layout for r, s in sources.items()} == {
        "liver": "msd", "spleen": "msd", "pancreas": "msd", "kidneys": "kits19", "test": "btcv"}
    assert {r: len(s.pairs) for r, s in sources.items()} == {
        "liver": 2, "spleen": 2, "pancreas": 2, "kidneys": 2, "test": 1}
    assert not any(s.problems for s in sources.values())
    # each archive as stored: its own array order (KiTS19 I,P,L) and image type
    for role, codes, dtype in (("spleen", "LPS", np.int16), ("pancreas", "RAS", np.int16),
                               ("kidneys", "IPL", np.float32), ("test", "LAS", np.int16)):
        img = nib.load(sources[role].pairs[0].image)
        assert "".join(nib.aff2axcodes(img.affine)) == codes, role
        assert img.get_data_dtype() == dtype, role


def test_every_organ_loads_non_empty_with_a_plausible_volume(loaded):
    train, test, _ = loaded
    for site, cases in train.items():
        assert len(cases) == 2
        for case in cases:
            organ = case.label == ORGAN_ID[site]
            assert set(np.unique(case.label.numpy())) == {0, ORGAN_ID[site]}, (site, case.name)
            if site == "kidneys":
                parts, n = ndimage.label(organ.numpy())
                sizes = sorted(
                    (ml(parts == i, case.spacing) for i in range(1, n + 1)), reverse=True
                )
                assert len(sizes) >= 2, (case.name, sizes)
                for v in sizes[:2]:
                    # + tumour
                    assert VOLUMES["kidney"][0] <= v <= VOLUMES["kidney"][1] + 30, (
                        case.name,
                        sizes,
                    )
                assert sum(sizes[2:]) < 5, (case.name, sizes)
            else:
                lo, hi = VOLUMES[site]
                assert lo <= ml(organ, case.spacing) <= hi, (
                    site,
                    case.name,
                    ml(organ, case.spacing),
                )
    assert len(test) == 1
    case = test[0]
    for organ in ORGANS:
        v = ml(case.label == ORGAN_ID[organ], case.spacing)
        lo, hi = (
            (2 * VOLUMES["kidney"][0], 2 * VOLUMES["kidney"][1])
            if organ == "kidneys"
            else VOLUMES[organ]
        )
        assert lo <= v <= hi, (organ, v)


def test_organs_lie_where_they_belong_and_look_like_their_phase(root, loaded):
    train, test, _ = loaded

    # 0: the patient's left edge of the body, 1: the right (loaded as R,A,S)
    def x_fraction(case, organ):
        idx = np.argwhere(case.label.numpy() == ORGAN_ID[organ])
        return idx[:, 0].mean() / (case.label.shape[0] - 1)

    for case in train["liver"]:
        assert x_fraction(case, "liver") > 0.55, case.name
    for case in train["spleen"]:
        assert x_fraction(case, "spleen") < 0.4, case.name
    for case in train["pancreas"]:
        assert 0.3 < x_fraction(case, "pancreas") < 0.7, case.name
    t = test[0]
    assert x_fraction(t, "liver") > 0.55 > 0.4 > x_fraction(t, "spleen")
    # BTCV's own ids, read straight from the file: right kidney (2) right of the left one (3)
    pair = archives.find_sources(("test",), str(root))["test"].pairs[0]
    img = nib.load(pair.label)
    lab = np.asanyarray(img.dataobj)
    world = {v: (img.affine @ [*np.argwhere(lab == v).mean(0), 1])[0] for v in (1, 2, 3, 6)}
    assert world[2] > world[3] and world[6] > world[1], world  # RAS: +x is the patient's right
    # intensities: portal-venous liver and spleen, arterial (KiTS19) kidney cortex brighter than
    # venous
    for site, (lo, hi) in {"liver": (80, 150), "spleen": (85, 160), "pancreas": (55, 130)}.items():
        for case in train[site]:
            med = float(case.hu[case.label == ORGAN_ID[site]].median())
            assert lo < med < hi, (site, case.name, med)
    for case in train["kidneys"]:
        assert float(case.hu[case.label == ORGAN_ID["kidneys"]].quantile(0.9)) > 200, case.name
    assert float(t.hu[t.label == ORGAN_ID["kidneys"]].quantile(0.9)) < 230


def _arrays(path):
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img.affine


def test_a_seed_fixes_the_files_and_another_seed_changes_them(root, tmp_path):
    again = tmp_path / "again"
    sa.generate(
        str(again),
        cases=1,
        test_cases=1,
        seed=0,
        coarsen=COARSEN,
        roles=("spleen", "kidneys"),
        log=lambda s: None,
    )
    for rel in (
        "Task09_Spleen/imagesTr/spleen_2.nii.gz",
        "Task09_Spleen/labelsTr/spleen_2.nii.gz",
        "kits19/data/case_00000/imaging.nii.gz",
        "kits19/data/case_00000/segmentation.nii.gz",
    ):
        (a, aff_a), (b, aff_b) = _arrays(root / rel), _arrays(again / rel)
        assert a.dtype == b.dtype and np.array_equal(a, b), rel
        assert np.array_equal(aff_a, aff_b), rel
    other = tmp_path / "other"
    sa.generate(
        str(other),
        cases=1,
        test_cases=1,
        seed=1,
        coarsen=COARSEN,
        roles=("spleen",),
        log=lambda s: None,
    )
    a, _ = _arrays(root / "Task09_Spleen/imagesTr/spleen_2.nii.gz")
    b, _ = _arrays(other / "Task09_Spleen/imagesTr/spleen_2.nii.gz")
    assert a.shape != b.shape or not np.array_equal(a, b)


@pytest.mark.parametrize("args, says", [(["--cases", "0"], "--cases 0"), ([], "not empty"),
                                        (["--coarsen", "9"], "--coarsen 9")])
def test_a_bad_argument_is_one_line_and_exit_2(args, says, root):
    r = subprocess.run([sys.executable, "-m", "realdata", "synth", str(root), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stdout == ""
