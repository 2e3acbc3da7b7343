from collections import Counter

import numpy as np
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
