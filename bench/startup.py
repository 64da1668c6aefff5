"""Start-up time of the cheap commands (`--help`, `plugins`, `check`), measured as a median of
fresh processes. Prints a table; asserts nothing.

    python bench/startup.py [RECIPE] [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def time_command(args: list[str], runs: int) -> float:
    """Median wall time in seconds of `python -m compressor ARGS` in a fresh process."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "compressor", *args], capture_output=True, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("recipe", nargs="?", default=str(REPO / "recipes" / "minilm-sst2-int8.yaml"))
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    baseline = time_command(["--version"], args.runs)  # the interpreter plus click alone
    print(f"| command | median seconds ({args.runs} runs) |\n|---|---:|")
    print(f"| python -c pass (interpreter) | {statistics.median(_bare(args.runs)):.3f} |")
    print(f"| compressor --version | {baseline:.3f} |")
    for cmd in (["--help"], ["plugins"], ["steps"], ["check", args.recipe]):
        print(f"| compressor {' '.join(Path(c).name if c.endswith('.yaml') else c for c in cmd)} "
              f"| {time_command(cmd, args.runs):.3f} |")


def _bare(runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=False)
        out.append(time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    main()
