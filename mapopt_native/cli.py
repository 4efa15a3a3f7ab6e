"""The `mapopt` command (also `python -m mapopt_native`).

    mapopt info                      build information (CPU ISA, CUDA kernels, torch)
    mapopt bench [NAME ...] [-- ARGS]  run bench/bench_<NAME>.py (all by default) from the checkout
"""

import argparse
import json
import runpy
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


def _benchmarks():
    return sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    parser = argparse.ArgumentParser(prog="mapopt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print build information")
    bench = sub.add_parser("bench", help="run the benchmarks in bench/")
    bench.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    args = parser.parse_args(argv)

    if args.command == "info":
        import mapopt_native
        print(json.dumps(mapopt_native.build_info(), indent=1))
        return 0

    if not BENCH_DIR.is_dir():
        parser.error(f"the benchmarks live in the source checkout's bench/ ({BENCH_DIR} not found)")
    available = _benchmarks()
    unknown = sorted(set(args.names) - set(available))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {available}")
    for name in args.names or available:
        print(f"== bench_{name}.py {' '.join(extra)}", flush=True)
        sys.argv = [str(BENCH_DIR / f"bench_{name}.py")] + extra
        runpy.run_path(sys.argv[0], run_name="__main__")
    return 0
