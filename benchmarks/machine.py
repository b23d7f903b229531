"""What every benchmark's JSON result says about the machine and the command that produced it.

``Recorder(name)`` notes the machine at the start (CPU model and count, RAM, load average, versions,
date); ``Recorder.write(path, results)`` notes the load average again and writes
``{"benchmark", "command", "machine", "started", "finished", "results"}`` as JSON. ``benchmarks/report.py``
turns those files into BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sqlite3
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _cpuinfo() -> tuple[str, int]:
    """The CPU model and the number of processors, from /proc/cpuinfo."""
    model, count = "", 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("processor"):
                count += 1
    except OSError:
        pass
    return model or platform.processor() or "unknown", count or (os.cpu_count() or 0)


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def machine() -> dict[str, Any]:
    model, cpus = _cpuinfo()
    return {
        "cpu_model": model,
        "cpus": cpus,
        "ram_gib": _mem_total_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "prefect": _version("prefect"),
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": _version("sqlalchemy"),
        "typst": _version("typst"),
    }


def code() -> dict[str, Any]:
    """Which code ran: the checkout's commit and how many files differ from it (uncommitted work), or, for a
    copy without .git, what its BENCH_CODE file says (e.g. "snapshot of <commit>")."""
    import subprocess

    if (ROOT / ".git").exists():
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True, check=True).stdout.strip()
            changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                     capture_output=True, text=True, check=True).stdout.splitlines()
            return {"commit": commit, "uncommitted_files": len(changed), "root": str(ROOT)}
        except (OSError, subprocess.CalledProcessError):
            pass
    marker = ROOT / "BENCH_CODE"
    return {"commit": marker.read_text().strip() if marker.exists() else None, "uncommitted_files": None,
            "root": str(ROOT)}


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process, its living descendants and the children they have reaped,
    from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    parent_of: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent_of[int(d.name)] = int(fields[1])
        cpu[int(d.name)] = sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += cpu.get(p, 0.0)
        todo += [c for c, pp in parent_of.items() if pp == p]
    return total


def command() -> str:
    """The command line that reproduces this run, from the project directory."""
    try:
        exe_s = str(Path(sys.executable).relative_to(ROOT))
    except ValueError:
        exe_s = ".venv/bin/python"
    script = Path(sys.argv[0]).resolve()
    try:
        script_s = str(script.relative_to(ROOT))
    except ValueError:
        script_s = str(script)
    return shlex.join([exe_s, script_s, *sys.argv[1:]])


class Recorder:
    def __init__(self, name: str, note: str | None = None) -> None:
        self.name = name
        self.note = note
        self.started = {"at": now(), "load": load()}
        self.code = code()  # at the start: the code that ran, even if the checkout moves on meanwhile
        self.t0 = time.perf_counter()

    def write(self, path: str | Path | None, results: dict[str, Any]) -> None:
        if not path:
            return
        doc = {
            "benchmark": self.name,
            "note": self.note,
            "command": command(),
            "machine": machine(),
            "code": self.code,
            "started": self.started,
            "finished": {"at": now(), "load": load(), "seconds": round(time.perf_counter() - self.t0, 1)},
            "results": results,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"results written to {path}", file=sys.stderr)
