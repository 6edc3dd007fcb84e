"""The ``masquant`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EPILOG = """examples:
  masquant demo                          ref-vl at W4A8: full precision vs SmoothQuant vs MASQuant
  masquant demo --tiny --quick           tiny random models, every method (seconds)
  masquant eval --model ref-vl           full-precision accuracy of the shipped model (held-out split)
  masquant eval --model ref-vl --method masquant --w-bits 4 --a-bits 8
  masquant bench --quick                 CI-sized benchmark
  masquant bench --results docs/RESULTS.md   the full benchmark, regenerating the results page
  masquant bench --speed --results docs/PERFORMANCE.md   integer runtime vs FP32/BF16, calibration cost
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="masquant", description="Modality-aware quantization of multimodal LLMs",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="offline demo (no downloads)")
    demo.add_argument("--tiny", action="store_true", help="tiny random-weight models instead of ref-vl")
    demo.add_argument("--quick", action="store_true", help="fewer samples")
    demo.add_argument("--out", type=Path, default=None, help="directory for demo.json")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ev = sub.add_parser("eval", help="evaluate a reference model, optionally after quantizing it")
    ev.add_argument("--model", required=True, help="reference model name (ref-vl)")
    ev.add_argument("--method", default=None, help="quantize first with this method")
    ev.add_argument("--w-bits", type=int, default=8)
    ev.add_argument("--a-bits", type=int, default=8)
    ev.add_argument("--quick", action="store_true", help="smaller evaluation slices")
    ev.add_argument("--no-progress", action="store_true")
    bench = sub.add_parser("bench", help="every method and bit-width on the reference models")
    bench.add_argument("--quick", action="store_true", help="CI-sized: W4A8, three methods, small slices")
    bench.add_argument("--models", nargs="+", default=["ref-vl"], help="reference models (ref-vl, ref-omni)")
    bench.add_argument("--out", type=Path, default=Path("out/bench"))
    bench.add_argument("--results", type=Path, default=None, help="also write this results page (docs/RESULTS.md)")
    bench.add_argument("--speed", action="store_true",
                       help="measure speed, checkpoint bytes and calibration cost instead of accuracy")
    bench.add_argument("--resume", action="store_true",
                       help="reuse the rows already saved in OUT/bench.json (after an interrupted run)")
    bench.add_argument("--no-progress", action="store_true")
    return parser


def _eval(args: argparse.Namespace) -> None:
    from .bench import run_settings
    from .refmodels.evaluate import FULL, QUICK, evaluate_reference
    from .refmodels.registry import load

    if args.method is None:
        model, processor = load(args.model)
        print(json.dumps(evaluate_reference(model, processor, args.model, QUICK if args.quick else FULL), indent=1))
        return
    rows = run_settings(args.model, [(f"W{args.w_bits}A{args.a_bits}", args.method)], args.quick,
                        not args.no_progress)
    print(json.dumps(rows, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            from .demo import run_demo, run_tiny_demo

            (run_tiny_demo if args.tiny else run_demo)(quick=args.quick, out=args.out, progress=not args.no_progress)
        elif args.command == "eval":
            _eval(args)
        elif args.command == "bench" and args.speed:
            from .perf import markdown, run_speed, write

            result = run_speed(quick=args.quick)
            command = " ".join(["masquant bench --speed", *(["--quick"] if args.quick else []),
                                *([f"--results {args.results}"] if args.results else [])])
            write(result, args.out, args.results, command)
            print(markdown(result))
        elif args.command == "bench":
            from .bench import run_bench, write

            rows = run_bench(tuple(args.models), quick=args.quick, progress=not args.no_progress, out=args.out,
                             resume=args.resume)
            command = " ".join(["masquant bench", *(["--quick"] if args.quick else []), "--models", *args.models,
                                *([f"--results {args.results}"] if args.results else [])])
            write(rows, args.out, args.results, command)
            from .bench import markdown

            print(markdown(rows))
        return 0
    except (ValueError, RuntimeError, OSError, KeyError) as err:
        if args.debug:
            raise
        print(f"masquant: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
