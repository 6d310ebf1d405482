"""The step loop stays readable: `Engine.step` is schedule, prepare inputs, execute, sample or
verify, update, and it and every function it calls directly fit on a screen (< 40 lines).
Only the scheduler and the request itself write a request's fields."""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import workers
from workers.engine import Engine
from workers.model_runner import ModelRunner

MAX_LINES = 40


def called_methods(fn) -> list[str]:
    """Every `a.b(...)` call in fn's body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            names.append(ast.unparse(node.func))
    return names


def test_step_is_five_calls_of_short_functions():
    assert sorted(called_methods(Engine.step)) == [
        "self._prepare_inputs",
        "self._sample_or_verify",
        "self._schedule",
        "self._update",
        "self.runner.execute",
        "time.perf_counter",  # the step's start, for the step-time model
    ]
    callees = [Engine.step, Engine._schedule, Engine._prepare_inputs, ModelRunner.execute]
    callees += [Engine._sample_or_verify, Engine._update]
    for fn in callees:
        lines = len(inspect.getsource(fn).splitlines())
        assert lines < MAX_LINES, f"{fn.__qualname__} has {lines} lines"


def test_only_the_scheduler_and_the_request_write_request_fields():
    fields = {"status", "token_ids", "num_computed_tokens", "num_cached_tokens"}
    fields |= {"num_preemptions", "block_hashes", "arrival_order", "stop_token_ids"}
    allowed = {"scheduler.py", "request.py"}
    writers = []
    for path in Path(workers.__file__).parent.rglob("*.py"):
        if path.name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr in fields:
                    owner = ast.unparse(target.value)
                    if owner in ("request", "r", "req", "victim"):
                        writers.append(f"{path.name}:{node.lineno} {ast.unparse(target)}")
    assert writers == []
