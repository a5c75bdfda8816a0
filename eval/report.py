"""Run summaries, and the files a person reads: results.json, report.md and two PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from .measure import percentile

MEASUREMENT_NOTES = [
    "Each item is generated alone (batch 1) after one untimed warm-up generation per run.",
    "tok/s: generated tokens (up to and including the first stop token, padding excluded) divided by the "
    "wall time of the generate() calls, prompt prefill included, summed over the run's items.",
    "Time to first output: from the generate() call to its first new tokens on the host. For the "
    "autoregressive model that is the first token; for DiffusionGemma it is the first committed canvas "
    "(canvas_length tokens, after all its denoising steps), so the two are not the same quantity.",
    "Tokens per forward (DiffusionGemma): tokens accepted per decoder forward pass, as generate() reports "
    "it, averaged over items.",
    "Latency: wall time of one item's generate() call; p50/p95 over the run's items.",
    "Peak memory: torch.cuda.max_memory_allocated since the run started on a GPU; on the CPU the "
    "process's peak resident set size, which never resets (it covers everything the process did before).",
]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise_run(run: dict, records: list[dict], accuracy: dict[str, float | None]) -> dict:
    """Speed and memory over `records` (the run's per-item records) plus the per-task accuracy given."""
    latencies = [record["latency_s"] for record in records]
    first_outputs = [record["first_output_s"] for record in records if record["first_output_s"] is not None]
    per_forward = [record["tokens_per_forward"] for record in records if record["tokens_per_forward"] is not None]
    tokens = sum(record["new_tokens"] for record in records)
    seconds = sum(latencies)
    scored = [value for value in accuracy.values() if value is not None]
    peaks = [record["peak_memory_bytes"] for record in records]
    return {
        **run,
        "accuracy": accuracy,
        "mean_accuracy": _mean(scored),
        "items": len(records),
        "generated_tokens": tokens,
        "generation_seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "tokens_per_forward": _mean(per_forward),
        "first_output_s": {"p50": percentile(first_outputs, 50), "mean": _mean(first_outputs)},
        "latency_s": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "mean": _mean(latencies)},
        "peak_memory_bytes": max(peaks) if peaks else None,
        "peak_memory_kind": records[-1]["peak_memory_kind"] if records else None,
    }


def write_results_json(out_dir: Path, config: dict, runs: list[dict], items: list[dict]) -> Path:
    path = out_dir / "results.json"
    payload = {"config": config, "measurement_notes": MEASUREMENT_NOTES, "runs": runs, "items": items}
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _fmt(value, pattern: str = "{:.3f}") -> str:
    return "-" if value is None else pattern.format(value)


def _percent(value) -> str:
    return _fmt(None if value is None else 100 * value, "{:.1f}")


def write_markdown(out_dir: Path, config: dict, runs: list[dict], tasks: list[str], plots: list[Path]) -> Path:
    lines = [
        "# DiffusionGemma vs autoregressive: quality and speed",
        "",
        f"- DiffusionGemma: `{config.get('dgemma_model')}`",
        f"- autoregressive: `{config.get('ar_model')}`",
        f"- tasks: {', '.join(tasks)}; items per task: {config.get('limit') or 'all'}; device: {config.get('device')}; "
        f"dtype: {config.get('dtype')}; prompts: {config.get('prompt_form')}; seed: {config.get('seed')}",
        "",
        "## Accuracy (%)",
        "",
        "| run | " + " | ".join(tasks) + " | mean |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for run in runs:
        cells = [_percent(run["accuracy"].get(task)) for task in tasks]
        lines.append(f"| {run['run_id']} | " + " | ".join(cells) + f" | {_percent(run['mean_accuracy'])} |")
    lines += [
        "",
        "## Speed and memory",
        "",
        "| run | items | tok/s | tokens/forward | first output p50 (s) | latency p50 (s) | latency p95 (s) "
        "| peak memory (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        memory = None if run["peak_memory_bytes"] is None else run["peak_memory_bytes"] / 2**20
        lines.append(
            f"| {run['run_id']} | {run['items']} | {_fmt(run['tokens_per_second'], '{:.1f}')} | "
            f"{_fmt(run['tokens_per_forward'], '{:.2f}')} | {_fmt(run['first_output_s']['p50'])} | "
            f"{_fmt(run['latency_s']['p50'])} | {_fmt(run['latency_s']['p95'])} | {_fmt(memory, '{:.0f}')} |"
        )
    kinds = sorted({run["peak_memory_kind"] for run in runs if run["peak_memory_kind"]})
    lines += ["", f"Peak memory measured as: {', '.join(kinds) or '-'}.", "", "## What is measured", ""]
    lines += [f"- {note}" for note in MEASUREMENT_NOTES]
    lines += [""] + [f"![{plot.stem}]({plot.name})" for plot in plots] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_quality_vs_speed(out_dir: Path, runs: list[dict]) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        x, y = run["tokens_per_second"], run["mean_accuracy"]
        if x is None or y is None:
            continue
        if run["family"] == "ar":
            axes.scatter([x], [100 * y], marker="*", s=220, color="tab:red", zorder=3, label="autoregressive")
        else:
            axes.scatter([x], [100 * y], marker="o", s=60, color="tab:blue", zorder=3)
        axes.annotate(run["label"], (x, 100 * y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    dgemma = sorted((run for run in runs if run["family"] == "dgemma" and run["tokens_per_second"] is not None
                     and run["mean_accuracy"] is not None), key=lambda run: run["tokens_per_second"])
    if dgemma:
        axes.plot([run["tokens_per_second"] for run in dgemma], [100 * run["mean_accuracy"] for run in dgemma],
                  color="tab:blue", alpha=0.4, label="DiffusionGemma settings")
    axes.set_xlabel("generated tokens per second (batch 1)")
    axes.set_ylabel("mean accuracy over tasks (%)")
    axes.set_title("Quality vs speed")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    path = out_dir / "quality_vs_speed.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_accuracy_by_task(out_dir: Path, runs: list[dict], tasks: list[str]) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(max(6, 1.8 * len(tasks) + 2), 4.5))
    width = 0.8 / max(1, len(runs))
    for index, run in enumerate(runs):
        heights = [100 * (run["accuracy"].get(task) or 0.0) for task in tasks]
        positions = [task_index + (index - (len(runs) - 1) / 2) * width for task_index in range(len(tasks))]
        hatch = "//" if run["family"] == "ar" else None
        label = run["label"] if run["family"] == "ar" else f"DiffusionGemma {run['label']}"
        axes.bar(positions, heights, width=width, label=label, hatch=hatch)
    axes.set_xticks(range(len(tasks)))
    axes.set_xticklabels(tasks)
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.set_title("Accuracy per task")
    axes.legend(fontsize=7, loc="upper right")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path = out_dir / "accuracy_by_task.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
