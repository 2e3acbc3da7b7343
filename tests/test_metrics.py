import pytest

from castling_hf.metrics import Accuracy


def test_accuracy_matches_counting():
    assert Accuracy().compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == {"accuracy": 0.75}


def test_accuracy_accumulates_batches():
    metric = Accuracy()
    metric.add_batch(predictions=[0, 1], references=[0, 0])
    metric.add_batch(predictions=[3], references=[3])
    assert metric.compute()["accuracy"] == pytest.approx(2 / 3)


def test_accuracy_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        Accuracy().compute(predictions=[0, 1], references=[0])
