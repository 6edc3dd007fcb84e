"""The results page's comparison section: MASQuant against the same low-rank budget spent on every token
(``lrc``), its own text patch, GPTQ rounding, and llm-compressor's recipes (rows from ``masquant.bench.peers``).

Every number is a row of the bench (``bench.json``) or of the peers' file; this module only lines them up and
takes differences. ``python -m masquant.bench.comparison`` measures the time the text patch costs."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

MODALITIES = ("text", "vision", "audio")
ROWS = ("smoothquant", "lrc", "masquant", "masquant+text", "smoothquant+gptq", "masquant+gptq")
PEER_PREFIX = "llmc:"


def read_peers(path: Path) -> list[dict]:
    """Rows scored by ``python -m masquant.bench.peers`` (a JSON list in the bench's row format)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no peer rows; run `python -m masquant.bench.peers --out {path}` (in the "
                                "main venv, after ./scripts/setup_llmcompressor.sh)")
    rows = json.loads(path.read_text())
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"model", "bits", "method"} <= set(r)
                                             for r in rows):
        raise ValueError(f"{path}: expected a list of rows with model, bits and method")
    return rows


def _mb(row: dict) -> str:
    store = row.get("storage")
    return f"{(store['weight'] + store['patches']) / 2**20:.2f}" if store else "-"


def comparison(rows: list[dict]) -> str:
    """Per model and bit-width: SQNR per modality, KL and bytes of SmoothQuant, ``lrc``, MASQuant (with and without
    its text patch), the GPTQ variants and llm-compressor's recipes, with each one's SQNR gap to MASQuant."""
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        part = [r for r in rows if r["model"] == name and "decoder_sqnr" in r]
        mods = [m for m in MODALITIES if any(m in r["decoder_sqnr"] for r in part)]
        head = (["bits", "method"] + [f"SQNR {m}" for m in mods] + [f"vs MASQuant {m}" for m in mods]
                + ["KL", "KL / MASQuant's", "MB"])
        lines += [f"### {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for bits in ("W8A8", "W4A8", "W4A6", "W4A16"):
            reference = next((r for r in part if r["bits"] == bits and r["method"] == "masquant"), None)
            chosen = [r for r in part if r["bits"] == bits and (r["method"] in ROWS
                                                               or r["method"].startswith(PEER_PREFIX))]
            chosen.sort(key=lambda r: (r["method"].startswith(PEER_PREFIX), ROWS.index(r["method"])
                                       if r["method"] in ROWS else 0, r["method"]))
            for r in chosen:
                sqnr = r["decoder_sqnr"]
                cells = [bits, r["method"]] + [f"{sqnr[m]:.1f}" if m in sqnr else "-" for m in mods]
                if reference is None or r is reference:
                    cells += ["-"] * len(mods) + [f"{r['kl']:.4f}", "-"]
                else:
                    cells += [f"{sqnr[m] - reference['decoder_sqnr'][m]:+.1f}" if m in sqnr else "-" for m in mods]
                    cells += [f"{r['kl']:.4f}", f"{r['kl'] / reference['kl']:.2f}x" if reference["kl"] else "-"]
                lines.append("| " + " | ".join([*cells, _mb(r)]) + " |")
        lines.append("")
    return "\n".join(lines)


NOTE = """`lrc` is SmoothQuant's single vector plus one whitened low-rank patch of `W s - Q(W s)` fitted on all
tokens' covariance and applied to every token, at MASQuant's rank (32) and patch dtype (float16): the same
budget spent on all tokens (one patch per linear, where MASQuant stores one per non-text modality).
`masquant+text` adds MASQuant's text patch (`text_patch=True`, not in the paper); `+gptq` rounds the stored
weights with GPTQ (`w_rounding="gptq"`) after smoothing. `llmc:` rows are llm-compressor's own recipes
(`python -m masquant.bench.peers`), loaded through transformers and scored by the same evaluation: W4A16
rows keep activations in floating point, so they compare with the W4A8 rows at an advantage. "vs MASQuant"
is the SQNR difference to MASQuant at the same bits (dB, positive: better than MASQuant); KL as a ratio to
MASQuant's (below 1: better).

"""


PATCH_COST_SHAPES = ("3B attn 2048>2048", "3B up 2048>11008", "3B down 11008>2048")


@torch.no_grad()
def patch_cost(tokens: tuple[int, ...] = (1, 16, 512)) -> list[dict]:
    """Milliseconds of a W8A8 MASQuant linear at 3B shapes (rank-32 vision patch, half of the tokens vision),
    without and with a rank-32 text patch, measured interleaved in one run: the time ``text_patch`` costs."""
    from ..modality import Modality, ModalityRouter
    from .speed import LINEAR_SHAPES, interleaved, quant_linear

    rows = []
    for name in PATCH_COST_SHAPES:
        k, n = LINEAR_SHAPES[name]
        torch.manual_seed(0)
        router = ModalityRouter({})
        plain = quant_linear(torch.nn.Linear(k, n), 8, rank=32, router=router)
        text = copy.deepcopy(plain)
        text.router = router
        text.add_patch(Modality.TEXT, torch.randn(k, 32) * 1e-2, torch.randn(32, n) * 1e-2)
        for m in tokens:
            x = torch.randn(m, k)
            ids = torch.zeros(m, dtype=torch.long)
            ids[m // 2:] = int(Modality.VISION)
            with router.scope(ids):
                seconds = interleaved({"masquant": lambda a=plain, x=x: a(x), "+text patch": lambda b=text, x=x: b(x)},
                                      min_time=0.1)
            rows.append({"shape": name, "tokens": m, "ms": {label: 1e3 * t for label, t in seconds.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="the time MASQuant's text patch costs (3B linear shapes)")
    parser.parse_args()
    print("| shape | tokens | MASQuant W8A8 ms | + text patch ms | cost |\n|---|---|---|---|---|")
    for r in patch_cost():
        a, b = r["ms"]["masquant"], r["ms"]["+text patch"]
        print(f"| {r['shape']} | {r['tokens']} | {a:.3f} | {b:.3f} | {100 * (b / a - 1):+.1f} % |")


if __name__ == "__main__":
    main()
