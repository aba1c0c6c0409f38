"""Sums a py-spy profile (`py-spy record --format raw`, collapsed stacks) into where the CPU went.

    python -m benchmarks.profile FILE [--top 20]

Prints, as shares of the samples in which the process was busy (py-spy leaves idle threads out,
but not an idle executor thread waiting for work, which is left out here):

- self time by package: the package of the innermost frame (`sqlalchemy`, `aio_pika`, the
  standard library's `asyncio`…; the worker's own modules by module, `worker.delivery`);
- inclusive time by the worker's functions: every sample whose stack holds that function;
- inclusive time by package: every sample whose stack holds a frame of that package.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

# Innermost frames of a thread that waits, which py-spy does not always see as idle.
_WAITING = ("_worker (concurrent/futures/thread.py:81)", "select (selectors.py:")
_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>[^()]*?)(?::(?P<line>\d+))?\)$")


def package(path: str) -> str:
    """`sqlalchemy` for sqlalchemy/engine/base.py (py-spy shortens paths to the import root),
    `worker.delivery` for the worker's own modules, `asyncio` for the standard library's."""
    parts = path.replace("\\", "/").split("/")
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :] or parts
    if parts[0] in ("worker", "schemas"):
        return ".".join(parts).removesuffix(".py")
    return parts[0].removesuffix(".py")


def frames(stack: str) -> list[tuple[str, str]]:
    """(function, package) of each frame, outermost first."""
    found = []
    for frame in stack.split(";"):
        match = _FRAME.match(frame.strip())
        if match:
            found.append((match["function"], package(match["path"])))
    return found


def summarise(text: str, top: int) -> str:
    self_time: Counter[str] = Counter()
    worker_functions: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = waiting = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        if any(wait in stack.rsplit(";", 1)[-1] for wait in _WAITING):
            waiting += int(count_text)
            continue
        count, stack_frames = int(count_text), frames(stack)
        if not stack_frames:
            continue
        total += count
        self_time[stack_frames[-1][1]] += count
        for name in {f"{pkg}.{function}" for function, pkg in stack_frames if _ours(pkg)}:
            worker_functions[name] += count
        for pkg in {pkg.split(".")[0] if not _ours(pkg) else pkg for _, pkg in stack_frames}:
            packages[pkg] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples busy ({waiting} more of threads waiting, left out)"]
    for title, counter in (
        ("self time by package (innermost frame)", self_time),
        ("inclusive time by the worker's functions", worker_functions),
        ("inclusive time by package", packages),
    ):
        lines.append(f"\n{title}:")
        lines += [f"  {n / total:6.1%}  {name}" for name, n in counter.most_common(top)]
    return "\n".join(lines)


def _ours(pkg: str) -> bool:
    return pkg.startswith(("worker.", "schemas."))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    print(summarise(args.file.read_text(), args.top))
