"""The ``masquant`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from ..config import method_names
from .options import add_data_options, add_quant_options
from .quantize import calibration, check_architecture, compute_device, deterministic, process_backend, run_quantize

log = logging.getLogger("masquant")

EPILOG = """examples:
  masquant quantize --model ref-vl --method masquant --w-bits 4 --a-bits 8 --rank 32 --out q-vl
  masquant quantize --model path/to/Qwen2.5-VL-3B-Instruct --calib calib.jsonl --method masquant --out q
  masquant eval --model q-vl             accuracy of a saved quantized model on its reference test slices
  masquant analyze --model ref-vl --out analysis    misalignment report with plots and a recommendation
  masquant export q-vl --format compressed-tensors --out q-vl-ct   text path for vLLM + masquant sidecar
  masquant demo                          ref-vl at W4A8: full precision vs SmoothQuant vs MASQuant
  masquant demo --tiny --quick           tiny random models, every method (seconds)
  masquant eval --model ref-vl           full-precision accuracy of the shipped model (held-out split)
  masquant eval --model ref-vl --method masquant --w-bits 4 --a-bits 8
  masquant bench --quick                 CI-sized benchmark
  masquant bench --results docs/results/RESULTS.md   the full benchmark, regenerating the results page
  masquant bench --speed --results docs/results/PERFORMANCE.md   integer runtime vs FP32/BF16, calibration cost
  masquant bench --speed --device cuda   the same linear / whole-model rows on a GPU
  masquant bench --export --models ref-vl ref-omni --results docs/results/EXPORT.md   export with vs without sidecar
  masquant bench --memory --results docs/results/MEMORY.md   peak memory of calibration, in memory vs streamed
  .venv-vllm/bin/masquant bench --serving --results docs/SERVING.md   served by vLLM vs masquant's runtime
  masquant quantize --model path/to/Qwen2.5-VL-72B-Instruct --calib calib.jsonl --stream --out q   larger than memory
  masquant eval --model q-vl-ct --no-sidecar   an exported model as a server without the sidecar runs it
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="masquant", description="Modality-aware quantization of multimodal LLMs",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line on stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    quant = sub.add_parser("quantize", help="quantize a model and save it",
                           description="Quantize a model with a calibration set and save it (masquant.save layout).")
    quant.add_argument("--model", required=True,
                       help="reference model name (ref-vl, ref-omni) or a local Hugging Face checkpoint directory "
                            "(full precision)")
    quant.add_argument("--calib", type=Path, default=None,
                       help="calibration data: a JSONL file, a dataset saved by save_to_disk, parquet / JSON / CSV "
                            "files, or an imagefolder / audiofolder directory (optional for the reference models, "
                            "which ship a default set)")
    add_data_options(quant)
    quant.add_argument("--talker", choices=("keep", "drop"), default=None,
                       help="a full Qwen2.5-Omni checkpoint (thinker, talker, token2wav): its thinker is quantized; "
                            "keep (default) saves the talker and token2wav as they are (the output loads as "
                            "Qwen2_5OmniForConditionalGeneration), drop saves the thinker alone (text out)")
    quant.add_argument("--out", type=Path, required=True, help="output directory")
    quant.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    quant.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from its last finished layer (state kept in OUT)")
    quant.add_argument("--device", default=None,
                       help="where to calibrate: cpu (default) or cuda / cuda:N; under torchrun with GPUs each process "
                            "uses its LOCAL_RANK GPU (NCCL), and --device cpu calibrates on the CPUs (Gloo)")
    quant.add_argument("--stream", action="store_true",
                       help="hold one decoder layer in memory at a time: read each from the checkpoint's safetensors "
                            "shards, quantize it, write it, free it (for models larger than memory; docs/SCALE.md)")
    quant.add_argument("--offload", default=None, metavar="cpu|DIR",
                       help="keep the calibration activations off the compute device: cpu (host memory) or DIR "
                            "(files there, memory-mapped, unlinked once mapped); each sample's come to the device "
                            "only while it runs (docs/SCALE.md)")
    quant.add_argument("--deterministic", action="store_true",
                       help="PyTorch's deterministic algorithms (and a fixed cuBLAS workspace): two runs on the same "
                            "GPU, or an interrupted and resumed one, give the same bits; slower on a GPU, no change "
                            "on a CPU (docs/SCALE.md)")
    quant.add_argument("--no-progress", action="store_true")
    add_quant_options(quant, method="masquant", w_bits=4)
    an = sub.add_parser("analyze", help="measure smoothing misalignment and recommend a method",
                        description="Per layer and linear: activation ranges per modality, their misalignment, "
                                    "SQNR under unified vs per-modality smoothing, CMC residual spectra; "
                                    "writes report.md, analysis.json and PNG plots.")
    an.add_argument("--model", required=True, help="reference model name or a local Hugging Face checkpoint")
    an.add_argument("--calib", type=Path, default=None,
                    help="calibration data, as for quantize (optional for reference models)")
    add_data_options(an)
    an.add_argument("--w-bits", type=int, default=4)
    an.add_argument("--a-bits", type=int, default=8)
    an.add_argument("--out", type=Path, required=True)
    an.add_argument("--no-progress", action="store_true")
    ex = sub.add_parser("export", help="export a saved model for serving (vLLM with masquant's plugin, or "
                                       "compressed-tensors' text path)")
    ex.add_argument("source", type=Path, help="a directory written by masquant quantize")
    ex.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors", "vllm"],
                    help="vllm: every linear as stored, with per-token routing, for vLLM with masquant installed; "
                         "compressed-tensors: the text path any compressed-tensors loader reads, plus a sidecar")
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--overwrite", action="store_true")
    demo = sub.add_parser("demo", help="offline demo (no downloads)")
    demo.add_argument("--tiny", action="store_true", help="tiny random-weight models instead of ref-vl")
    demo.add_argument("--quick", action="store_true", help="fewer samples")
    demo.add_argument("--out", type=Path, default=None, help="directory for demo.json")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ev = sub.add_parser("eval", help="evaluate a reference model, optionally after quantizing it")
    ev.add_argument("--model", required=True,
                    help="reference model name (ref-vl, ref-omni), a directory written by masquant quantize, "
                         "or one written by masquant export")
    ev.add_argument("--method", default=None, choices=method_names(),
                    help="quantize first with this method (the benchmark's settings)")
    ev.add_argument("--w-bits", type=int, default=8)
    ev.add_argument("--a-bits", type=int, default=8)
    ev.add_argument("--quick", action="store_true", help="smaller evaluation slices")
    ev.add_argument("--no-sidecar", action="store_true",
                    help="an exported MODEL: score the text path alone, as a server without the sidecar runs it")
    ev.add_argument("--no-progress", action="store_true")
    bench = sub.add_parser("bench", help="every method and bit-width on the reference models")
    bench.add_argument("--quick", action="store_true", help="CI-sized: W4A8, three methods, small slices")
    bench.add_argument("--models", nargs="+", default=["ref-vl"], help="reference models (ref-vl, ref-omni)")
    bench.add_argument("--out", type=Path, default=Path("out/bench"))
    bench.add_argument("--results", type=Path, default=None,
                       help="also write this results page (docs/results/RESULTS.md)")
    kind = bench.add_mutually_exclusive_group()  # one bench per run
    kind.add_argument("--speed", action="store_true",
                      help="measure speed, checkpoint bytes and calibration cost instead of accuracy")
    kind.add_argument("--export", action="store_true",
                      help="accuracy of the compressed-tensors export with and without its sidecar")
    kind.add_argument("--serving", action="store_true",
                      help="served by vLLM with masquant's plugin against masquant's runtime (in the venv of "
                           "scripts/setup_vllm.sh)")
    kind.add_argument("--memory", action="store_true",
                      help="peak memory of calibration, in memory vs --stream (ref-vl and a 3B-wide random model)")
    bench.add_argument("--device", default="cpu",
                       help="with --speed: cpu, or cuda for the GPU rows (linears and the wide model)")
    bench.add_argument("--cpu-class", choices=("amx", "avx512-vnni", "avx2", "plain"), default=None,
                       help="with --speed: run as a CPU of this class (one this CPU covers: a child process with "
                            "ATen, MKL, oneDNN and the native kernel limited to it); the page keeps one section "
                            "per class")
    bench.add_argument("--saved-only", action="store_true",
                       help="write the page from the rows saved in OUT/bench.json, running nothing")
    bench.add_argument("--peers", type=Path, default=None, metavar="JSON",
                       help="add llm-compressor's scored rows (python -m masquant.bench.peers) to the tables")
    bench.add_argument("--resume", action="store_true",
                       help="reuse the rows already saved in OUT/bench.json (OUT/serving_bench.json with --serving) "
                            "after an interrupted run")
    bench.add_argument("--no-progress", action="store_true")
    return parser


def _analyze(args: argparse.Namespace) -> None:
    from ..evaluation.diagnose import analyze
    from ..io.loading import load_any

    check_architecture(args.model)
    model, processor, reference = load_any(args.model)
    result = analyze(model, calibration(args, processor, reference), args.out, args.w_bits, args.a_bits,
                     progress=not args.no_progress)
    print(result["recommendation"]["text"])
    print(f"report: {args.out / 'report.md'}")


def _eval(args: argparse.Namespace) -> None:
    from ..bench.accuracy import run_settings
    from ..io.loading import load_any
    from ..refmodels.evaluate import FULL, QUICK, evaluate_reference

    if args.no_sidecar:
        from ..io.sidecar import is_export

        if args.method is not None or not Path(args.model).is_dir() or not is_export(Path(args.model)):
            raise ValueError(f"--no-sidecar scores an exported (compressed-tensors) model without its sidecar; "
                             f"{args.model} is not one{' (and --method quantizes first)' if args.method else ''}. "
                             "Drop --no-sidecar, or export first: masquant export SOURCE --out DIR")
    if args.method is None:
        model, processor, reference = load_any(args.model, sidecar=not args.no_sidecar)
        if reference is None:
            raise ValueError(f"{args.model} has no reference test slices; masquant eval scores the reference "
                             "models and models quantized from them (use the lmms-eval wrapper for others)")
        print(json.dumps(evaluate_reference(model, processor, reference, QUICK if args.quick else FULL), indent=1))
        return
    rows = run_settings(args.model, [(f"W{args.w_bits}A{args.a_bits}", args.method)], args.quick,
                        not args.no_progress)
    print(json.dumps(rows, indent=1))



def _results_flag(args) -> list[str]:
    """``--results PAGE`` as a generated page's command line shows it: relative to the working
    directory (the repository, where pages are regenerated), never a machine's absolute path."""
    if not args.results:
        return []
    page = Path(args.results)
    if page.is_absolute():
        try:
            page = page.relative_to(Path.cwd())
        except ValueError:
            page = Path(page.name)
    return [f"--results {page.as_posix()}"]

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_json)
    rank, joined, completed = 0, False, False
    try:
        if args.command == "quantize":
            from ..calibration import distributed

            # started by torchrun: data-parallel calibration (Gloo when asked to calibrate on CPUs)
            joined = distributed.init_from_env(backend=process_backend(args.device))
            rank = distributed.rank()
            _setup_logging(args.log_json, rank)
            with deterministic(args.deterministic):
                run_quantize(args)
        elif args.command == "analyze":
            _analyze(args)
        elif args.command == "export" and args.format == "vllm":
            from ..io.export_vllm import export_vllm

            spec = export_vllm(args.source, args.out, overwrite=args.overwrite)
            patched = sum(bool(lay["patches"]) for lay in spec["linears"].values())
            print(f"exported for vLLM: {len(spec['linears'])} quantized linears ({patched} with patches) to "
                  f"{args.out}; serve it with masquant installed beside vLLM: vllm serve {args.out}")
        elif args.command == "export":
            from ..io.export import export_compressed_tensors

            summary = export_compressed_tensors(args.source, args.out, overwrite=args.overwrite)
            print(f"exported {summary['format']} W{summary['w_bits']}A{summary['a_bits']} to {args.out} "
                  f"({len(summary['requantized'])} linears re-quantized without smoothing; sidecar: "
                  f"{len(summary['linears'])} linears with per-modality vectors or patches)")
        elif args.command == "demo":
            from ..bench.demo import run_demo, run_tiny_demo

            demo = run_tiny_demo if args.tiny else run_demo
            with _one_shot():
                demo(quick=args.quick, out=args.out, progress=not args.no_progress)
        elif args.command == "eval":
            _eval(args)
        elif args.command == "bench" and args.export:
            from ..bench.export import run_export_bench, write

            rows = run_export_bench(tuple(args.models), quick=args.quick, progress=not args.no_progress)
            command = " ".join(["masquant bench --export", *(["--quick"] if args.quick else []), "--models",
                                *args.models, *_results_flag(args)])
            print(write(rows, args.out, args.results, command))
        elif args.command == "bench" and args.serving:
            from ..bench.serving import run_serving_bench, write

            command = " ".join(["masquant bench --serving", *(["--quick"] if args.quick else []), "--models",
                                *args.models, *_results_flag(args)])
            saved = args.out / "serving_bench.json"
            done = json.loads(saved.read_text()) if args.resume and saved.exists() else None
            result = run_serving_bench(tuple(args.models), quick=args.quick, progress=not args.no_progress,
                                       wide=not args.quick, done=done,
                                       on_update=lambda partial: write(partial, args.out, None, command))
            print(write(result, args.out, args.results, command))
        elif args.command == "bench" and args.memory:
            from ..bench.memory import run_memory_bench, write

            rows = run_memory_bench(quick=args.quick)
            command = " ".join(["masquant bench --memory", *(["--quick"] if args.quick else []),
                                *_results_flag(args)])
            print(write(rows, args.out, args.results, command))
        elif args.command == "bench" and args.speed:
            from ..bench import cpuclass
            from ..bench.perf import markdown, run_speed, write

            if args.cpu_class:
                cpuclass.check(args.cpu_class)
                if args.cpu_class != cpuclass.current()[0]:  # (the child runs this same command)
                    completed = True
                    return cpuclass.run_as(args.cpu_class, sys.argv[1:] if argv is None else argv)
                cpuclass.enter()
            result = run_speed(quick=args.quick, device=str(compute_device(args)))
            command = " ".join(["masquant bench --speed", *(["--quick"] if args.quick else []),
                                *([f"--cpu-class {args.cpu_class}"] if args.cpu_class else []),
                                *([f"--device {args.device}"] if args.device != "cpu" else []),
                                *_results_flag(args)])
            write(result, args.out, args.results, command)
            print(markdown(result))
        elif args.command == "bench":
            from ..bench.accuracy import run_bench, saved_rows, write
            from ..bench.comparison import read_peers

            peers = [r for r in read_peers(args.peers) if r["model"] in args.models] if args.peers else []
            if args.saved_only:
                rows = saved_rows(tuple(args.models), args.out, quick=args.quick)
            else:
                rows = run_bench(tuple(args.models), quick=args.quick, progress=not args.no_progress, out=args.out,
                                 resume=args.resume)
            command = " ".join(["masquant bench", *(["--quick"] if args.quick else []), "--models", *args.models,
                                *(["--saved-only"] if args.saved_only else []),
                                *([f"--peers {args.peers.as_posix()}"] if args.peers else []),
                                *_results_flag(args)])
            write(rows, args.out, args.results, command, peers)
            from ..bench.accuracy import markdown

            print(markdown(rows))
        completed = True
        return 0
    except (ValueError, RuntimeError, OSError, KeyError) as err:
        if args.debug:
            raise
        print(f"masquant: error{f' (rank {rank})' if rank else ''}: {err}", file=sys.stderr)
        return 1
    finally:
        if joined:
            from ..calibration.distributed import shutdown

            shutdown(completed)


@contextlib.contextmanager
def _one_shot() -> Iterator[None]:
    """A command that runs once (the demo) does not compile the fused kernels, unless MASQUANT_FUSE
    says so: on a fresh machine their compilation takes longer than they save there."""
    from .. import switches

    if "MASQUANT_FUSE" in os.environ:
        yield
        return
    os.environ["MASQUANT_FUSE"] = "0"
    switches.reload()
    try:
        yield
    finally:
        del os.environ["MASQUANT_FUSE"]
        switches.reload()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": round(record.created, 3), "level": record.levelname.lower(),
                           "logger": record.name, "message": record.getMessage()})


def _setup_logging(as_json: bool, rank: int = 0) -> None:
    """INFO on stderr; in a data-parallel run, ranks other than 0 log errors only (they would
    repeat rank 0's lines)."""
    handler = logging.StreamHandler()
    handler.setFormatter(_JsonFormatter() if as_json else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, handlers=[handler], force=True)


if __name__ == "__main__":
    sys.exit(main())
