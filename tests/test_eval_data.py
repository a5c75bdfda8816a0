"""`python -m eval.prepare_data` for real (from the installed PyPI packages) and loading tasks from its files."""

import json

import pytest


from eval import prepare_data
from eval.tasks import TASKS, get_task, load_items, resolve_task_names

EXPECTED_COUNTS = {"asdiv": 2168, "gsm_symbolic": 200, "mmlu": 2850, "humaneval": 164}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_data")
    assert prepare_data.main(["--out", str(out)]) == 0
    return out


def test_prepare_writes_one_file_per_task_with_the_prepared_schema(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert set(manifest["tasks"]) == set(TASKS)
    assert (prepared / ".gitignore").read_text().splitlines()[-1] == "*"  # the data folder ignores itself
    for name, count in EXPECTED_COUNTS.items():
        entry = manifest["tasks"][name]
        lines = (prepared / f"{name}.jsonl").read_text().splitlines()
        assert entry["records"] == count == len(lines)
        assert entry["license"]  # every source carries its license note
        records = [json.loads(line) for line in lines]
        assert len({record["id"] for record in records}) == count  # ids are unique
        for field in get_task(name).fields:
            assert all(record[field] not in (None, "", []) for record in records), (name, field)
    asdiv = json.loads((prepared / "asdiv.jsonl").read_text().splitlines()[0])
    assert asdiv == {"id": "asdiv/0", "question": "Seven red apples and two green apples are in the basket. "
                     "How many apples are in the basket?", "answer": "9", "answer_text": "9 apples"}
    mmlu = [json.loads(line) for line in (prepared / "mmlu.jsonl").read_text().splitlines()]
    assert all(len(record["choices"]) == 4 and record["answer"] in "ABCD" for record in mmlu)
    gsm = [json.loads(line) for line in (prepared / "gsm_symbolic.jsonl").read_text().splitlines()]
    assert all(float(record["answer"]) == float(record["answer"]) for record in gsm)
    assert not any("Give the result as your final answer" in record["question"] for record in gsm)


def test_prepare_is_idempotent(prepared, capsys):
    before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in prepared.iterdir()}
    assert prepare_data.main(["--out", str(prepared)]) == 0
    assert capsys.readouterr().out.count("unchanged") == len(TASKS)
    after = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in prepared.iterdir()}
    assert after == before  # same bytes, files not even rewritten


def test_tasks_load_prepared_files_with_datasets(prepared):
    humaneval = load_items("humaneval", prepared, limit=3)
    assert [item["id"] for item in humaneval] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert {"prompt", "test", "entry_point", "canonical_solution"} <= set(humaneval[0])
    assert len(load_items("gsm_symbolic", prepared)) == 200
    messages = get_task("mmlu").messages(load_items("mmlu", prepared, limit=1)[0])
    assert messages[0]["role"] == "user" and "\nD. " in messages[0]["content"]


def test_unknown_task_lists_the_known_ones():
    assert resolve_task_names("math,mmlu,humaneval") == ["asdiv", "gsm_symbolic", "mmlu", "humaneval"]
    with pytest.raises(ValueError, match="unknown task 'gsm8k'.*asdiv, gsm_symbolic, humaneval, mmlu"):
        resolve_task_names("math,gsm8k")
    with pytest.raises(ValueError, match="no task named"):
        resolve_task_names(" , ")
    with pytest.raises(TypeError, match="tasks"):
        resolve_task_names(3)


def test_missing_data_file_names_it_and_the_prepare_command(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_items("mmlu", tmp_path)
    assert str(tmp_path / "mmlu.jsonl") in str(error.value)
    assert f"python -m eval.prepare_data --out {tmp_path}" in str(error.value)


def test_bad_limit_and_wrong_schema_are_refused(tmp_path):
    (tmp_path / "mmlu.jsonl").write_text(json.dumps({"id": "q1", "question": "?", "answer": "A"}) + "\n")
    with pytest.raises(ValueError, match="limit"):
        load_items("mmlu", tmp_path, limit=0)
    with pytest.raises(ValueError, match=r"lack the field\(s\) \['choices'\]"):
        load_items("mmlu", tmp_path)
    with pytest.raises(ValueError, match="gsm_size"):
        prepare_data.prepare(tmp_path, gsm_size=0)
