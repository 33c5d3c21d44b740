"""Run the benchmarks of this folder (each ``bench_*.py`` module's ``main()``), in name order.

``python -m benchmarks`` runs them all (``make bench``); ``python -m benchmarks decoding features`` runs the
named ones (``bench_decoding``, ``bench_features``).
"""
import importlib
import pkgutil
import sys

import benchmarks


def main(names: list[str]) -> None:
    available = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))
    chosen = [f"bench_{n.removeprefix('bench_')}" for n in names] or available
    unknown = [n for n in chosen if n not in available]
    if unknown:
        sys.exit(f"unknown benchmark {', '.join(unknown)}; available: {', '.join(available)}")
    for module in chosen:
        print(f"== {module}", flush=True)
        importlib.import_module(f"benchmarks.{module}").main()


if __name__ == "__main__":
    main(sys.argv[1:])
