"""Reading competitions: both layouts, decoding, the cache, bad input; the shared data sets."""

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from competition.config import REPO_ROOT, load_config
from competition.data import read_competition
from competition.errors import DataError
from competition.images import cached_images, decode
from tests.conftest import (
    CUB50,
    FOLDERS_SMALL_CLASSES,
    HYMENOPTERA,
    KAGGLE_SMALL_CLASSES,
    photo,
    placeholder_gif,
)


def test_kaggle_layout(kaggle_small):
    competition = read_competition(_config(kaggle_small))
    assert competition.classes == KAGGLE_SMALL_CLASSES
    assert len(competition.train) == 48 and len(competition.test) == 12
    assert competition.holdout is None
    assert list(competition.class_counts) == [8] * 6
    assert competition.train["id"].iloc[0] == "t0000"
    assert competition.train["path"].iloc[0] == (kaggle_small / "train" / "t0000.jpg").resolve()
    assert competition.train["target"].tolist() == [
        competition.classes.index(label) for label in competition.train["label"]
    ]


def test_kaggle_layout_without_test(kaggle_small):
    config = _config(
        kaggle_small, "competition.test_images=null", "competition.sample_submission=null"
    )
    competition = read_competition(config)
    assert len(competition.train) == 48 and competition.test is None
    assert competition.train["path"].iloc[0].parent == (kaggle_small / "train").resolve()


def test_folder_layout_with_holdout(folders_small):
    config = load_config(
        REPO_ROOT / "configs" / "hymenoptera.yaml", [f"competition.root={folders_small}"]
    )
    competition = read_competition(config)
    assert competition.classes == FOLDERS_SMALL_CLASSES
    assert len(competition.train) == 13 and len(competition.holdout) == 8
    assert "digit_0/imageNotFound.gif" in set(competition.train["id"])  # listed, not dropped
    assert competition.holdout["label"].value_counts().tolist() == [4, 4]


@pytest.mark.shared_data
def test_kaggle_layout_trashnet():
    competition = read_competition(load_config(REPO_ROOT / "configs" / "trashnet.yaml"))
    assert competition.classes == ["cardboard", "glass", "metal", "paper", "plastic", "trash"]
    assert len(competition.train) == 2021 and len(competition.test) == 506
    assert competition.holdout is None
    counts = dict(zip(competition.classes, competition.class_counts, strict=True))
    assert counts["paper"] > 3 * counts["trash"]  # the natural imbalance the README describes


@pytest.mark.shared_data
def test_kaggle_layout_without_test_cub50():
    competition = read_competition(load_config(REPO_ROOT / "configs" / "cub50.yaml"))
    assert len(competition.classes) == 50 and len(competition.train) == 2952
    assert competition.test is None
    assert competition.train["path"].iloc[0].parent == (CUB50 / "images").resolve()


@pytest.mark.shared_data
def test_folder_layout_hymenoptera_with_holdout():
    competition = read_competition(load_config(REPO_ROOT / "configs" / "hymenoptera.yaml"))
    assert competition.classes == ["ants", "bees"]
    assert len(competition.train) == 245 and len(competition.holdout) == 153
    assert "ants/imageNotFound.gif" in set(competition.train["id"])


@pytest.mark.shared_data
def test_hymenoptera_gif_placeholder_decodes_to_rgb():
    gif = decode(HYMENOPTERA / "train" / "ants" / "imageNotFound.gif", 40)
    assert gif.shape == (40, 40, 3) and gif.dtype == np.uint8


def test_gif_placeholder_decodes_its_first_frame_to_rgb(tmp_path):
    path = placeholder_gif(tmp_path / "imageNotFound.gif")
    with Image.open(path) as image:
        assert image.mode == "P" and image.n_frames == 2 and "transparency" in image.info
    gif = decode(path, 40)
    assert gif.shape == (40, 40, 3) and gif.dtype == np.uint8
    # the transparent background becomes white, the drawn text and frame stay darker
    assert gif.max() == 255 and gif.min() < 160


def test_odd_modes_decode_to_rgb(tmp_path):
    rgb = np.asarray(photo("chelsea"))
    modes = {
        "L": Image.fromarray(rgb[..., 0]),
        "P": Image.fromarray(rgb).convert("P"),
        "RGBA": Image.fromarray(rgb).convert("RGBA"),
        "I;16": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
    }
    for mode, image in modes.items():
        path = tmp_path / f"img_{mode.replace(';', '')}.png"
        image.save(path)
        out = decode(path, 32)
        assert out.shape == (32, 32, 3), mode
        # 16-bit is scaled to 8-bit, not clipped to white
        assert 20 < out.mean() < 235, mode


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways with an EXIF orientation tag decodes upright."""
    upright = photo("rocket", 64)  # landscape, 64x43
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "sideways.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)
    expected = np.asarray(upright.resize((32, 32), Image.BICUBIC)).astype(int)
    out = decode(path, 32, mode="squash").astype(int)
    ignored = np.asarray(Image.open(path).convert("RGB").resize((32, 32), Image.BICUBIC))
    assert np.abs(out - expected).mean() < 8  # upright again
    assert np.abs(ignored.astype(int) - expected).mean() > 3 * np.abs(out - expected).mean()


def test_cache_is_reused_and_invalidated_by_a_changed_file(tmp_path, photo_files):
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("chelsea", "coffee"):
        shutil.copy(photo_files[name], images / f"{name}.jpg")
    paths = sorted(images.iterdir())
    first = cached_images(paths, 24, tmp_path / "cache", workers=1)
    assert first.shape == (2, 24, 24, 3)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    cached_images(paths, 24, tmp_path / "cache", workers=1)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1  # reused
    shutil.copy(photo_files["astronaut"], paths[0])  # the file changes
    second = cached_images(paths, 24, tmp_path / "cache", workers=1)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    assert not np.array_equal(first[0], second[0])
    cached_images(paths, 28, tmp_path / "cache", workers=1)  # another size
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3


# -- bad input ----------------------------------------------------------------------


@pytest.fixture
def kaggle_copy(kaggle_small, tmp_path):
    root = tmp_path / "comp"
    shutil.copytree(kaggle_small, root)
    return root


def _config(root, *extra):
    return load_config(
        REPO_ROOT / "configs" / "trashnet.yaml", [f"competition.root={root}", *extra]
    )


def test_missing_image_names_row_and_path(kaggle_copy):
    (kaggle_copy / "train" / "t0000.jpg").unlink()
    with pytest.raises(DataError, match=r"row 2: .*t0000\.jpg"):
        read_competition(_config(kaggle_copy))


def test_unreadable_image_names_the_file(kaggle_copy, tmp_path):
    (kaggle_copy / "train" / "t0000.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"t0000\.jpg: cannot read image"):
        decode(kaggle_copy / "train" / "t0000.jpg", 32)


def test_missing_column_names_file_column_and_key(kaggle_copy):
    with pytest.raises(
        DataError, match=r"train\.csv: no column 'category' \(set by competition\.label_column\)"
    ):
        read_competition(_config(kaggle_copy, "competition.label_column=category"))


def test_duplicate_ids(kaggle_copy):
    train = pd.read_csv(kaggle_copy / "train.csv", dtype=str)
    pd.concat([train, train.head(1)]).to_csv(kaggle_copy / "train.csv", index=False)
    with pytest.raises(DataError, match=r"duplicate ids .*'t0000'"):
        read_competition(_config(kaggle_copy))


def test_labels_and_class_list_must_agree(kaggle_copy):
    five = ",".join(KAGGLE_SMALL_CLASSES[:5])
    with pytest.raises(DataError, match=r"\['digit_5'\].*not in competition\.classes"):
        read_competition(_config(kaggle_copy, f"competition.classes=[{five}]"))
    seven = ",".join([*KAGGLE_SMALL_CLASSES, "wood"])
    with pytest.raises(DataError, match=r"\['wood'\] .* never occur"):
        read_competition(_config(kaggle_copy, f"competition.classes=[{seven}]"))


def test_test_id_missing_from_sample_submission(kaggle_copy):
    sample = pd.read_csv(kaggle_copy / "sample_submission.csv", dtype=str)
    sample[["image_id"]].to_csv(kaggle_copy / "test.csv", index=False)
    sample.iloc[1:].to_csv(kaggle_copy / "sample_submission.csv", index=False)
    with pytest.raises(DataError, match=r"test id '.*' is missing from .*sample_submission\.csv"):
        read_competition(_config(kaggle_copy, "competition.test_csv=test.csv"))


def test_id_escaping_the_data_folder(kaggle_copy):
    train = pd.read_csv(kaggle_copy / "train.csv", dtype=str)
    train.loc[0, "image_id"] = "../../etc/passwd"
    train.to_csv(kaggle_copy / "train.csv", index=False)
    with pytest.raises(DataError, match=r"row 2: id '\.\./\.\./etc/passwd' resolves to .* outside"):
        read_competition(_config(kaggle_copy, "competition.image_pattern='{id}'"))


def test_missing_data_folder():
    with pytest.raises(DataError, match="data folder not found"):
        read_competition(_config("/nonexistent/data"))


def test_blank_label_names_the_row(kaggle_copy):
    train = pd.read_csv(kaggle_copy / "train.csv", dtype=str)
    train.loc[3, "label"] = ""
    train.to_csv(kaggle_copy / "train.csv", index=False)
    with pytest.raises(DataError, match=r"empty 'label' in row\(s\) 5"):
        read_competition(_config(kaggle_copy))


def test_duplicate_test_ids_in_test_csv(kaggle_copy):
    sample = pd.read_csv(kaggle_copy / "sample_submission.csv", dtype=str)
    pd.concat([sample, sample.head(1)])[["image_id"]].to_csv(kaggle_copy / "test.csv", index=False)
    with pytest.raises(DataError, match=r"test\.csv: duplicate ids"):
        read_competition(_config(kaggle_copy, "competition.test_csv=test.csv"))


def test_bad_image_pattern_is_a_config_error(kaggle_copy):
    from competition.errors import ConfigError

    with pytest.raises(ConfigError, match=r"image_pattern=.*\{id\}"):
        read_competition(_config(kaggle_copy, "competition.image_pattern='{image_id}.jpg'"))


def test_symlinked_images_are_accepted(kaggle_copy, tmp_path):
    """A folder of links (a common way to assemble data) is not an escape."""
    linked = tmp_path / "linked"
    shutil.copytree(kaggle_copy, linked, ignore=shutil.ignore_patterns("*.jpg"))
    for image in (kaggle_copy / "train").iterdir():
        (linked / "train" / image.name).symlink_to(image)
    for image in (kaggle_copy / "test").iterdir():
        (linked / "test" / image.name).symlink_to(image)
    assert len(read_competition(_config(linked)).train) == 48


def test_empty_test_folder_in_folder_layout(folders_small, tmp_path):
    root = tmp_path / "hym"
    shutil.copytree(folders_small / "val", root / "train")
    (root / "test").mkdir()
    config = load_config(
        REPO_ROOT / "configs" / "hymenoptera.yaml",
        [f"competition.root={root}", "competition.holdout_dir=null", "competition.test_dir=test"],
    )
    with pytest.raises(DataError, match="no images in the test folder"):
        read_competition(config)


def test_cache_pickles_as_its_path_not_its_pixels(kaggle_small, tmp_path):
    """Spawned DataLoader workers (macOS, Windows) get the file name, not a copy of the cache."""
    import pickle

    paths = sorted((kaggle_small / "train").glob("t000*.jpg"))
    images = cached_images(paths, 64, tmp_path / "cache", workers=1)
    payload = pickle.dumps(images)
    assert len(payload) < 1_000 < images.shape[0] * 64 * 64 * 3
    clone = pickle.loads(payload)
    assert np.array_equal(clone[3], images[3]) and len(clone) == len(images)
