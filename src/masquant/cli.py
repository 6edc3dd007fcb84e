"""The ``masquant`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EPILOG = """examples:
  masquant demo                 quantize tiny offline models with every baseline, print per-modality SQNR
  masquant demo --quick         the same, smaller (seconds)
  masquant demo --out out/demo  also write out/demo/demo.json
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="masquant", description="Modality-aware quantization of multimodal LLMs",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="offline demo on tiny built-in models (no downloads)")
    demo.add_argument("--quick", action="store_true", help="smaller models and fewer samples")
    demo.add_argument("--out", type=Path, default=None, help="directory for demo.json")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(quick=args.quick, out=args.out, progress=not args.no_progress)
        return 0
    except (ValueError, RuntimeError, OSError) as err:
        if args.debug:
            raise
        print(f"masquant: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
