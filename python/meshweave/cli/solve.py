"""``meshweave-solve PROBLEM.json[.gz] TIMEOUT_SECONDS`` -- the IOPDDL contest interface.

Progress goes to stdout as ``# ...`` lines (every improvement as a worker finds it, lower
bounds, a worker's failure with its exception and where); the last line printed is the chosen
strategy per node as a bracketed list (``[0, 0, 2, 1, 0]``), or ``[]`` when the
usage limit cannot be met. The whole run, file loading included, stays within
the timeout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_T_START = time.monotonic()


def _process_start() -> float:
    """time.monotonic() at which this process started (its imports count against the timeout)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
        if 0 <= age < 3600:
            return min(_T_START, time.monotonic() - age)
    except (OSError, ValueError, IndexError):
        pass
    return _T_START


def _margin(timeout: float) -> float:
    """Seconds kept back for expanding, printing and exiting."""
    return max(0.4, min(2.5, 0.04 * timeout + 0.25))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. Called without ``argv`` (the real command line), the process exits
    right after the answer is printed, so interpreter teardown (worker processes,
    solver thread pools, large arrays) does not count against the timeout."""
    code = _main(argv)
    if argv is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None) -> int:
    t_start = _process_start() if argv is None else time.monotonic()
    ap = argparse.ArgumentParser(prog="meshweave-solve", description=__doc__.splitlines()[0])
    ap.add_argument("problem", help="IOPDDL problem file (.json or .json.gz)")
    ap.add_argument("timeout", type=float, help="wall-clock limit in seconds (loading included)")
    ap.add_argument("--method", default="auto", choices=["auto", "ilp", "heuristic"])
    ap.add_argument("--backend", default="highs", choices=["highs", "cbc"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    ap.add_argument("--quiet", action="store_true", help="print only the answer")
    args = ap.parse_args(argv)
    if not args.timeout > 0:
        ap.error("timeout must be positive")

    from meshweave.passes.solver import read_iopddl, solve

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, flush=True)

    try:
        problem = read_iopddl(args.problem)
    except (ValueError, OSError) as e:
        print(f"meshweave-solve: error: {args.problem}: {e}", file=sys.stderr, flush=True)
        return 2
    loaded = time.monotonic() - t_start
    say(f"# loaded {problem.name or args.problem}: {problem.num_nodes} nodes, "
        f"{problem.num_edges} edges in {loaded:.2f}s")

    def progress(elapsed, cost, peak, message):
        peak_s = f" peak={peak}" if peak is not None else ""
        cost_s = f" cost={cost}" if cost is not None else ""
        say(f"# t={loaded + elapsed:.2f}s{cost_s}{peak_s} ({message})")

    budget = args.timeout - (time.monotonic() - t_start) - _margin(args.timeout)
    try:
        sol = solve(problem, max(0.0, budget), method=args.method, backend=args.backend,
                    seed=args.seed, workers=args.workers, progress=progress)
    except ValueError as e:
        print(f"meshweave-solve: error: {args.problem}: {e}", file=sys.stderr, flush=True)
        return 2
    if sol.assignment is None:
        msg = (f"usage limit {problem.usage_limit} cannot be met: the smallest peak usage "
               f"reachable is {sol.stats.get('min_peak_usage')}")
        say("# " + msg)
        if args.quiet:      # the reason still reaches the user, without touching stdout
            print(f"meshweave-solve: {msg}", file=sys.stderr, flush=True)
        print("[]", flush=True)
        return 1
    first = sol.time_to_first_feasible
    first_s = "none" if first is None else f"{loaded + first:.2f}s"
    workers = ",".join(f"{w.name}:{w.status}" for w in sol.workers) or "none"
    say(f"# done: cost={sol.cost} peak={sol.peak_usage} limit={problem.usage_limit} "
        f"status={sol.status} method={sol.method} first_feasible={first_s} "
        f"lower_bound={sol.lower_bound} workers={workers} total={time.monotonic() - t_start:.2f}s")
    print("[" + ", ".join(map(str, sol.assignment.tolist())) + "]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
