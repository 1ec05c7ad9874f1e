"""Per-sample CPU transforms (plugins/augment_cpu.py) on real photographs."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from competition.conformance.augment import check_sample_transform, photos
from competition.errors import ConfigError
from competition.manager import components
from plugins import augment_cpu

#: A representative set: the defaults of the config, the usual training recipe, and our own.
REPRESENTATIVE = [
    ("RandomResizedCrop", {"scale": [0.35, 1.0]}),
    ("HorizontalFlip", {}),
    ("VerticalFlip", {}),
    ("ColorJitter", {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}),
    ("CoarseDropout", {"num_holes_range": [1, 4], "hole_height_range": [0.1, 0.3], "p": 1.0}),
    ("Affine", {"rotate": [-15, 15], "scale": [0.9, 1.1], "p": 1.0}),
    ("Rotate", {"limit": [-20, 20], "p": 1.0}),
    ("RandomBrightnessContrast", {"p": 1.0}),
    ("HueSaturationValue", {"p": 1.0}),
    ("GaussianBlur", {"p": 1.0}),
    ("GaussNoise", {"p": 1.0}),
    ("ToGray", {"p": 1.0}),
    ("RandomCrop", {}),
    ("Resize", {}),
    ("SmallestMaxSize", {}),
    ("RandomRotate90", {"p": 1.0}),
    ("Perspective", {"p": 1.0}),
]
OURS = [name for name in augment_cpu.BUILTINS]


def sample_transforms():
    return components("sample_transforms")


@pytest.mark.parametrize(("name", "params"), REPRESENTATIVE, ids=[n for n, _ in REPRESENTATIVE])
def test_conformance_representative(name, params):
    check_sample_transform(sample_transforms()[name], image_size=32, params=params)


@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize("params", [{}, {"crop_pct": 0.875}])
def test_conformance_ours(name, params):
    outputs = check_sample_transform(sample_transforms()[name], image_size=32, params=params)
    assert all(out.shape == (32, 32, 3) for out in outputs)


def test_registry_lists_albumentations_by_class_name():
    registry = sample_transforms()
    for name in ("RandomResizedCrop", "HorizontalFlip", "ColorJitter", "CoarseDropout", "Affine"):
        assert name in registry
    for name in ("Normalize", "ToTensorV2", "BBoxSafeRandomCrop", "CenterCrop3D", "Lambda"):
        assert name not in registry
    assert registry.provider("CenterCrop") == "plugins.augment_cpu"
    assert registry["CenterCrop"] is augment_cpu.BUILTINS["CenterCrop"]
    assert len(registry) > 90


@pytest.mark.filterwarnings(
    "ignore::UserWarning"
)  # albumentations' advice on slow or alias classes
def test_every_registered_transform_runs_with_defaults():
    """Each name either runs on a real photo (HWC uint8 out) or asks for its required parameter."""
    image = photos(48, 1)[0]
    needs_params = {}
    for name in augment_cpu._REGISTRY:
        if name == "Crop":  # its default box (0, 0, 1024, 1024) is a placeholder to fill in
            continue
        try:
            transform = augment_cpu._REGISTRY[name](32)
        except ConfigError as exc:
            needs_params[name] = str(exc)
            continue
        transform.set_seed(0)
        out = transform(image)
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3, name
    # the only ones that cannot run without parameters say which parameter is missing
    assert set(needs_params) <= {"CropAndPad", "GridElasticDeform", "RandomSizedCrop"}
    assert "missing required parameter 'min_max_height'" in needs_params["RandomSizedCrop"]


def test_size_is_injected_and_lists_become_tuples():
    crop = augment_cpu.build_albumentations("RandomResizedCrop", 24, scale=[0.5, 1.0])
    assert crop.transform.scale == (0.5, 1.0)
    assert crop.transform.size == (24, 24)
    assert crop(photos(40, 1)[0]).shape == (24, 24, 3)
    resize = augment_cpu.build_albumentations("Resize", 24)
    assert resize(photos(40, 1)[0]).shape == (24, 24, 3)
    # a size the user gives wins
    assert augment_cpu.build_albumentations("Resize", 24, height=20)(photos(40, 1)[0]).shape == (
        20,
        24,
        3,
    )


def test_unknown_parameter_names_transform_parameter_and_valid_ones():
    with pytest.raises(ConfigError) as info:
        sample_transforms()["HorizontalFlip"](32, prob=0.5)
    message = str(info.value)
    assert (
        "'HorizontalFlip'" in message and "'prob'" in message and "Valid parameters: p" in message
    )


def test_bad_value_names_transform_and_parameter():
    with pytest.raises(ConfigError) as info:
        sample_transforms()["RandomResizedCrop"](32, p=2.0)
    message = str(info.value)
    assert "'RandomResizedCrop'" in message and "bad parameter 'p'" in message
    assert "Valid parameters: size, scale" in message


def test_seed_makes_training_pipeline_reproducible_and_seeds_differ():
    transform = sample_transforms()["RandomResizedCrop"](32, scale=[0.2, 1.0])
    image = photos(64, 1)[0]

    def draw(seed):
        transform.set_seed(seed)
        return np.stack([transform(image) for _ in range(4)])

    assert np.array_equal(draw(1), draw(1))
    assert not np.array_equal(draw(1), draw(2))


def test_transform_pickles_for_dataloader_workers():
    transform = sample_transforms()["RandomResizedCrop"](32)
    clone = pickle.loads(pickle.dumps(transform))
    image = photos(40, 1)[0]
    transform.set_seed(3)
    clone.set_seed(3)
    assert np.array_equal(transform(image), clone(image))


def test_center_crop_takes_the_centre_of_the_cache():
    cache = photos(37, 1)[0]  # round(32 / 0.875) = 37
    out = sample_transforms()["CenterCrop"](32)(cache)
    assert np.array_equal(out, cache[2:34, 2:34])


def test_center_crop_resizes_to_image_size_whatever_the_cache_side():
    cache = photos(64, 1)[0]
    center = sample_transforms()["CenterCrop"]
    assert np.array_equal(center(32)(cache), cache[16:48, 16:48])
    # crop_pct: the central half (32 px) resized to 48 (FixRes: evaluate larger than trained)
    fixres = center(48, crop_pct=0.5)(cache)
    assert fixres.shape == (48, 48, 3)
    # a cache smaller than image_size is enlarged whole
    assert center(80)(cache).shape == (80, 80, 3)
    # crop_pct crops the same fraction of any side: the content matches a smaller cache's crop
    small = photos(32, 1)[0]
    a = center(16, crop_pct=0.5)(cache).astype(int)
    b = center(16, crop_pct=0.5)(small).astype(int)
    assert np.abs(a - b).mean() < 6


def test_center_crop_is_deterministic_and_rejects_bad_params():
    center = sample_transforms()["CenterCrop"]
    cache = photos(50, 1)[0]
    assert np.array_equal(center(40)(cache), center(40)(cache))
    with pytest.raises(ConfigError, match="crop_pct"):
        center(32, crop_pct=1.5)
    with pytest.raises(ConfigError, match="Valid parameters: crop_pct, interpolation"):
        center(32, size=32)


def test_transform_rejects_wrong_input_clearly():
    with pytest.raises(TypeError, match="HWC uint8"):
        sample_transforms()["HorizontalFlip"](32)(photos(32, 1)[0].astype(np.float32))


def test_conformance_catches_broken_transforms():
    class Unseeded:
        def set_seed(self, seed):
            pass

        def __call__(self, image):
            return image ^ np.random.randint(0, 2, image.shape, dtype=np.uint8)  # global RNG

    def in_place(image):
        image[:] = 0
        return image

    with pytest.raises(AssertionError, match="in place"):
        check_sample_transform(lambda size: in_place)
    with pytest.raises(AssertionError, match="uint8"):
        check_sample_transform(lambda size: lambda image: image.astype(np.float32))
    with pytest.raises(AssertionError, match="became"):
        check_sample_transform(lambda size: lambda image: np.ascontiguousarray(image[1:, 1:]))
    with pytest.raises(AssertionError, match="reproducible"):
        check_sample_transform(lambda size: Unseeded())
