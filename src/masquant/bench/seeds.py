"""Calibration seeds: the W8A8 / W4A8 / W4A6 rows of every weight-and-activation method calibrated again on each
of two disjoint halves of the calibration slice (``METHOD@1``: samples 0, 2, 4, ...; ``METHOD@2``: 1, 3, 5, ...;
the method's own seed 1 or 2), so that a difference between methods can be told from the noise of the
calibration data. The page shows each score as the two halves' mean +- half their range, beside the row
calibrated on the whole slice."""

from __future__ import annotations

SEEDS = (1, 2)
SEEDED_BITS = ("W8A8", "W4A8", "W4A6")
# (label, how to read it from a row, format): the generative tasks' headline scores, then SQNR and KL
_SCORES = (("sentence WER %", lambda r: 100 * r["sentence"]["wer"] if "sentence" in r else None, "{:.1f}"),
           ("read EM %", lambda r: 100 * r["read"]["exact"] if "read" in r else None, "{:.1f}"),
           ("sign EM %", lambda r: 100 * r["sign"]["exact"] if "sign" in r else None, "{:.1f}"),
           ("SQNR text", lambda r: r["decoder_sqnr"].get("text"), "{:.1f}"),
           ("SQNR vision", lambda r: r["decoder_sqnr"].get("vision"), "{:.1f}"),
           ("SQNR audio", lambda r: r["decoder_sqnr"].get("audio"), "{:.1f}"),
           ("KL", lambda r: r["kl"], "{:.4f}"))


def split(method: str) -> tuple[str, int | None]:
    """``"masquant@2"`` -> ``("masquant", 2)``; a method without ``@`` -> ``(method, None)``."""
    base, sep, seed = method.partition("@")
    if not sep:
        return method, None
    if not seed.isdigit() or int(seed) not in SEEDS:
        raise ValueError(f"bench setting {method!r}: a calibration seed is @{' or @'.join(map(str, SEEDS))}")
    return base, int(seed)


def calibration_half(calib: list, seed: int | None) -> list:
    """The seed's half of the calibration samples (every other one), or all of them without a seed."""
    return list(calib) if seed is None else list(calib)[seed - 1::2]


def seeded_settings(methods: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(bits, f"{m}@{s}") for bits in SEEDED_BITS for m in methods for s in SEEDS]


def is_seeded(row: dict) -> bool:
    return "@" in row["method"]


def section(rows: list[dict]) -> str:
    """Per model, bit-width and method: the whole slice's score, then the halves' mean +- half range."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        part = [r for r in rows if r["model"] == name and "kl" in r]
        seeded = {(r["bits"], split(r["method"])[0]) for r in part if is_seeded(r)}
        if not seeded:
            continue
        scores = [s for s in _SCORES if any(s[1](r) is not None for r in part)]
        head = ["bits", "method"] + [label for label, _, _ in scores]
        lines = [f"### {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in part:
            if is_seeded(r) or (r["bits"], r["method"]) not in seeded:
                continue
            halves = [h for h in part
                      if h["bits"] == r["bits"] and is_seeded(h) and split(h["method"])[0] == r["method"]]
            cells = [r["bits"], r["method"]]
            for _, read, fmt in scores:
                whole, values = read(r), [v for h in halves if (v := read(h)) is not None]
                cell = fmt.format(whole) if whole is not None else "-"
                if len(values) == len(SEEDS):
                    mean, half = sum(values) / len(values), (max(values) - min(values)) / 2
                    cell += f" ({fmt.format(mean)} ± {fmt.format(half)})"
                cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


NOTE = ("Each cell: the row calibrated on the whole calibration slice, then in brackets the mean ± half the "
        "range of the same setting calibrated on each of two disjoint halves of it (`METHOD@1`, `METHOD@2`; the "
        "method's own seed 1 or 2). A difference between two methods smaller than the brackets' spread is "
        "noise of the calibration data.\n\n")
