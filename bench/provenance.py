"""What a bench's figures were measured on: commit, command, date, machine and versions.

Every bench prints `header(...)` before its table, so a table pasted into
bench/README.md carries the commit it was measured on and the command that
reproduces it.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commit(root: Path = ROOT) -> str:
    """The short HEAD commit, with "+uncommitted" when the tree has changes or untracked files."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + ("+uncommitted" if status.strip() else "")


def cpu_model() -> str:
    """The processor's name as Linux reports it, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus() -> str:
    """NVIDIA GPUs as nvidia-smi names them, or "no GPU"."""
    if shutil.which("nvidia-smi") is None:
        return "no GPU"
    query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
    found = subprocess.run(query, capture_output=True, text=True, check=False).stdout.split("\n")
    names = [name.strip() for name in found if name.strip()]
    return ", ".join(names) if names else "no GPU"


def versions(modules: Sequence[str]) -> str:
    """Python and the installed version of each top-level module (tensorflow: whichever wheel provides it)."""
    distributions = packages_distributions()
    found = [f"python {platform.python_version()}"]
    for module in modules:
        try:
            found.append(f"{module} {version(distributions.get(module, [module])[0])}")
        except PackageNotFoundError:
            found.append(f"{module} not installed")
    return ", ".join(found)


def provenance(modules: Sequence[str]) -> dict[str, str]:
    """Date, commit, command line, machine and versions of this run.

    Args:
        modules: top-level modules whose versions matter to the figures (e.g. "tensorflow").

    Returns:
        One string per field, in the order `header` prints them.
    """
    command = shlex.join(sys.orig_argv)
    if Path.cwd().resolve() != ROOT:
        command += f"   (in {Path.cwd()})"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "command": command,
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, {gpus()} ({platform.platform()})",
        "versions": versions(modules),
    }


def header(modules: Sequence[str]) -> str:
    """`provenance` as the lines every bench prints first."""
    return "\n".join(f"{field}: {value}" for field, value in provenance(modules).items())
