r"""`python -m eval.quality`: DiffusionGemma against an autoregressive model on the same prompts.

    python -m eval.quality --dgemma-model PATH --ar-model PATH --tasks math,mmlu,humaneval --limit 50 \
        --out results/run1 [--sweep steps=8,16 entropy_bound=0.1,0.5] [--allow-code-execution] \
        [--device cuda] [--dtype bfloat16] [--resume]

Runs every item of every task through the autoregressive model (greedy) and through DiffusionGemma once
per setting of the sweep (the cartesian product; without --sweep, the checkpoint's own steps and entropy
bound), one item at a time. DiffusionGemma stops canvases adaptively with its generation config's
stability_threshold and confidence_threshold (recorded in each run's settings).

With neither model given, the built-in default pair runs (dgemma_hf.default_model) and --tasks defaults to
`arithmetic`: the 200 held-out expressions of the pair's training script (eval/train_default.py).

Each finished item is appended to OUT/items.jsonl, so an interrupted run continues with --resume. Then it
scores the items with the local metrics and writes OUT/results.json, OUT/report.md, OUT/quality_vs_speed.png
and OUT/accuracy_by_task.png.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import zlib
from pathlib import Path

from .prepare_data import DEFAULT_DATA_DIR
from .tasks import get_task, load_items, resolve_task_names

SWEEP_KEYS = {"steps": int, "entropy_bound": float}
DEFAULT_TASKS = "math,mmlu,humaneval"
DEFAULT_PAIR_TASKS = "arithmetic"  # what the built-in default pair was trained on: its held-out split
CODE_EXECUTION_REFUSAL = (
    "--tasks: humaneval is scored by executing model-generated Python code on this machine; pass "
    "--allow-code-execution to allow that (best inside a throw-away container or VM), or leave humaneval out"
)


def parse_sweep(specs: list[str] | None) -> list[dict]:
    """["steps=8,16", "entropy_bound=0.1"] -> [{"steps": 8, "entropy_bound": 0.1}, {"steps": 16, ...}]."""
    if not specs:
        return [{}]
    axes: dict[str, list] = {}
    for spec in specs:
        key, separator, values = spec.partition("=")
        key = key.strip()
        if not separator or not values.strip():
            raise ValueError(f"--sweep: expected KEY=VALUE[,VALUE...], got {spec!r}")
        if key not in SWEEP_KEYS:
            raise ValueError(f"--sweep: unknown key {key!r}; known keys: {', '.join(SWEEP_KEYS)}")
        if key in axes:
            raise ValueError(f"--sweep: {key} given twice")
        kind = SWEEP_KEYS[key]
        parsed = []
        for text in values.split(","):
            try:
                value = kind(text.strip())
            except ValueError:
                raise ValueError(f"--sweep: {key} takes {kind.__name__} values > 0, got {text.strip()!r}") from None
            if not value > 0:
                raise ValueError(f"--sweep: {key} takes {kind.__name__} values > 0, got {value!r}")
            if value not in parsed:
                parsed.append(value)
        axes[key] = parsed
    return [dict(zip(axes, combination)) for combination in itertools.product(*axes.values())]


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dgemma-model", help="DiffusionGemma checkpoint (folder or hub id)")
    parser.add_argument("--ar-model", help="autoregressive causal LM checkpoint to compare with (folder or hub id)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated: asdiv, gsm_symbolic, mmlu, humaneval, math (= asdiv + gsm_symbolic), "
                        "arithmetic (the default pair's held-out split; no data file). Default: "
                        f"{DEFAULT_TASKS}, or {DEFAULT_PAIR_TASKS} when no model is given (the built-in pair)")
    parser.add_argument("--limit", type=_positive_int, default=None, help="first N items of each task (default all)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="prepared data (default eval/data; see python -m eval.prepare_data)")
    parser.add_argument("--sweep", nargs="+", metavar="KEY=V1,V2",
                        help="DiffusionGemma settings to sweep: steps=... (max denoising steps per canvas), "
                        "entropy_bound=...")
    parser.add_argument("--allow-code-execution", action="store_true",
                        help="allow running model-generated code (needed to score humaneval)")
    parser.add_argument("--code-timeout", type=_positive_float, default=10.0, help="seconds per humaneval program")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=None,
                        help="token budget for every task (default: per task, 256-512)")
    parser.add_argument("--warmup", type=_non_negative_int, default=1,
                        help="untimed warm-up generations per run (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-chat-template", action="store_true", help="feed plain prompts to both models")
    parser.add_argument("--resume", action="store_true", help="continue OUT/items.jsonl, skipping finished items")
    return parser


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {name} requested but CUDA is not available")
    return device


def adaptive_stopping_settings(path: str) -> dict:
    """The checkpoint's adaptive stopping (upstream's defaults where its generation config sets none), as
    generate() applies it: {"stability_threshold", "confidence_threshold"}."""
    from transformers.models.diffusion_gemma import DiffusionGemmaGenerationConfig

    defaults = DiffusionGemmaGenerationConfig._get_default_generation_params()
    try:
        config = DiffusionGemmaGenerationConfig.from_pretrained(str(path))
    except OSError:  # no generation_config.json
        config = None
    settings = {}
    for key in ("stability_threshold", "confidence_threshold"):
        value = getattr(config, key, None)
        settings[key] = defaults[key] if value is None else value
    return settings


def _plan_runs(args, dgemma_defaults: dict | None) -> list[dict]:
    runs = []
    if args.ar_model:
        runs.append({"run_id": "ar", "family": "ar", "label": "autoregressive (greedy)", "model": args.ar_model,
                     "settings": {"decoding": "greedy"}})
    if args.dgemma_model:
        for partial in parse_sweep(args.sweep):
            settings = {**dgemma_defaults, **partial}
            label = f"steps={settings['steps']} eb={settings['entropy_bound']:g}"
            runs.append({"run_id": f"dgemma steps={settings['steps']} entropy_bound={settings['entropy_bound']:g}",
                         "family": "dgemma", "label": label, "model": args.dgemma_model, "settings": settings})
    return runs


def _generate_pending(args, runs, tasks, items, store, device) -> None:
    import torch
    from tqdm import tqdm

    from .measure import peak_memory, reset_peak_memory
    from .models import encode, generate, load_model

    for family, path in (("ar", args.ar_model), ("dgemma", args.dgemma_model)):
        todo = {
            run["run_id"]: [(task, item) for task in tasks for item in items[task]
                            if not store.done(run["run_id"], task, item["id"])]
            for run in runs if run["family"] == family
        }
        if not any(todo.values()):
            continue  # nothing left for this model: do not even load it
        loaded = load_model(family, path, device, args.dtype, chat_template=not args.no_chat_template)
        for run in (run for run in runs if todo.get(run["run_id"])):
            pending = todo[run["run_id"]]
            budget = {task: args.max_new_tokens or get_task(task).max_new_tokens for task in tasks}
            reset_peak_memory(device)
            first_task, first_item = pending[0]
            for _ in range(args.warmup):  # first calls pay one-time costs (allocations, kernel choice)
                generate(loaded, encode(loaded, get_task(first_task), first_item), budget[first_task],
                         run["settings"], seed=args.seed)
            for task_name, item in tqdm(pending, desc=run["run_id"], unit="item", dynamic_ncols=True):
                task = get_task(task_name)
                seed = args.seed + zlib.crc32(str(item["id"]).encode())  # per item, stable across resumes
                result = generate(loaded, encode(loaded, task, item), budget[task_name], run["settings"], seed=seed)
                peak, peak_kind = peak_memory(device)
                store.append({
                    "run_id": run["run_id"], "family": family, "task": task_name, "id": item["id"],
                    "prompt_tokens": result.prompt_tokens, "generation": result.text,
                    "prediction": task.extract(result.text, item), "reference": task.reference(item),
                    "new_tokens": result.new_tokens, "latency_s": result.latency_s,
                    "first_output_s": result.first_output_s, "tokens_per_forward": result.tokens_per_forward,
                    "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
                })
        del loaded
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next model's peak memory should not include this one's leftovers


def run_quality(args: argparse.Namespace) -> dict:
    """Runs, scores and reports; raises ValueError/FileNotFoundError on bad input before loading weights."""
    default_pair = not args.dgemma_model and not args.ar_model
    tasks = resolve_task_names(args.tasks or (DEFAULT_PAIR_TASKS if default_pair else DEFAULT_TASKS))
    if "humaneval" in tasks and not args.allow_code_execution:
        raise ValueError(CODE_EXECUTION_REFUSAL)
    if default_pair:
        # The built-in pair (trained on short arithmetic only); by default on its held-out arithmetic split.
        from dgemma_hf.default_model import default_ar_model_path, default_model_path

        args.dgemma_model, args.ar_model = str(default_model_path()), str(default_ar_model_path())
    if args.sweep and not args.dgemma_model:
        raise ValueError("--sweep: sweeps DiffusionGemma settings, so it needs --dgemma-model")
    parse_sweep(args.sweep)  # bad sweeps fail here, before any loading
    import datasets

    datasets.disable_progress_bars()  # our own bars show progress; loading bars would drown them
    items = {task: load_items(task, args.data_dir, args.limit) for task in tasks}

    from transformers.utils import logging as transformers_logging

    from .models import check_model_type, default_dgemma_settings
    from .report import (plot_accuracy_by_task, plot_quality_vs_speed, summarise_run, write_markdown,
                         write_results_json)
    from .scoring import score_predictions
    from .store import ItemStore

    transformers_logging.disable_progress_bar()
    dgemma_defaults = None
    if args.dgemma_model:
        check_model_type(args.dgemma_model, expect_dgemma=True, argument="--dgemma-model")
        dgemma_defaults = {**default_dgemma_settings(args.dgemma_model),
                           **adaptive_stopping_settings(args.dgemma_model)}
    if args.ar_model:
        check_model_type(args.ar_model, expect_dgemma=False, argument="--ar-model")
    device = _device(args.device)
    runs = _plan_runs(args, dgemma_defaults)
    identity = {
        "dgemma_model": args.dgemma_model, "ar_model": args.ar_model, "seed": args.seed,
        "max_new_tokens": args.max_new_tokens, "dtype": args.dtype, "device": str(device),
        "prompt_form": "plain" if args.no_chat_template else "chat template when the tokenizer has one",
    }
    store = ItemStore(args.out, identity, resume=args.resume)
    _generate_pending(args, runs, tasks, items, store, device)

    summaries, item_rows = [], []
    for run in runs:
        accuracy, run_records = {}, []
        for task_name in tasks:
            records = [store.get(run["run_id"], task_name, item["id"]) for item in items[task_name]]
            scored = score_predictions(get_task(task_name), [record["prediction"] for record in records],
                                       [record["reference"] for record in records],
                                       allow_code_execution=args.allow_code_execution, code_timeout=args.code_timeout)
            accuracy[task_name] = scored["score"]
            for record, score, detail in zip(records, scored["scores"], scored["details"]):
                item_rows.append({**record, "score": score, "score_detail": detail})
            run_records += records
        summaries.append(summarise_run(run, run_records, accuracy))

    out = Path(args.out)
    config = {**identity, "tasks": tasks, "limit": args.limit, "sweep": args.sweep, "warmup": args.warmup}
    plots = [plot_quality_vs_speed(out, summaries), plot_accuracy_by_task(out, summaries, tasks)]
    results = write_results_json(out, config, summaries, item_rows)
    report = write_markdown(out, config, summaries, tasks, plots)
    return {"runs": summaries, "files": [results, report, *plots]}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        outcome = run_quality(args)
    except (ValueError, TypeError, OSError) as error:  # OSError: missing data file or checkpoint
        print(f"error: {error}", file=sys.stderr)
        return 2
    for run in outcome["runs"]:
        mean = run["mean_accuracy"]
        speed = run["tokens_per_second"]
        print(f"{run['run_id']}: mean accuracy {'-' if mean is None else f'{100 * mean:.1f}%'}, "
              f"{'-' if speed is None else f'{speed:.1f}'} tok/s")
    print("wrote " + ", ".join(str(path) for path in outcome["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
