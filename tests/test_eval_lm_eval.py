"""eval/lm_eval_adapter.py: DiffusionGemma through lm-evaluation-harness's own evaluator, offline, on a tiny
random DiffusionGemma and tiny task YAMLs + JSONL data written here."""

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import lm_eval
import pytest
import torch
from conftest import REPO
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

from dgemma_hf.tiny import make_tiny_checkpoint
from eval.lm_eval_adapter import DiffusionGemmaLM, NoLikelihoodError

torch.set_num_threads(1)

QUESTIONS = [
    ("What is 2 + 2?", "4"),
    ("What colour is the sky?", "blue"),
    ("Name a prime number.", "7"),
]
GEN_TASK, CHOICE_TASK = "tiny_dgemma_gen", "tiny_dgemma_choice"
STOPS = ["\n\n", "Question:"]


def _write_tasks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a, "choices": [a, "none", "maybe"]}) + "\n"
                            for q, a in QUESTIONS))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n")
    (folder / f"{GEN_TASK}.yaml").write_text(
        f"task: {GEN_TASK}\n{common}output_type: generate_until\ndoc_to_target: \"{{{{answer}}}}\"\n"
        f"generation_kwargs:\n  until: {json.dumps(STOPS)}\n  max_gen_toks: 12\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    (folder / f"{CHOICE_TASK}.yaml").write_text(
        f"task: {CHOICE_TASK}\n{common}output_type: multiple_choice\ndoc_to_choice: \"{{{{choices}}}}\"\n"
        "doc_to_target: 0\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n"
    )
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    checkpoint = make_tiny_checkpoint(root / "tiny-dgemma")
    tasks = _write_tasks(root / "tasks")
    lm = DiffusionGemmaLM(pretrained=str(checkpoint), device="cpu", steps=2, sampling="reference")
    return {"root": root, "checkpoint": checkpoint, "tasks": tasks, "lm": lm}


def _request(context: str, **gen_kwargs) -> Instance:
    return Instance("generate_until", {}, (context, gen_kwargs), 0, (GEN_TASK, 0, 1))


def test_registered_under_its_names():
    assert get_model("dgemma") is DiffusionGemmaLM
    assert get_model("diffusion-gemma") is DiffusionGemmaLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models are still there


def test_generate_until_through_simple_evaluate(setup):
    lm = setup["lm"]
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[GEN_TASK], task_manager=TaskManager(include_path=str(setup["tasks"])),
        log_samples=True, bootstrap_iters=0,
    )
    samples = results["samples"][GEN_TASK]
    assert len(samples) == len(QUESTIONS)
    metrics = results["results"][GEN_TASK]
    assert 0.0 <= metrics["exact_match,none"] <= 1.0
    for sample in samples:
        context, gen_kwargs = sample["arguments"][0]
        assert context == f"Question: {QUESTIONS[sample['doc_id']][0]}\nAnswer:"
        assert gen_kwargs["until"] == STOPS and gen_kwargs["max_gen_toks"] == 12
        response = sample["resps"][0][0]
        assert isinstance(response, str) and not any(stop in response for stop in STOPS)
        # the same request outside the evaluator gives the same text: per-request seeds, not order-dependent
        assert lm.generate_until([_request(context, **gen_kwargs)]) == [response]


def test_stop_strings_cut_the_text_and_the_budget_reaches_generate(setup):
    lm = setup["lm"]
    context = "Question: What is 2 + 2?\nAnswer:"
    [raw] = lm.generate_until([_request(context, until=[], max_gen_toks=16)])
    assert len(raw) >= 4
    stop = raw[2:4]
    [cut] = lm.generate_until([_request(context, until=[stop], max_gen_toks=16)])
    assert cut == raw.split(stop)[0] and len(cut) <= 2
    [single] = lm.generate_until([_request(context, until=stop, max_gen_toks=16)])  # a bare string works too
    assert single == cut

    # max_gen_toks is the generate() budget: the same call made by hand with the same seed gives the same text
    tokenizer, model = lm.loaded.tokenizer, lm.loaded.model
    ids = tokenizer(context, return_tensors="pt")["input_ids"]
    seed = zlib.crc32(context.encode())
    torch.manual_seed(seed)
    with torch.inference_mode():
        sequences = model.generate(ids, max_new_tokens=4, max_denoising_steps=2, sampling="reference",
                                   seed=seed).sequences
    new = sequences[0, ids.shape[1]:]
    assert new.shape[0] > 4  # a whole canvas: the adapter keeps the budget's first 4 tokens
    new = new[:4]
    stop_at = next((i for i, token in enumerate(new.tolist()) if token in lm.loaded.stop_ids), 4)
    expected = tokenizer.decode(new[:stop_at], skip_special_tokens=True)
    assert lm.generate_until([_request(context, until=[], max_gen_toks=4)]) == [expected]

    with pytest.raises(ValueError, match="max_gen_toks"):
        lm.generate_until([_request(context, max_gen_toks=0)])


def test_likelihood_requests_raise_a_clear_error(setup):
    lm = setup["lm"]
    with pytest.raises(NoLikelihoodError, match="no left-to-right likelihood"):
        lm_eval.simple_evaluate(model=lm, tasks=[CHOICE_TASK],
                                task_manager=TaskManager(include_path=str(setup["tasks"])), bootstrap_iters=0)
    rolling = Instance("loglikelihood_rolling", {}, ("some text",), 0, (CHOICE_TASK, 0, 1))
    with pytest.raises(NoLikelihoodError, match="loglikelihood_rolling: DiffusionGemma is a text diffusion model"):
        lm.loglikelihood_rolling([rolling])
    assert issubclass(NoLikelihoodError, NotImplementedError)


def test_model_args_are_checked_before_loading(setup):
    with pytest.raises(ValueError, match="scheduler must be one of"):
        DiffusionGemmaLM(pretrained=str(setup["checkpoint"]), scheduler="nope")
    with pytest.raises(ValueError, match="unknown argument"):
        DiffusionGemmaLM.create_from_arg_string(f"pretrained={setup['checkpoint']},stepz=3")
    lm = DiffusionGemmaLM.create_from_arg_string(
        f"pretrained={setup['checkpoint']},scheduler=top_k_per_step,steps=3,sampling=reference",
        {"device": "cpu", "batch_size": 1},
    )
    assert type(lm.scheduler).__name__ == "TopKPerStepScheduler" and lm.scheduler.config.num_inference_steps == 3
    [text] = lm.generate_until([_request("Question: hi\nAnswer:", until=["\n\n"], max_gen_toks=8)])
    assert isinstance(text, str) and "\n\n" not in text


def test_command_line_entry_point(setup):
    out = setup["root"] / "cli-out"
    command = [sys.executable, "-m", "eval.lm_eval_adapter", "--model", "dgemma",
               "--model_args", f"pretrained={setup['checkpoint']},steps=2,scheduler=entropy_bound,entropy_bound=0.5",
               "--tasks", GEN_TASK, "--include_path", str(setup["tasks"]), "--device", "cpu",
               "--output_path", str(out), "--log_samples"]
    completed = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = [json.loads(path.read_text()) for path in out.rglob("results_*.json")]
    assert len(results) == 1 and GEN_TASK in results[0]["results"]
    assert results[0]["config"]["model"] == "dgemma"
    samples = [json.loads(line) for path in out.rglob(f"samples_{GEN_TASK}_*.jsonl")
               for line in path.read_text().splitlines()]
    assert len(samples) == len(QUESTIONS)
