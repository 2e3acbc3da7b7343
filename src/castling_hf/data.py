"""Data sets the package ships or makes, so that examples, tests and demos run offline (DESIGN §5)."""

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image


def digits(test_size: float = 0.2, seed: int = 0) -> DatasetDict:
    """scikit-learn's bundled *digits*: 1,797 real 8×8 handwritten digits, 10 classes.

    Returns a `DatasetDict` with `train` and `test` splits (stratified by label, fixed by `seed`), with columns
    `image` (a grayscale PIL image, 8×8) and `label` (`ClassLabel` with names "0" … "9").
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # The bundled values are ink counts 0..16 on a white background; images are dark digits on light paper.
    pixels = (255 - bunch.images * (255 / 16)).round().astype(np.uint8)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    dataset = Dataset.from_dict({"image": list(pixels), "label": bunch.target.tolist()}, features=features)
    return dataset.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")


__all__ = ["digits"]
