"""exact_match_numeric: a prediction scores 1 when it names the same number as the reference.

Loaded by path (`evaluate.load("eval/metrics/exact_match_numeric")`): evaluate cannot download its hub metrics
offline. Self-contained on purpose: evaluate copies this file into its module cache and imports it there.
Both sides are normalised before comparing: currency signs, thousands separators, spaces, a trailing period
and a percent sign are dropped, and the rest is read as an exact fraction, so "$1,000.00", "1000" and "1e3"
are equal, and "25/3" equals "8.333333333" within `rel_tol`. Text that is not a number is compared as
lower-cased, whitespace-collapsed text.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

import datasets
import evaluate

_CURRENCY = "$£€¥₹"
# After cleaning: a signed decimal (optionally with exponent) or a fraction of integers.
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?|[-+]?\d+/\d+")


def to_number(text: str) -> Fraction | None:
    """The number that `text` spells (Fraction), or None when it is not a single number."""
    cleaned = text.strip().replace("\u2212", "-")  # Unicode minus, common in generated math
    cleaned = cleaned.rstrip(".").strip()
    for sign in _CURRENCY:
        cleaned = cleaned.replace(sign, "")
    cleaned = cleaned.replace(",", "").replace(" ", "").removesuffix("%")
    if not _NUMBER.fullmatch(cleaned):
        return None
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def _normalise_text(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


def numbers_match(prediction: str, reference: str, rel_tol: float = 1e-6) -> bool:
    predicted, expected = to_number(prediction), to_number(reference)
    if predicted is None or expected is None:
        return bool(_normalise_text(reference)) and _normalise_text(prediction) == _normalise_text(reference)
    if predicted == expected:
        return True
    # A tolerance only for non-terminating references ("25/3" vs "8.333333"), never for integers.
    return math.isclose(float(predicted), float(expected), rel_tol=rel_tol, abs_tol=0.0)


class ExactMatchNumeric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=(
                "predictions: list of str, the extracted final answers; references: list of str, the reference "
                "answers; rel_tol: float, relative tolerance for non-integer values (default 1e-6). Returns "
                "exact_match (mean) and scores (0/1 per item)."
            ),
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, rel_tol: float = 1e-6):
        if not isinstance(rel_tol, (int, float)) or not 0 <= rel_tol < 1:
            raise ValueError(f"rel_tol must be a float in [0, 1), got {rel_tol!r}")
        scores = [int(numbers_match(p or "", r or "", rel_tol)) for p, r in zip(predictions, references)]
        return {"exact_match": sum(scores) / len(scores) if scores else 0.0, "scores": scores}
