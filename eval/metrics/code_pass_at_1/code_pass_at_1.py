"""code_pass_at_1: functional correctness of one generated program per problem (HumanEval pass@1).

Each prediction is a complete candidate program (the problem's prompt plus the model's code); each reference
is the test code that must run without error after it (HumanEval: its `check` function and the call
`check(entry_point)`). Every pair runs in a fresh Python subprocess (`python -I`), in an empty temporary
folder that is deleted afterwards, with a wall-clock timeout, CPU/memory/file-size limits and socket
creation disabled. That is a guard against accidents, not a security sandbox: run untrusted models' code
in a throw-away container or VM.

Running model-written code is opt-in: `compute(..., allow_code_execution=True)`; without it compute raises
ValueError. Loaded by path (`evaluate.load("eval/metrics/code_pass_at_1")`); self-contained because evaluate
copies this file into its module cache.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import datasets
import evaluate

# Runs before the candidate: resource limits, and no new sockets (so no network from the generated code).
_GUARD = """\
import resource as _resource, socket as _socket
_resource.setrlimit(_resource.RLIMIT_AS, ({memory_bytes}, {memory_bytes}))
_resource.setrlimit(_resource.RLIMIT_CPU, ({cpu_seconds}, {cpu_seconds}))
_resource.setrlimit(_resource.RLIMIT_FSIZE, (1 << 24, 1 << 24))
def _no_network(*args, **kwargs):
    raise PermissionError("network access is disabled while evaluating generated code")
class _NoSocket(_socket.socket):
    def __init__(self, *args, **kwargs):
        _no_network()
_socket.socket = _NoSocket
_socket.create_connection = _no_network
_socket.getaddrinfo = _no_network
del _resource, _socket
"""

OPT_IN_MESSAGE = (
    "code_pass_at_1 executes model-generated Python code on this machine. Pass allow_code_execution=True "
    "(eval.quality: --allow-code-execution) only where running untrusted code is acceptable, ideally inside "
    "a throw-away container or VM."
)


def run_candidate(program: str, test: str, timeout: float, memory_bytes: int = 4 << 30) -> str:
    """Runs `program` then `test` in a subprocess; returns "passed", "timed out" or "failed: <reason>"."""
    guard = _GUARD.format(memory_bytes=memory_bytes, cpu_seconds=int(timeout) + 1)
    source = f"{guard}\n{program}\n\n{test}\n"
    with tempfile.TemporaryDirectory(prefix="code_pass_at_1_") as workdir:
        path = os.path.join(workdir, "candidate.py")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(source)
        env = {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        # A new session, so a timeout can kill whatever the candidate started, not just the interpreter.
        process = subprocess.Popen(
            [sys.executable, "-I", path],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return "timed out"
    if process.returncode == 0:
        return "passed"
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    return f"failed: {lines[-1] if lines else f'exit status {process.returncode}'}"


class CodePassAt1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=(
                "predictions: list of str, complete candidate programs; references: list of str, test code run "
                "after each program; allow_code_execution: bool, must be True; timeout: float seconds per "
                "program (default 10); max_workers: int parallel subprocesses (default min(4, cpus)). Returns "
                "pass@1 (mean), scores (0/1 per item) and results (passed / failed: reason / timed out)."
            ),
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, allow_code_execution=False, timeout=10.0, max_workers=None):
        if allow_code_execution is not True:
            raise ValueError(OPT_IN_MESSAGE)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        workers = max_workers or min(4, os.cpu_count() or 1)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers <= 0:
            raise ValueError(f"max_workers must be a positive integer, got {max_workers!r}")
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda pair: run_candidate(pair[0], pair[1], float(timeout)),
                                    zip(predictions, references)))
        scores = [int(result == "passed") for result in results]
        return {"pass@1": sum(scores) / len(scores) if scores else 0.0, "scores": scores, "results": results}
