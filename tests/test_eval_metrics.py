"""The evaluation metrics (local evaluate scripts) and the answer extraction score known answers right."""


import pytest


from eval.prepare_data import humaneval_records
from eval.scoring import load_metric, score_predictions
from eval.tasks import (
    extract_choice_letter,
    extract_final_number,
    extract_program,
    get_task,
    humaneval_test_program,
)


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("$1,000.00", "1000", 1),
        ("1000", "$1,000.00", 1),
        ("1,000", "1000", 1),
        ("7.0", "7", 1),
        ("\u22123", "-3", 1),  # Unicode minus
        ("50%", "50", 1),
        ("8.333333333", "25/3", 1),
        ("25/3", "25/3", 1),
        (" 42. ", "42", 1),
        ("8.33", "25/3", 0),
        ("12", "13", 0),
        ("1001", "1000", 0),
        ("", "0", 0),
        ("-3", "3", 0),
    ],
)
def test_exact_match_numeric_normalisation(prediction, reference, expected):
    result = load_metric("exact_match_numeric").compute(predictions=[prediction], references=[reference])
    assert result["scores"] == [expected]
    assert result["exact_match"] == expected


def test_exact_match_numeric_averages_and_rejects_bad_tolerance():
    metric = load_metric("exact_match_numeric")
    result = metric.compute(predictions=["$1,000.00", "3", "x"], references=["1000", "4", "X."])
    assert result["scores"] == [1, 0, 1]  # non-numbers compare as normalised text
    assert result["exact_match"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="rel_tol"):
        metric.compute(predictions=["1"], references=["1"], rel_tol=-1.0)


def test_choice_accuracy_normalises_letters():
    metric = load_metric("choice_accuracy")
    result = metric.compute(predictions=["(b)", "C.", "a", "", "D"], references=["B", "C", "A", "A", "B"])
    assert result["scores"] == [1, 1, 1, 0, 0]
    assert result["accuracy"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="option letters"):
        metric.compute(predictions=["A"], references=["not a letter"])


def test_humaneval_canonical_solutions_pass_and_corrupted_ones_fail():
    task = get_task("humaneval")
    problems = humaneval_records()
    assert len(problems) == 164
    canonical = [extract_program(problem["canonical_solution"], problem) for problem in problems]
    # Corruptions that must fail: a body returning None, and the canonical body with its returns negated.
    corrupted = [problem["prompt"] + "    return None\n" for problem in problems[:20]]
    corrupted += [
        problem["prompt"] + problem["canonical_solution"].replace("return ", "return not ")
        for problem in problems[20:40]
        if "return " in problem["canonical_solution"]
    ]
    references = [humaneval_test_program(problem) for problem in problems]
    references += [humaneval_test_program(problem) for problem in problems[:20]]
    references += [humaneval_test_program(p) for p in problems[20:40] if "return " in p["canonical_solution"]]
    result = score_predictions(task, canonical + corrupted, references, allow_code_execution=True)
    assert result["details"][: len(canonical)] == ["passed"] * len(canonical)
    assert result["scores"][len(canonical):] == [0] * len(corrupted)
    assert all(detail.startswith("failed") for detail in result["details"][len(canonical):])


def test_code_execution_needs_explicit_opt_in():
    task = get_task("humaneval")
    with pytest.raises(ValueError, match="allow_code_execution=True"):
        score_predictions(task, ["x = 1"], ["assert x == 1"])
    with pytest.raises(ValueError, match="executes model-generated Python"):
        load_metric("code_pass_at_1").compute(predictions=["x = 1"], references=["assert x == 1"])


def test_code_execution_is_isolated_and_bounded(tmp_path):
    programs = [
        "x = 1",
        "while True:\n    pass",
        "import socket\nsocket.create_connection(('127.0.0.1', 9))",
        "import os\nassert os.getcwd() != TARGET",
    ]
    tests = ["assert x == 1", "", "", ""]
    programs[3] = programs[3].replace("TARGET", repr(str(tmp_path)))
    result = load_metric("code_pass_at_1").compute(
        predictions=programs, references=tests, allow_code_execution=True, timeout=1.5
    )
    assert result["results"][0] == "passed"
    assert result["results"][1] == "timed out"
    assert result["results"][2].startswith("failed: PermissionError: network access is disabled")
    assert result["results"][3] == "passed"  # ran in its own temporary folder
    assert result["pass@1"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Step 1: 3 + 4 = 7.\nAnswer: $1,000.00", "$1,000.00"),
        ("so the answer is 42.", "42"),
        ("The answer is: -5", "-5"),
        ("#### 18", "18"),
        ("we get \\boxed{12} in the end, not 13", "12"),
        ("first 3, then 5, finally 9", "9"),
        ("no digits here", ""),
    ],
)
def test_final_number_extraction(text, expected):
    assert extract_final_number(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Answer: B", "B"),
        ("The answer is (C).", "C"),
        ("**Answer:** D", "D"),
        ("A", "A"),
        ("C. Because the bonds...", "C"),
        ("(A) is wrong; the answer is option D", "D"),
        ("A dog is not an option", ""),  # the article is not option A
        ("I cannot tell", ""),
    ],
)
def test_choice_letter_extraction(text, expected):
    assert extract_choice_letter(text) == expected


def test_program_extraction_from_chat_reply_and_from_plain_completion():
    item = {
        "prompt": 'import math\n\n\ndef hyp(a, b):\n    """Hypotenuse."""\n',
        "entry_point": "hyp",
        "test": "def check(candidate):\n    assert candidate(3, 4) == 5\n",
    }
    chat_reply = "Here it is:\n```python\ndef hyp(a, b):\n    return math.sqrt(a * a + b * b)\n```\nDone."
    continuation = "    return math.hypot(a, b)\n\n\nprint('trailing top-level code is cut')\n"
    wrong = "    return a + b\n"
    programs = [extract_program(text, item) for text in (chat_reply, continuation, wrong)]
    assert "print(" not in programs[1]
    result = score_predictions(get_task("humaneval"), programs, [humaneval_test_program(item)] * 3,
                               allow_code_execution=True)
    assert result["scores"] == [1, 1, 0]
