"""Cheap checks that catch real operational mistakes: layering, task settings, entry points."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:  # module level only: lazy imports inside commands are fine
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_domain_imports_no_prefect():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "retroauth").rglob("*.py")
                 if {"prefect", "flows", "tasks"} & _top_level_imports(p)]
    assert offenders == []


def test_tasks_retry_with_backoff():
    from tasks.sweep import sweep_window

    assert sweep_window.retries >= 2
    assert sweep_window.retry_jitter_factor
