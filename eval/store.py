"""Per-item results on disk: one JSON line per generated item, appended as it finishes, so a run can resume.

`items.jsonl` holds the records; `run_config.json` the settings that make records comparable (models, seed,
token budget, dtype, device, prompt form). Resuming with different ones is refused, and so is writing into a
folder that already holds records without `resume`.
"""

from __future__ import annotations

import json
from pathlib import Path

ITEMS_FILE = "items.jsonl"
CONFIG_FILE = "run_config.json"


class ItemStore:
    def __init__(self, out_dir: str | Path, identity: dict, resume: bool = False):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / ITEMS_FILE
        config_path = self.out_dir / CONFIG_FILE
        has_records = self.path.is_file() and self.path.stat().st_size > 0
        if has_records and not resume:
            raise ValueError(
                f"--out: {self.out_dir} already holds results ({ITEMS_FILE}); pass --resume to continue them or "
                "choose another folder"
            )
        if resume and config_path.is_file():
            previous = json.loads(config_path.read_text(encoding="utf-8"))
            changed = sorted(key for key in set(previous) | set(identity) if previous.get(key) != identity.get(key))
            if changed:
                details = ", ".join(f"{key}: {previous.get(key)!r} -> {identity.get(key)!r}" for key in changed)
                raise ValueError(f"--resume: {self.out_dir} was run with other settings ({details})")
        config_path.write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")
        self._records: dict[tuple[str, str, str], dict] = {}
        if has_records:
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            # A run killed mid-write leaves a partial last line: drop it so the next append starts clean.
            with self.path.open("r+b") as handle:
                handle.truncate(len(complete))
        for line in complete.decode("utf-8").split("\n"):  # not splitlines(): it also splits at U+2028 etc.
            if line.strip():
                record = json.loads(line)
                self._records[(record["run_id"], record["task"], record["id"])] = record

    def done(self, run_id: str, task: str, item_id: str) -> bool:
        return (run_id, task, item_id) in self._records

    def get(self, run_id: str, task: str, item_id: str) -> dict | None:
        return self._records.get((run_id, task, item_id))

    def append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")  # ASCII-escaped: generations hold any character
            handle.flush()
        self._records[(record["run_id"], record["task"], record["id"])] = record
