"""archives.py: finding each dataset under --data-root and listing its pairs, as downloads
really arrive (links, macOS clutter, other capitalisation, nested folders, uncompressed
NIfTI). Listing reads no voxel, so empty files stand in for the volumes."""

import json
import os

import pytest

import layouts
from data import DataError
from realdata.archives import find_dataset, find_sources, locate
from realdata.preprocess import load_source


def touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()
    return str(path)


def msd_folders(base, n=2, ext=".nii.gz"):
    for i in range(n):
        touch(base / "imagesTr" / f"spleen_{i}{ext}")
        touch(base / "labelsTr" / f"spleen_{i}{ext}")
    return base


def kits_case(base, i=0, ext=".nii.gz"):
    touch(base / "data" / f"case_{i:05d}" / f"imaging{ext}")
    touch(base / "data" / f"case_{i:05d}" / f"segmentation{ext}")
    return base


def test_a_root_of_symlinked_downloads_is_found(tmp_path):
    store = msd_folders(tmp_path / "disk2" / "Task09_Spleen")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(store, root / "Task09_Spleen")
    source = find_sources(["spleen"], str(root))["spleen"]
    assert len(source.pairs) == 2 and source.root == str(root / "Task09_Spleen")


def test_macos_copies_do_not_hide_the_dataset(tmp_path):
    # __MACOSX sorts before kits19 and holds "._" files under the same folder names
    junk = tmp_path / "__MACOSX" / "kits19" / "data" / "case_00000"
    touch(junk / "._imaging.nii.gz")
    kits_case(tmp_path / "kits19")
    assert locate(str(tmp_path), "kidneys") == str(tmp_path / "kits19")
    assert len(find_sources(["kidneys"], str(tmp_path))["kidneys"].pairs) == 1


def test_names_match_in_any_case_and_a_same_named_folder_is_looked_into(tmp_path):
    kits_case(tmp_path / "KiTS19")
    # unpacked into a folder of its own name
    msd_folders(tmp_path / "Task03_Liver" / "Task03_Liver")
    assert locate(str(tmp_path), "kidneys") == str(tmp_path / "KiTS19")
    assert locate(str(tmp_path), "liver") == str(tmp_path / "Task03_Liver" / "Task03_Liver")
    # a named folder with nothing inside is still the answer, so that its error names it
    (tmp_path / "Task07_Pancreas").mkdir()
    assert locate(str(tmp_path), "pancreas") == str(tmp_path / "Task07_Pancreas")


def test_uncompressed_nifti_in_every_layout(tmp_path):
    kits = find_dataset(str(kits_case(tmp_path / "kits19", ext=".nii")), "kidneys")
    assert [os.path.basename(p.label) for p in kits.pairs] == ["segmentation.nii"]
    folders = find_dataset(str(msd_folders(tmp_path / "spleen", ext=".nii")), "spleen")
    assert len(folders.pairs) == 2 and not folders.problems
    # nnU-Net v1 lists x.nii.gz for the file x_0000 (here uncompressed)
    base = tmp_path / "Task040_KiTS"
    image, label = (
        touch(base / "imagesTr" / "kits_0_0000.nii"),
        touch(base / "labelsTr" / "kits_0.nii.gz"),
    )
    (base / "dataset.json").write_text(json.dumps(
        {"labels": {"0": "background", "1": "kidney", "2": "tumour"},
         "training": [{"image": "./imagesTr/kits_0.nii.gz", "label": "./labelsTr/kits_0.nii.gz"}]}))
    source = find_dataset(str(base), "kidneys")
    assert (source.pairs[0].image, source.pairs[0].label, source.problems) == (image, label, [])


def test_a_listed_or_paired_file_is_found_under_either_extension(tmp_path):
    base = tmp_path / "Task09_Spleen"
    image, label = (
        touch(base / "imagesTr" / "spleen_0.nii"),
        touch(base / "labelsTr" / "spleen_0.nii.gz"),
    )
    (base / "dataset.json").write_text(
        json.dumps(
            {
                "labels": {"0": "background", "1": "spleen"},
                "training": [
                    {"image": "./imagesTr/spleen_0.nii.gz", "label": "./labelsTr/spleen_0.nii"}
                ],
            }
        )
    )
    source = find_dataset(str(base), "spleen")
    assert (source.pairs[0].image, source.pairs[0].label, source.problems) == (image, label, [])
    # BTCV: an image and its label stored one compressed, one not
    btcv = tmp_path / "Abdomen" / "RawData" / "Training"
    image, label = touch(btcv / "img" / "img0001.nii.gz"), touch(btcv / "label" / "label0001.nii")
    source = find_dataset(str(tmp_path / "Abdomen"), "test")
    assert (source.pairs[0].image, source.pairs[0].label, source.problems) == (image, label, [])


def test_a_dataset_json_with_an_empty_training_list_reads_the_folders(tmp_path):
    base = msd_folders(tmp_path / "Task09_Spleen")
    (base / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "spleen"}, "training": []})
    )
    source = find_dataset(str(base), "spleen")
    assert len(source.pairs) == 2 and source.declared == (0, 1)


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        find_dataset(str(tmp_path / "empty"), "liver")
    with pytest.raises(DataError, match="no such folder"):
        find_dataset(str(tmp_path / "nowhere"), "liver")


def test_dataset_json_naming_missing_files(tmp_path):
    base, _ = one_spleen(tmp_path)
    os.remove(base / "labelsTr" / "spleen_0.nii.gz")
    source = find_dataset(str(base), "spleen")
    with pytest.raises(
        DataError, match=r"dataset\.json names .*spleen_0\.nii\.gz, which does not exist"
    ):
        load_source(source, (3.0, 3.0, 3.0), None)


def test_data_root_with_none_of_the_datasets(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(
        DataError, match=r"none of the expected datasets found .*Task03_Liver.*kits19"
    ):
        find_sources(("liver", "spleen", "pancreas", "kidneys", "test"), str(tmp_path))


def test_data_root_missing_one_dataset_says_which(tmp_path):
    layouts.msd_liver(tmp_path)
    with pytest.raises(DataError, match=r"no dataset for spleen .*Task09_Spleen"):
        find_sources(("liver", "spleen", "test"), str(tmp_path), {"test": "x"})




def one_spleen(tmp_path):
    base = layouts.msd_spleen(tmp_path / "data")
    return base, find_dataset(str(base), "spleen")
