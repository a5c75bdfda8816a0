"""`python -m eval.quality` end to end, offline, on tiny random models and tiny data files written here."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

from conftest import REPO
from dgemma_hf.tiny import make_tiny_checkpoint
from eval.quality import build_parser, main, parse_sweep, run_quality
from eval.tasks import load_items
from eval.tiny import make_tiny_ar_checkpoint

# On 2-core CI machines torch's default thread count oversubscribes.
torch.set_num_threads(1)

TASKS = ["asdiv", "gsm_symbolic", "mmlu", "humaneval"]
RUN_IDS = ["ar", "dgemma steps=2 entropy_bound=0.5", "dgemma steps=4 entropy_bound=0.5"]
ITEMS_PER_TASK = 5

MATH = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "7"),
    ("A box holds 12 eggs. How many eggs are in 5 boxes?", "60"),
    ("Sara had 20 dollars and spent 7.50 dollars. How many dollars are left?", "12.5"),
    ("A class of 30 splits into teams of 6. How many teams are there?", "5"),
    ("A shop sells 1,200 pens a week. How many pens does it sell in 2 weeks?", "2400"),
]
MMLU = [
    ("What is the capital of France?", ["Berlin", "Paris", "Rome", "Madrid"], "B"),
    ("Which gas do plants absorb?", ["Carbon dioxide", "Helium", "Neon", "Argon"], "A"),
    ("2 + 2 = ?", ["3", "5", "4", "22"], "C"),
    ("Water boils at sea level at", ["50 C", "75 C", "90 C", "100 C"], "D"),
    ("The largest planet is", ["Mars", "Jupiter", "Venus", "Mercury"], "B"),
]
CODE = [  # (name, signature and docstring, canonical body, asserts)
    ("add_two", "(a: int, b: int) -> int", "Return a + b.", "    return a + b\n", ["(2, 3) == 5", "(-1, 1) == 0"]),
    ("is_even", "(n: int) -> bool", "Is n even?", "    return n % 2 == 0\n", ["(4) is True", "(7) is False"]),
    ("reverse_words", "(text: str) -> str", "Reverse the word order.",
     "    return ' '.join(text.split()[::-1])\n", ["('a b c') == 'c b a'"]),
    ("count_vowels", "(text: str) -> int", "Count a, e, i, o, u.",
     "    return sum(ch in 'aeiou' for ch in text.lower())\n", ["('Hello') == 2", "('xyz') == 0"]),
    ("largest", "(values: list) -> int", "The largest value.", "    return max(values)\n", ["([3, 9, 2]) == 9"]),
]


def write_tiny_data(data_dir: Path) -> None:
    """Five items per task, in the format `python -m eval.prepare_data` writes."""
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "asdiv": [{"id": f"asdiv/{i}", "question": q, "answer": a, "answer_text": f"{a} things"}
                  for i, (q, a) in enumerate(MATH)],
        "gsm_symbolic": [{"id": f"gsm_symbolic/0/{i}", "question": q, "answer": a} for i, (q, a) in enumerate(MATH)],
        "mmlu": [{"id": f"mmlu/{i}", "question": q, "choices": c, "answer": a} for i, (q, c, a) in enumerate(MMLU)],
        "humaneval": [
            {
                "id": f"Tiny/{i}",
                "prompt": f'def {name}{signature}:\n    """{doc}"""\n',
                "entry_point": name,
                "canonical_solution": body,
                "test": "def check(candidate):\n" + "".join(f"    assert candidate{a}\n" for a in asserts),
            }
            for i, (name, signature, doc, body, asserts) in enumerate(CODE)
        ],
    }
    for task, records in files.items():
        (data_dir / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_quality")
    paths = {
        "dgemma": str(make_tiny_checkpoint(root / "tiny-dgemma")),
        "ar": str(make_tiny_ar_checkpoint(root / "tiny-ar")),
        "data": root / "data",
        "root": root,
    }
    write_tiny_data(paths["data"])
    return paths


def quality_argv(setup, out, *extra):
    return [
        "--dgemma-model", setup["dgemma"], "--ar-model", setup["ar"], "--tasks", "math,mmlu,humaneval",
        "--limit", str(ITEMS_PER_TASK), "--out", str(out), "--data-dir", str(setup["data"]),
        "--sweep", "steps=2,4", "entropy_bound=0.5", "--allow-code-execution", "--max-new-tokens", "16",
        "--device", "cpu", *extra,
    ]


@pytest.fixture(scope="module")
def finished_run(setup):
    out = setup["root"] / "out"
    assert main(quality_argv(setup, out)) == 0
    return out


def read_items(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "items.jsonl").read_text().split("\n") if line]


def test_end_to_end_results_json(finished_run):
    results = json.loads((finished_run / "results.json").read_text())
    assert [run["run_id"] for run in results["runs"]] == RUN_IDS
    assert results["config"]["tasks"] == TASKS
    assert len(results["items"]) == len(RUN_IDS) * len(TASKS) * ITEMS_PER_TASK
    for run in results["runs"]:
        assert run["items"] == len(TASKS) * ITEMS_PER_TASK
        for task in TASKS:
            scores = [item["score"] for item in results["items"] if item["run_id"] == run["run_id"]
                      and item["task"] == task]
            assert len(scores) == ITEMS_PER_TASK and set(scores) <= {0, 1}
            assert run["accuracy"][task] == pytest.approx(sum(scores) / ITEMS_PER_TASK)
        assert run["mean_accuracy"] == pytest.approx(sum(run["accuracy"].values()) / len(TASKS))
        assert run["generated_tokens"] > 0 and run["tokens_per_second"] > 0
        assert 0 < run["latency_s"]["p50"] <= run["latency_s"]["p95"]
        assert 0 < run["first_output_s"]["p50"] <= run["latency_s"]["p95"]
        assert run["peak_memory_bytes"] > 2**20 and run["peak_memory_kind"] == "process_peak_rss"
    ar, fewer_steps, more_steps = results["runs"]
    assert ar["tokens_per_forward"] is None and ar["settings"] == {"decoding": "greedy"}
    # The tiny checkpoint's generation config: upstream's adaptive stopping (stable once, mean entropy < 0.005).
    assert fewer_steps["settings"] == {"steps": 2, "entropy_bound": 0.5, "stability_threshold": 1,
                                       "confidence_threshold": 0.005}
    # Tiny checkpoint canvas: 16 tokens. Fewer denoising steps accept more tokens per decoder forward.
    assert 0 < more_steps["tokens_per_forward"] < fewer_steps["tokens_per_forward"] <= 16
    humaneval = [item for item in results["items"] if item["task"] == "humaneval"]
    for item in humaneval:  # a whole program, starting with the problem's prompt
        assert item["prediction"].startswith(f"def {CODE[int(item['id'].split('/')[1])][0]}(")
    assert all(item["score_detail"] in ("passed", "timed out") or item["score_detail"].startswith("failed")
               for item in humaneval)


def test_end_to_end_markdown_and_plots(finished_run):
    report = (finished_run / "report.md").read_text()
    assert report.startswith("# DiffusionGemma vs autoregressive")
    assert "| run | asdiv | gsm_symbolic | mmlu | humaneval | mean |" in report
    assert all(f"| {run_id} |" in report for run_id in RUN_IDS)
    assert "first committed canvas" in report  # says what time-to-first-output means for DiffusionGemma
    for name in ("quality_vs_speed.png", "accuracy_by_task.png"):
        assert f"]({name})" in report
        path = finished_run / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, channels = matplotlib.image.imread(path).shape
        assert height > 200 and width > 400 and channels in (3, 4)


def test_resume_generates_only_missing_items(setup, finished_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    complete = read_items(out)
    assert main(quality_argv(setup, out, "--resume")) == 0
    assert read_items(out) == complete  # nothing missing: nothing regenerated
    # Drop the last 5 records and leave half a line, as a run killed mid-write would.
    lines = (out / "items.jsonl").read_text().split("\n")[:-1]
    (out / "items.jsonl").write_text("\n".join(lines[:-5]) + "\n" + lines[-5][:40])
    assert main(quality_argv(setup, out, "--resume")) == 0
    resumed = read_items(out)
    assert len(resumed) == len(complete)
    assert resumed[:-5] == complete[:-5]  # finished items kept as they were
    assert {(r["run_id"], r["task"], r["id"]) for r in resumed} == {(r["run_id"], r["task"], r["id"]) for r in complete}


def test_existing_results_need_resume_and_same_settings(setup, finished_run, capsys):
    assert main(quality_argv(setup, finished_run)) == 2
    assert "already holds results" in capsys.readouterr().err
    assert main(quality_argv(setup, finished_run, "--resume", "--seed", "1")) == 2
    assert "seed: 0 -> 1" in capsys.readouterr().err


def test_non_diffusion_gemma_model_is_refused(setup, tmp_path, capsys):
    argv = quality_argv(setup, tmp_path / "out")
    argv[argv.index(setup["dgemma"])] = setup["ar"]
    with pytest.raises(ValueError, match="--dgemma-model: .* holds a 'gemma3_text' model, not a DiffusionGemma"):
        run_quality(build_parser().parse_args(argv))
    assert main(argv) == 2 and "'gemma3_text'" in capsys.readouterr().err
    argv = quality_argv(setup, tmp_path / "out")
    argv[argv.index(setup["ar"])] = setup["dgemma"]
    with pytest.raises(ValueError, match="--ar-model: .* holds a DiffusionGemma"):
        run_quality(build_parser().parse_args(argv))
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_code_execution_without_opt_in_is_refused_by_the_command(setup, tmp_path):
    argv = [arg for arg in quality_argv(setup, tmp_path / "out") if arg != "--allow-code-execution"]
    completed = subprocess.run([sys.executable, "-m", "eval.quality", *argv], cwd=REPO, capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 2
    assert "executing model-generated Python code" in completed.stderr
    assert "--allow-code-execution" in completed.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_task_and_missing_data_are_refused(setup, tmp_path, capsys):
    argv = quality_argv(setup, tmp_path / "out")
    argv[argv.index("math,mmlu,humaneval")] = "math,gsm8k"
    assert main(argv) == 2
    assert ("unknown task 'gsm8k'; known tasks: arithmetic, asdiv, gsm_symbolic, humaneval, mmlu"
            in capsys.readouterr().err)
    argv = quality_argv(setup, tmp_path / "out")
    argv[argv.index(str(setup["data"]))] = str(tmp_path / "nowhere")
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert str(tmp_path / "nowhere" / "asdiv.jsonl") in error
    assert f"python -m eval.prepare_data --out {tmp_path / 'nowhere'}" in error


def test_sweep_is_a_cartesian_product_of_checked_values():
    assert parse_sweep(["steps=8,16", "entropy_bound=0.1,0.5"]) == [
        {"steps": 8, "entropy_bound": 0.1}, {"steps": 8, "entropy_bound": 0.5},
        {"steps": 16, "entropy_bound": 0.1}, {"steps": 16, "entropy_bound": 0.5},
    ]
    assert parse_sweep(None) == [{}]
    for bad, message in [(["steps=0"], "steps takes int values > 0"), (["steps=1.5"], "steps takes int"),
                         (["temperature=1"], "unknown key 'temperature'"), (["steps"], "KEY=VALUE"),
                         (["steps=4", "steps=8"], "given twice")]:
        with pytest.raises(ValueError, match=message):
            parse_sweep(bad)


def test_arithmetic_task_is_the_default_pairs_held_out_split():
    from eval.train_default import HELD_OUT_SIZE, load_data

    train, held_out = load_data(seed=0)
    items = load_items("arithmetic", "/nowhere")  # built procedurally: no data file, whatever the folder
    assert len(items) == HELD_OUT_SIZE == 200
    assert len({item["id"] for item in items}) == len({item["expression"] for item in items}) == 200
    assert [(item["question"], item["answer"]) for item in items] == [(r["question"], r["answer"]) for r in held_out]
    assert not {item["expression"] for item in items} & {r["expression"] for r in train}  # never seen in training
    assert load_items("arithmetic", limit=3) == items[:3]


def test_default_run_evaluates_the_default_pair_on_held_out_arithmetic(tmp_path):
    """No model given: the built-in pair, on its held-out arithmetic split, DiffusionGemma with the adaptive
    stopping of its shipped generation config. (The full 200-item run is in eval/results/default-pair/.)"""
    from dgemma_hf.default_model import default_ar_model_path, default_model_path

    out = tmp_path / "out"
    outcome = run_quality(build_parser().parse_args(["--limit", "40", "--device", "cpu", "--out", str(out)]))
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["tasks"] == ["arithmetic"]
    assert results["config"]["dgemma_model"] == str(default_model_path())
    assert results["config"]["ar_model"] == str(default_ar_model_path())
    ar, dgemma = outcome["runs"]
    assert ar["family"] == "ar" and dgemma["family"] == "dgemma"
    assert ar["items"] == dgemma["items"] == 40
    shipped = json.loads((default_model_path() / "generation_config.json").read_text())
    assert dgemma["settings"] == {  # adaptive stopping on, as shipped
        "steps": shipped["max_denoising_steps"], "entropy_bound": 0.1,
        "stability_threshold": shipped["stability_threshold"],
        "confidence_threshold": shipped["confidence_threshold"],
    }
    # Chance (always the most common answer) is 2.5%. Measured on these 40 items: 80% and 30% at 4.83 tokens
    # per forward (200 items: 82.5% and 31.0% at 4.87).
    assert ar["accuracy"]["arithmetic"] >= 0.6
    assert dgemma["accuracy"]["arithmetic"] >= 0.15
    assert dgemma["tokens_per_forward"] >= 4.0
    assert all(item["new_tokens"] <= 16 for item in results["items"])  # one 16-token canvas per answer
