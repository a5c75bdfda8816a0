"""choice_accuracy: multiple-choice accuracy on option letters.

Loaded by path (`evaluate.load("eval/metrics/choice_accuracy")`); self-contained because evaluate copies it
into its module cache. Letters are normalised before comparing: "(b)", "B.", " b) " all read as "B". An
empty prediction (no letter found in the generation) scores 0.
"""

from __future__ import annotations

import re

import datasets
import evaluate

_LETTER = re.compile(r"^\(?\s*([A-Za-z])\s*[\).:]?$")


def normalise_letter(text: str) -> str:
    match = _LETTER.match((text or "").strip())
    return match.group(1).upper() if match else ""


class ChoiceAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=(
                "predictions: list of str, the chosen option letters; references: list of str, the correct "
                "letters. Returns accuracy (mean) and scores (0/1 per item)."
            ),
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        scores = []
        for prediction, reference in zip(predictions, references):
            expected = normalise_letter(reference)
            if not expected:
                raise ValueError(f"references must be option letters, got {reference!r}")
            scores.append(int(normalise_letter(prediction) == expected))
        return {"accuracy": sum(scores) / len(scores) if scores else 0.0, "scores": scores}
