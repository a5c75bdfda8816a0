"""The CLI (`dgemma-hf` / `python -m dgemma_hf`), tiny checkpoints and the tiny tokenizer."""

import os
import subprocess
import sys

import torch
from transformers import AutoModel, AutoTokenizer

from dgemma_hf import DiffusionGemmaForMaskedGeneration
from dgemma_hf.cli import main


def _run_cli(*args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "dgemma_hf", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_make_tiny_writes_a_loadable_checkpoint(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "tiny"), "--seed", "3"]) == 0
    assert "RANDOM weights" in capsys.readouterr().out
    files = {p.name for p in (tmp_path / "tiny").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= files
    assert "weights of this model are random" in (tmp_path / "tiny" / "README.md").read_text()
    model = AutoModel.from_pretrained(tmp_path / "tiny")
    assert type(model) is DiffusionGemmaForMaskedGeneration
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tiny")
    assert len(tokenizer) == model.config.text_config.vocab_size
    assert model.generation_config.eos_token_id == [1, tokenizer.convert_tokens_to_ids("<end_of_turn>")]


def test_tiny_tokenizer_is_real_and_round_trips(tokenizer):
    text = "Question: Tom has 3 apples. Why is the sky blue? naïve café 🙂"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) < len(text.encode())  # merges were learned
    assert tokenizer.decode(ids) == text  # byte-level: lossless, also outside the corpus
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)


def test_generate_command_with_model(tmp_path):
    assert main(["make-tiny", str(tmp_path / "tiny")]) == 0
    result = _run_cli(
        "generate", "Why is the sky blue?", "--model", str(tmp_path / "tiny"),
        "--max-new-tokens", "16", "--steps", "2", "--seed", "1", "--device", "cpu", "--dtype", "float32",
    )
    assert result.returncode == 0, result.stderr
    again = _run_cli(
        "generate", "Why is the sky blue?", "--model", str(tmp_path / "tiny"),
        "--max-new-tokens", "16", "--steps", "2", "--seed", "1", "--device", "cpu", "--dtype", "float32",
    )
    assert result.stdout == again.stdout  # --seed makes it reproducible
    assert result.stdout.strip()
    assert "note: no --model given" not in result.stderr  # only the default model gets the note


def test_generate_command_default_model_is_the_built_in_arithmetic_model():
    """The main command works out of the box: the shipped DiffusionGemma answers its task."""
    result = _run_cli("generate", "Calculate 3 + 4.", "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert "note: no --model given" in result.stderr and "arithmetic" in result.stderr
    assert "3+4=7" in result.stdout.replace(" ", "")


def test_cli_refuses_bad_arguments(tmp_path):
    result = _run_cli("generate", "Hello", "--steps", "0")
    assert result.returncode != 0 and "--steps: must be a positive integer" in result.stderr
    result = _run_cli("generate", "Hello", "--model", str(tmp_path / "nowhere"), "--device", "cpu")
    assert result.returncode != 0 and "nowhere" in result.stderr


def test_bf16_generate_runs(tmp_path):
    assert main(["make-tiny", str(tmp_path / "tiny")]) == 0
    model = AutoModel.from_pretrained(tmp_path / "tiny", dtype=torch.bfloat16)
    out = model.generate(torch.tensor([[2, 40, 41, 42]]), max_new_tokens=16, max_denoising_steps=2)
    assert out.sequences.shape == (1, 20)
