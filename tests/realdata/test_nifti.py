"""Each kind of bad input, named in one line: truncated or foreign files, image and label that
disagree in shape or placement, labels that are not integers or not declared, volumes that are
not 3-D, singular affines, NaN voxels, a site that labelled nothing."""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
import torch

import layouts
from data import DataError
from realdata.archives import find_dataset
from realdata.preprocess import check_labelled, load_source

pytestmark = pytest.mark.skipif(bool(layouts.MISSING), reason=layouts.MISSING)
NATIVE = (3.0, 3.0, 3.0)



def one_case(tmp_path, organ="spleen"):
    base = {"spleen": layouts.msd_spleen, "liver": layouts.msd_liver}[organ](tmp_path / "data")
    return base, find_dataset(str(base), organ)


def rewrite(path, array, affine=None):
    img = nib.load(path)
    nib.save(nib.Nifti1Image(array, img.affine if affine is None else affine), path)


def test_truncated_nifti(tmp_path):
    _, source = one_case(tmp_path)
    path = source.pairs[0].image
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=f"{path}: cannot be read as NIfTI"):
        load_source(source, NATIVE, str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == [], "nothing half-written in the cache"


def test_not_a_nifti_at_all(tmp_path):
    _, source = one_case(tmp_path)
    path = source.pairs[0].label
    with gzip.open(path, "wb") as f:
        f.write(b"plain text, not NIfTI")
    with pytest.raises(DataError, match=f"{path}: cannot be read as NIfTI"):
        load_source(source, NATIVE, None)


def test_image_and_label_of_different_shape(tmp_path):
    _, source = one_case(tmp_path)
    lab = np.asanyarray(nib.load(source.pairs[0].label).dataobj)
    rewrite(source.pairs[0].label, np.ascontiguousarray(lab[:-1]))
    with pytest.raises(DataError, match=r"shape .* differs from its image's"):
        load_source(source, NATIVE, None)


def test_image_and_label_of_different_affine(tmp_path):
    _, source = one_case(tmp_path)
    img = nib.load(source.pairs[0].label)
    shifted = img.affine.copy()
    shifted[0, 3] += 5.0
    rewrite(source.pairs[0].label, np.asanyarray(img.dataobj), shifted)
    with pytest.raises(DataError, match=f"{source.pairs[0].label}: affine differs"):
        load_source(source, NATIVE, None)


def test_a_label_whose_header_differs_only_by_rounding_or_says_nothing_lies_on_its_image(tmp_path):
    # headers written by other tools: an origin 0.05 mm off, axes rounded to float32; a label
    # with no qform or sform code (nibabel then reports a fall-back affine of its own)
    _, source = one_case(tmp_path)
    expected = load_source(source, NATIVE, None)[0]
    path = source.pairs[0].label
    img = nib.load(path)
    lab, near = np.asanyarray(img.dataobj), img.affine.copy()
    near[:3, 3] += 0.05
    near[:3, :3] = near[:3, :3].astype(np.float32)
    for affine, code in ((near, 1), (img.affine, 0)):
        out = nib.Nifti1Image(lab, affine)
        out.set_qform(affine, code=code)
        out.set_sform(affine, code=code)
        nib.save(out, path)
        assert torch.equal(load_source(source, NATIVE, None)[0].label, expected.label)
    # half a voxel off (the CT's voxels are 3 mm) is a different grid, and so is a voxel size
    # 1 % off: the far corner lies more than a voxel away
    far, stretched = img.affine.copy(), img.affine.copy()
    far[0, 3] += 1.5
    stretched[:3, 0] *= 1.01
    for affine in (far, stretched):
        rewrite(path, lab, affine)
        with pytest.raises(DataError, match=f"{path}: affine differs"):
            load_source(source, NATIVE, None)


def test_labels_stored_as_scaled_floats_are_rounded_and_fractions_refused(tmp_path):
    _, source = one_case(tmp_path)
    expected = load_source(source, NATIVE, None)[0]
    path = source.pairs[0].label
    lab = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
    # reads back as 0.996: a scale factor's error
    scaled = nib.Nifti1Image(lab * 0.996, nib.load(path).affine)
    nib.save(scaled, path)
    assert np.asanyarray(nib.load(path).dataobj).max() < 1
    assert torch.equal(load_source(source, NATIVE, None)[0].label, expected.label)
    lab[lab > 0] = 0.5
    rewrite(path, lab)
    with pytest.raises(DataError, match=f"{path}: label values are not integers"):
        load_source(source, NATIVE, None)


@pytest.mark.parametrize("shape, dims", [((64, 64), "2-D"), ((16, 16, 8, 2), "4-D")])
def test_volume_that_is_not_3d(shape, dims, tmp_path):
    _, source = one_case(tmp_path)
    rewrite(source.pairs[0].image, np.zeros(shape, np.int16))
    with pytest.raises(DataError, match=f"{source.pairs[0].image}: a {dims} volume"):
        load_source(source, NATIVE, None)


def test_image_and_label_with_a_singular_affine(tmp_path):
    # a scanner header whose slice axis is zero: nothing to orient the volume by
    _, source = one_case(tmp_path)
    flat = np.diag([0.8, 0.8, 0.0, 1.0])
    for path in (source.pairs[0].label, source.pairs[0].image):
        img = nib.Nifti1Image(np.asanyarray(nib.load(path).dataobj), None)
        img.set_sform(flat, code=1)  # nibabel will not write a singular qform; a sform it will
        nib.save(img, path)
    with pytest.raises(DataError, match=f"{source.pairs[0].image}: no usable affine"):
        load_source(source, NATIVE, None)


def test_nan_voxels(tmp_path):
    _, source = one_case(tmp_path)
    img = np.asanyarray(nib.load(source.pairs[0].image).dataobj).astype(np.float32)
    img[5, 5, 5] = np.nan
    img[6, 6, 6] = np.inf
    rewrite(source.pairs[0].image, img)
    with pytest.raises(DataError, match="2 NaN or inf voxel"):
        load_source(source, NATIVE, None)


def test_label_values_not_declared(tmp_path):
    _, source = one_case(tmp_path)
    lab = np.asanyarray(nib.load(source.pairs[0].label).dataobj).copy()
    lab[0, 0, 0] = 7
    rewrite(source.pairs[0].label, lab)
    with pytest.raises(DataError, match=r"label value\(s\) \[7\] not declared"):
        load_source(source, NATIVE, None)


def test_site_with_no_labelled_voxel(tmp_path):
    _, source = one_case(tmp_path)
    lab = np.asanyarray(nib.load(source.pairs[0].label).dataobj)
    rewrite(source.pairs[0].label, np.zeros_like(lab))
    cases = load_source(source, NATIVE, None)
    with pytest.raises(DataError, match="no voxel of the spleen is labelled"):
        check_labelled(cases, source)
