"""`evaluate` metrics for the examples, defined here because `evaluate.load("accuracy")` fetches its script from
the Hub, which these machines cannot reach. They are real `evaluate.Metric`s: `add_batch`, `compute`, and the
distributed gathering that `evaluate` does across processes all work as usual."""

import datasets
import evaluate
import numpy as np


class Accuracy(evaluate.Metric):
    """The fraction of predictions equal to their references (as `evaluate`'s own "accuracy")."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Accuracy: the fraction of predictions equal to the references.",
            citation="",
            inputs_description="predictions and references: lists of integer class ids of the same length.",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"{predictions.shape[0]} predictions for {references.shape[0]} references.")
        return {"accuracy": float((predictions == references).mean())}


__all__ = ["Accuracy"]
