"""Evaluation tasks: one prompt per item for both model families, and answer extraction from generations.

Each item gets the same user message for DiffusionGemma and for the autoregressive model (`messages`, used
when the tokenizer has a chat template) and the same plain-text prompt (`plain_prompt`, used otherwise).
`extract` turns a generation into what the task's metric compares with `reference`:
- asdiv, gsm_symbolic (group "math"): the final number ("Answer: 42", "#### 42", \\boxed{42}, else the last
  number in the text), normalised by the exact_match_numeric metric ("$1,000.00" == "1000");
- mmlu: the chosen option letter;
- humaneval: a complete candidate program (the problem's prompt plus the generated code);
- arithmetic: the final number of the worked line ("7-2=5+4=9" -> "9"), as the built-in default pair answers.
Items are read from the JSONL files of `python -m eval.prepare_data` with `datasets.load_dataset("json")`, except
for `arithmetic`: the held-out split of `eval.train_default` (200 expressions never in its training split), built
procedurally by reasoning-gym with the training script's seed, so it needs no data file.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .prepare_data import DEFAULT_DATA_DIR

MATH_INSTRUCTION = (
    "Solve the following math word problem. Reason step by step, then write the final answer as a plain "
    'number on the last line, in the form "Answer: <number>".'
)
CHOICE_INSTRUCTION = (
    "Answer the following multiple-choice question. Write the letter of the correct option on the last "
    'line, in the form "Answer: <letter>".'
)
CODE_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function, signature included, in one "
    "```python code block."
)
CHOICE_LETTERS = "ABCD"


# ---- answer extraction -------------------------------------------------------------------------------------

# A number as models write it: sign, currency, thousands separators, decimals, a fraction, a percent sign.
_NUMBER = r"[-\u2212]?[$£€]?\s?\d(?:[\d,]*\d)?(?:\.\d+)?(?:\s?/\s?\d+)?%?"
# Between "answer" and the value: punctuation, spaces, markdown; not a sign or a currency symbol.
_SEPARATOR = r"[^\w$£€\-\u2212]"
# In order of trust: the "Answer: N" line our prompts ask for, then GSM8K's "#### N", then LaTeX \boxed{N}.
_FINAL_NUMBER_PATTERNS = [
    re.compile(rf"answer(?:{_SEPARATOR}|is){{0,8}}?({_NUMBER})", re.IGNORECASE),
    re.compile(rf"####\s*({_NUMBER})"),
    re.compile(rf"\\boxed\{{\s*({_NUMBER})\s*\}}"),
]


def extract_final_number(text: str) -> str:
    """The final numeric answer in `text` as written ("$1,000.00"), or "" when there is no number."""
    for pattern in _FINAL_NUMBER_PATTERNS:
        matches = pattern.findall(text)
        if matches:
            return matches[-1].strip()
    numbers = re.findall(_NUMBER, text)
    return numbers[-1].strip() if numbers else ""


def extract_choice_letter(text: str, letters: str = CHOICE_LETTERS) -> str:
    """The option letter a generation picks, or "" when it names none. Letters must be upper case, so the
    article "a" is never read as option A."""
    letter = f"[{letters}]"
    stated = re.findall(rf"(?i:answer)(?:\W|(?i:is|option|choice)){{0,8}}?({letter})\b", text)
    if stated:
        return stated[-1]
    leading = re.match(rf"^\W*({letter})(?:[\).:\n]|$)", text.strip())
    if leading:
        return leading.group(1)
    marked = re.findall(rf"\(({letter})\)|\b({letter})[\).]", text)
    return next(filter(None, marked[-1])) if marked else ""


_FENCED_CODE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_program(generation: str, item: dict) -> str:
    """A complete candidate program for a HumanEval item.

    A chat model usually answers with the whole function in a code block: the program is then the problem's
    prompt (its imports and helpers; its stub keeps just the docstring as body) followed by that function,
    which replaces the stub. A plain completion continues the prompt's function body: it is kept up to the
    first top-level line (the function has ended there) and appended to the prompt.
    """
    prompt, entry_point = item["prompt"], item["entry_point"]
    defines_entry = re.compile(rf"^def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
    blocks = [textwrap.dedent(block) for block in _FENCED_CODE.findall(generation)]
    code = next((block for block in blocks if defines_entry.search(block)), blocks[0] if blocks else generation)
    if defines_entry.search(code):
        return f"{prompt}\n{code}"
    body = []
    for line in code.split("\n"):
        if line.strip() and not line[0].isspace():
            break
        body.append(line)
    return prompt + "\n".join(body)


def humaneval_test_program(item: dict) -> str:
    """The code run after a candidate: the item's `check` function and its call on the entry point."""
    return f"{item['test']}\n\ncheck({item['entry_point']})\n"


# ---- prompts -----------------------------------------------------------------------------------------------


def _math_prompt(item: dict) -> str:
    return f"{MATH_INSTRUCTION}\n\nProblem: {item['question']}"


def _choice_prompt(item: dict) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(CHOICE_LETTERS, item["choices"]))
    return f"{CHOICE_INSTRUCTION}\n\nQuestion: {item['question']}\n\n{options}"


def _code_prompt(item: dict) -> str:
    return f"{CODE_INSTRUCTION}\n\n```python\n{item['prompt']}```"


# ---- the task table ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    name: str
    fields: tuple[str, ...]  # what each record must hold
    metric: str  # folder under eval/metrics
    score_key: str  # the metric's aggregate score
    max_new_tokens: int  # default generation budget
    user_prompt: Callable[[dict], str]
    plain_prompt: Callable[[dict], str]
    extract: Callable[[str, dict], str]
    reference: Callable[[dict], str]
    build_items: Callable[[], list[dict]] | None = None  # procedural tasks: the items, with no data file


    @property
    def data_file(self) -> str:
        return f"{self.name}.jsonl"

    def messages(self, item: dict) -> list[dict]:
        return [{"role": "user", "content": self.user_prompt(item)}]


def _math_task(name: str) -> Task:
    return Task(
        name=name,
        fields=("id", "question", "answer"),
        metric="exact_match_numeric",
        score_key="exact_match",
        max_new_tokens=512,
        user_prompt=_math_prompt,
        plain_prompt=_math_prompt,
        extract=lambda generation, item: extract_final_number(generation),
        reference=lambda item: str(item["answer"]),
    )


def arithmetic_items() -> list[dict]:
    """The default pair's held-out split: eval.train_default's 200 held-out expressions (seed 0), none of them
    in its training split, asked exactly as in training ("Calculate 7 - 2 + 4.")."""
    from .train_default import load_data

    _, held_out = load_data(seed=0)
    return [{"id": f"arithmetic/{index}", "question": row["question"], "expression": row["expression"],
             "answer": row["answer"]} for index, row in enumerate(held_out)]


TASKS: dict[str, Task] = {
    "asdiv": _math_task("asdiv"),
    "gsm_symbolic": _math_task("gsm_symbolic"),
    "mmlu": Task(
        name="mmlu",
        fields=("id", "question", "choices", "answer"),
        metric="choice_accuracy",
        score_key="accuracy",
        max_new_tokens=256,
        user_prompt=_choice_prompt,
        plain_prompt=_choice_prompt,
        extract=lambda generation, item: extract_choice_letter(generation),
        reference=lambda item: item["answer"],
    ),
    "humaneval": Task(
        name="humaneval",
        fields=("id", "prompt", "test", "entry_point", "canonical_solution"),
        metric="code_pass_at_1",
        score_key="pass@1",
        max_new_tokens=512,
        user_prompt=_code_prompt,
        plain_prompt=lambda item: item["prompt"],  # a base model simply continues the function
        extract=extract_program,
        reference=humaneval_test_program,
    ),
}
# Tasks whose items are built here, with no prepared data file (TASKS above are the prepared-data ones).
BUILT_IN_TASKS: dict[str, Task] = {
    # The built-in default pair's own task (short integer arithmetic, bare question as the user turn: the models
    # were trained on exactly that prompt and a 16-token canvas).
    "arithmetic": Task(
        name="arithmetic",
        fields=("id", "question", "answer"),
        metric="exact_match_numeric",
        score_key="exact_match",
        max_new_tokens=16,
        user_prompt=lambda item: item["question"],
        plain_prompt=lambda item: item["question"],
        extract=lambda generation, item: extract_final_number(generation),
        reference=lambda item: str(item["answer"]),
        build_items=arithmetic_items,
    ),
}
ALL_TASKS: dict[str, Task] = {**TASKS, **BUILT_IN_TASKS}
TASK_GROUPS = {"math": ("asdiv", "gsm_symbolic")}


def _known_names() -> str:
    groups = ", ".join(f"{group} = {' + '.join(members)}" for group, members in TASK_GROUPS.items())
    return f"{', '.join(sorted(ALL_TASKS))} (groups: {groups})"


def resolve_task_names(spec: str | Iterable[str]) -> list[str]:
    """'math,mmlu' -> ['asdiv', 'gsm_symbolic', 'mmlu']: groups expanded, order kept, duplicates dropped."""
    if isinstance(spec, str):
        names = spec.split(",")
    elif isinstance(spec, Iterable):
        names = list(spec)
    else:
        raise TypeError(f"tasks must be a comma-separated str or a list of names, got {type(spec).__name__}")
    resolved: list[str] = []
    for raw in names:
        if not isinstance(raw, str):
            raise TypeError(f"tasks: each task name must be a str, got {raw!r}")
        name = raw.strip().lower()
        if not name:
            continue
        if name in TASK_GROUPS:
            members = TASK_GROUPS[name]
        elif name in ALL_TASKS:
            members = (name,)
        else:
            raise ValueError(f"tasks: unknown task {raw.strip()!r}; known tasks: {_known_names()}")
        resolved.extend(member for member in members if member not in resolved)
    if not resolved:
        raise ValueError(f"tasks: no task named; known tasks: {_known_names()}")
    return resolved


def get_task(name: str) -> Task:
    if name not in ALL_TASKS:
        raise ValueError(f"task: unknown task {name!r}; known tasks: {_known_names()}")
    return ALL_TASKS[name]


def load_items(task: str | Task, data_dir: str | Path = DEFAULT_DATA_DIR, limit: int | None = None) -> list[dict]:
    """The first `limit` items (all when None) of a task's prepared data file (or of a procedural task's
    items), as dicts."""
    import datasets

    task = get_task(task) if isinstance(task, str) else task
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if task.build_items is not None:
        return task.build_items()[:limit]
    path = Path(data_dir) / task.data_file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: data file of task {task.name!r} not found. Prepare the data first: "
            f"python -m eval.prepare_data --out {data_dir}"
        )
    dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    missing = [field for field in task.fields if field not in dataset.column_names]
    if missing:
        raise ValueError(f"{path}: records lack the field(s) {missing} that task {task.name!r} needs")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset.to_list()
