"""Quantization flags made from the settings dataclasses: ``QuantConfig``'s common fields and
every registered method's own (``--rank``, ``--alpha``, ...), so a new method needs no CLI edit."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..config import QuantConfig, method_names, method_options, settings_type
from ..methods import METHODS

ALIASES = {"w_group_size": ("--group-size",)}  # the flag's earlier name, still accepted


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add(group: argparse._ArgumentGroup, field: dataclasses.Field, default: Any, note: str = "") -> None:
    meta = dict(field.metadata)
    help_text = meta.get("help", "") + note
    names = (_flag(field.name), *ALIASES.get(field.name, ()))
    if isinstance(default, bool):
        group.add_argument(*names, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help_text} (default: {'on' if default else 'off'})")
        return
    if isinstance(default, dict):
        default = ",".join(f"{k}={v}" for k, v in default.items())
    kind = _typed(meta.get("parse") or type(default))
    group.add_argument(*names, dest=field.name, type=kind, choices=meta.get("choices"), default=None,
                       metavar=None if "choices" in meta else field.name.upper(),
                       help=f"{help_text} (default: {default})")


def _typed(parse):
    """``parse`` for argparse: its ValueError message shown as it is."""
    def run(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    run.__name__ = parse.__name__
    return run


def add_quant_options(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """``--method``, the common settings and every method's own; ``defaults`` overrides
    QuantConfig's for this command (e.g. ``method="masquant", w_bits=4``)."""
    common = parser.add_argument_group("quantization")
    method_help = "; ".join(f"{m.name}: {m.help}" for m in METHODS.values())
    common.add_argument("--method", default=defaults.get("method", "smoothquant"), choices=method_names(),
                        help=f"{method_help} (default: %(default)s)")
    base = QuantConfig()
    for field in dataclasses.fields(QuantConfig):
        if field.name not in ("method", "settings"):
            _add(common, field, defaults.get(field.name, getattr(base, field.name)))
    parser.set_defaults(_quant_defaults=defaults)
    own = parser.add_argument_group("method settings (each applies to the methods named)")
    seen: set[str] = set()
    for name in method_names():
        for field in dataclasses.fields(settings_type(name)):
            if field.name in seen:
                continue
            seen.add(field.name)
            users = [m for m in method_names() if field.name in method_options(m)]
            default = getattr(settings_type(name)(), field.name)
            _add(own, field, default, note=f" [{', '.join(users)}]")


def quant_config(args: argparse.Namespace) -> QuantConfig:
    """The ``QuantConfig`` the flags ask for; a flag the chosen method does not take is an error."""
    defaults = getattr(args, "_quant_defaults", {})
    common = {f.name: getattr(args, f.name) if getattr(args, f.name) is not None else defaults.get(f.name)
              for f in dataclasses.fields(QuantConfig) if f.name not in ("method", "settings")}
    common = {k: v for k, v in common.items() if v is not None}
    names = {f.name for m in method_names() for f in dataclasses.fields(settings_type(m))}
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    foreign = sorted(n for n in given if n not in method_options(args.method))
    if foreign:
        raise ValueError(f"--method {args.method} takes no {', '.join(_flag(n) for n in foreign)}; its own settings: "
                         f"{', '.join(_flag(n) for n in method_options(args.method)) or 'none'}")
    return QuantConfig(method=args.method, **common, **given)


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """How ``--calib`` is read: which columns hold what, and which rows and how much of them."""
    group = parser.add_argument_group("calibration data (--calib)")
    for role, names in (("text", "text, question, prompt, caption, ..."), ("image", "image, images, img, ..."),
                        ("audio", "audio, speech, ..."), ("video", "video, videos, ..."),
                        ("answer", "answer, answers, response, ..."), ("messages", "messages, conversations")):
        group.add_argument(f"--{role}-column", default=None, metavar="NAME",
                           help=f"the column holding the {role} (default: the first present of {names})")
    group.add_argument("--num-samples", type=int, default=None, metavar="N", help="use N rows (default: all)")
    group.add_argument("--shuffle-seed", type=int, default=None, metavar="S",
                       help="shuffle the rows with seed S before taking --num-samples (default: file order)")
    group.add_argument("--max-seq-len", type=int, default=None, metavar="L",
                       help="cut samples to L tokens (never inside an image, clip or video; such samples stay whole)")


def data_options(args: argparse.Namespace) -> dict:
    """``read_calibration``'s keyword arguments from the flags of ``add_data_options``."""
    from ..io.calibfile import Columns

    roles = ("text", "image", "audio", "video", "answer", "messages")
    return {"columns": Columns(**{r: getattr(args, f"{r}_column") for r in roles}), "num_samples": args.num_samples,
            "shuffle_seed": args.shuffle_seed, "max_seq_len": args.max_seq_len}
