from collections import Counter

import numpy as np
import pytest
from datasets import ClassLabel
from sklearn.datasets import load_digits

from castling_hf import data


def test_digits_is_the_real_bundled_set_with_a_fixed_stratified_split():
    splits = data.digits()
    assert (len(splits["train"]), len(splits["test"])) == (1437, 360)
    assert isinstance(splits["train"].features["label"], ClassLabel)
    assert splits["train"].features["label"].names == [str(d) for d in range(10)]
    assert set(Counter(splits["test"]["label"]).values()) <= {35, 36, 37}

    image = splits["train"][0]["image"]
    assert (image.mode, image.size) == ("L", (8, 8))

    again = data.digits()
    assert again["test"]["label"] == splits["test"]["label"]
    assert np.array_equal(np.asarray(again["test"][5]["image"]), np.asarray(splits["test"][5]["image"]))


def test_digit_images_are_the_scikit_learn_pixels_as_dark_ink_on_light_paper():
    splits = data.digits()
    ours = Counter(np.asarray(image).tobytes() for split in splits.values() for image in split["image"])
    ink = load_digits().images  # 0 (paper) .. 16 (ink)
    expected = Counter((255 - ink * (255 / 16)).round().astype(np.uint8)[i].tobytes() for i in range(len(ink)))
    assert ours == expected


def test_shapes_is_deterministic_and_varied():
    first, again = data.shapes(num_images=60, seed=3), data.shapes(num_images=60, seed=3)
    assert (len(first["train"]), len(first["test"])) == (48, 12)
    assert list(first["train"]["objects"]) == list(again["train"]["objects"])
    assert np.array_equal(np.asarray(first["train"][0]["image"]), np.asarray(again["train"][0]["image"]))
    assert first["train"].features["objects"]["category"].feature.names == list(data.SHAPE_CLASSES)

    objects = list(first["train"]["objects"]) + list(first["test"]["objects"])
    counts = [len(o["bbox"]) for o in objects]
    assert 0 in counts and max(counts) >= 2  # empty images and images with several objects
    categories = {c for o in objects for c in o["category"]}
    assert categories == {0, 1, 2}
    sides = [w for o in objects for _, _, w, _ in o["bbox"]]
    assert max(sides) >= 2 * min(sides)  # varied sizes
    for o in objects:
        for (x, y, w, h), area in zip(o["bbox"], o["area"], strict=True):
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and area == pytest.approx(w * h)
    other = data.shapes(num_images=8, image_size=96, seed=4)
    assert other["train"][0]["image"].size == (96, 96)


def test_shapes_are_drawn_where_their_boxes_say():
    sample = data.shapes(num_images=20, seed=5)["train"]
    for record in sample:
        pixels = np.asarray(record["image"]).astype(float)
        background = np.median(pixels.reshape(-1, 3), axis=0)
        for x, y, w, h in record["objects"]["bbox"]:
            centre = pixels[int(y + h * 0.6), int(x + w / 2)]  # inside circles, squares and triangles alike
            assert np.abs(centre - background).sum() > 60


def test_clean_coco_boxes_clips_drops_and_refuses():
    boxes, categories = data.clean_coco_boxes(
        [[-5, 10, 20, 20], [50, 50, 30, 30], [10, 10, 0, 5], [70, 5, 10, 10], [5, 5, 10, 10]],
        [0, 1, 2, 1, 2],
        width=64,
        height=64,
        num_labels=3,
    )
    assert boxes == [[0.0, 10.0, 15.0, 20.0], [50.0, 50.0, 14.0, 14.0], [5.0, 5.0, 10.0, 10.0]]
    assert categories == [0, 1, 2]  # the zero-width box and the box wholly outside are gone
    assert data.clean_coco_boxes([], [], 64, 64, 3) == ([], [])
    with pytest.raises(ValueError, match=r"Category id 7 is not one of the model's 3 classes"):
        data.clean_coco_boxes([[1, 1, 5, 5]], [7], 64, 64, 3)


def test_focus_digits_hides_each_bundled_digit_on_a_larger_canvas():
    focus, source = data.focus_digits(seed=0, train_copies=2), data.digits()
    assert (len(focus["train"]), len(focus["test"])) == (2 * 1437, 360)
    assert focus["train"]["label"][:1437] == focus["train"]["label"][1437:2874] == source["train"]["label"]
    assert focus["test"]["label"] == source["test"]["label"]  # split for split: no test digit is seen in training
    image = focus["train"][0]["image"]
    assert (image.mode, image.size) == ("L", (64, 64))
    again = data.focus_digits(seed=0, train_copies=2)
    assert np.array_equal(np.asarray(again["train"][7]["image"]), np.asarray(focus["train"][7]["image"]))
    other = data.focus_digits(seed=1, train_copies=2)
    assert not np.array_equal(np.asarray(other["train"][7]["image"]), np.asarray(focus["train"][7]["image"]))

    # The digit is somewhere: the 24×24 window with the most ink holds far more than a fragment's worth.
    ink = 1.0 - np.asarray(image, dtype=float) / 255
    windows = np.lib.stride_tricks.sliding_window_view(ink, (24, 24)).sum(axis=(-1, -2))
    assert windows.max() > 1.5 * np.median(windows)


def test_focus_canvases_place_the_whole_digit_and_the_fragments_inside_the_canvas():
    ink = np.zeros((2, 8, 8), dtype=np.float32)
    ink[0] = 1.0  # a solid square: where it lands is plain to see
    images, indices = data.focus_canvases(
        ink, 50, np.random.default_rng(0), canvas_size=20, num_fragments=3, noise=0.0, digit_indices=np.zeros(50, int)
    )
    assert images.shape == (50, 20, 20) and images.dtype == np.uint8 and list(indices) == [0] * 50
    inked = images < 128
    for canvas in inked:
        windows = np.lib.stride_tricks.sliding_window_view(canvas, (8, 8)).all(axis=(-1, -2))
        assert windows.any()  # the whole 8×8 digit is there
    # Fragments are 2..4 pixels a side, cut from one of the two digits: besides the digit at most 3 × 16 pixels.
    assert (inked.sum(axis=(1, 2)) <= 64 + 3 * 16).all() and (inked.sum(axis=(1, 2)) > 64).any()


def test_shape_masks_label_every_shape_pixel_with_its_class_in_the_scene_parse_layout():
    masks = data.shape_masks(num_images=10, image_size=48, seed=3)
    assert (len(masks["train"]), len(masks["test"])) == (8, 2)
    assert set(masks["train"].features) == {"image", "annotation"}
    record = masks["train"][0]
    annotation = np.asarray(record["annotation"])
    assert record["image"].size == record["annotation"].size == (48, 48) and record["annotation"].mode == "L"
    assert set(np.unique(annotation)) <= set(range(len(data.SEGMENTATION_CLASSES)))
    assert (annotation > 0).any() and (annotation == 0).any()  # shapes on a background
    # The label map follows the image: a shape's pixels differ from the background's colour, the background's don't.
    pixels = np.asarray(record["image"], dtype=float)
    background = np.median(pixels[annotation == 0], axis=0)
    assert (
        np.abs(pixels[annotation > 0] - background).sum(-1).mean()
        > 3 * np.abs(pixels[annotation == 0] - background).sum(-1).mean()
    )
