"""Scores generations with the local `evaluate` metric scripts in eval/metrics/.

evaluate cannot download its hub metrics offline, so each metric is a script loaded by path
(`evaluate.load("eval/metrics/<name>")`), kept in memory (no cache files).
"""

from __future__ import annotations

import functools
from pathlib import Path

from .tasks import Task

METRICS_DIR = Path(__file__).resolve().parent / "metrics"


@functools.lru_cache(maxsize=None)
def load_metric(name: str):
    import evaluate

    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        known = sorted(entry.name for entry in METRICS_DIR.iterdir() if (entry / f"{entry.name}.py").is_file())
        raise ValueError(f"metric: no metric script {path / (name + '.py')}; known metrics: {known}")
    return evaluate.load(str(path), keep_in_memory=True)


def score_predictions(task: Task, predictions: list[str], references: list[str],
                      allow_code_execution: bool = False, code_timeout: float = 10.0) -> dict:
    """{"score": aggregate, "scores": [0/1 per item], "details": [per-item note or None]}."""
    if len(predictions) != len(references):
        raise ValueError(f"predictions ({len(predictions)}) and references ({len(references)}) differ in length")
    if not predictions:
        return {"score": None, "scores": [], "details": []}
    kwargs = {}
    if task.metric == "code_pass_at_1":
        kwargs = {"allow_code_execution": allow_code_execution, "timeout": code_timeout}
    result = load_metric(task.metric).compute(predictions=predictions, references=references, **kwargs)
    details = result.get("results", [None] * len(predictions))
    return {"score": float(result[task.score_key]), "scores": list(result["scores"]), "details": list(details)}
