"""Numbers from cells: every figure in a notebook's prose is shown by one of its cells or cited.

The notebooks are committed executed (quick mode, by ``make notebooks``), so their outputs are
what a reader sees without running anything. A *figure* in markdown is a number with a decimal
point, a percentage, a ratio ("0.84x") or an integer of 10 or more; small integers ("top-2",
"4 games") are left alone. It is accounted for when the same value, at the precision the prose
writes it, appears in an output of the notebook or in its code (a parameter the code sets), or
when its sentence cites a source (a link, or "et al."). Headings, code spans, math, links'
targets and the References section are not prose.
"""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(\s?%|x\b|×)?")
NOT_PROSE = [re.compile(p, flags) for p, flags in (
    (r"```.*?```", re.S),                       # code blocks
    (r"`[^`]*`", 0),                            # code spans
    (r"\$\$.*?\$\$|\$[^$\n]*\$", re.S),           # math
    (r"<[^>]+>", 0),                            # html tags
    (r"^\s*#.*$", re.M),                        # headings
)]
LINK = re.compile(r"\]\((https?://)?[^)]*\)")
CITED = "[cited]"                               # what a link to a source becomes
CONVENTIONS = {"95%"}                           # a confidence level is chosen, not measured
CITATION = re.compile(r"\[cited\]|et al\.|\[\^?\d+\]")
SENTENCE = re.compile(r"(?<=[.!?:;])(?<!\bal\.)\s+(?=[A-Z(*])|\n\s*[-*|]|\n\s*\d+\.\s|\n\n")


def _text(cell) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def _outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if "text" in out:
            parts.append(_text({"source": out["text"]}))
        for mime in ("text/plain", "text/markdown", "text/html", "text/latex"):
            if mime in out.get("data", {}):
                parts.append(_text({"source": out["data"][mime]}))
        if out.get("output_type") == "error":
            parts.append(out.get("evalue", ""))
    return "\n".join(parts)


def _value(match) -> tuple[float, int]:
    """(value, decimals) of a NUMBER match."""
    whole, frac = match.group(1).replace(",", ""), match.group(2) or ""
    return float(whole + frac), max(len(frac) - 1, 0)


def _is_figure(match) -> bool:
    value, decimals = _value(match)
    return bool(decimals or match.group(3)) or value >= 10


def _prose(markdown: str) -> str:
    """``markdown`` without what is not prose; a link to a web page becomes ``CITED``."""
    markdown = markdown.split("## References")[0]
    markdown = LINK.sub(lambda m: "] " + CITED if m.group(1) else "]", markdown)
    for pattern in NOT_PROSE:
        markdown = pattern.sub(" ", markdown)
    return markdown


def unmatched_figures(nb: dict) -> list[tuple[int, str, str]]:
    """``(cell index, figure, sentence)`` of every figure in ``nb``'s markdown that no output
    or code of ``nb`` shows and no citation backs."""
    shown = [_value(m) for c in nb["cells"] if c["cell_type"] == "code"
             for m in NUMBER.finditer(_outputs_text(c) + "\n" + _text(c))]

    def is_shown(value: float, decimals: int) -> bool:
        return any(round(v, decimals) == value for v, _ in shown)

    found = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        for sentence in SENTENCE.split(_prose(_text(cell))):
            if CITATION.search(sentence):
                continue
            for m in NUMBER.finditer(sentence):
                if _is_figure(m) and m.group(0).strip() not in CONVENTIONS \
                        and not is_shown(*_value(m)):
                    found.append((i, m.group(0).strip(), " ".join(sentence.split())))
    return found


def _notebook(markdown: list[str], code: list[tuple[str, str]]) -> dict:
    cells = [{"cell_type": "markdown", "source": m} for m in markdown]
    cells += [{"cell_type": "code", "source": src, "outputs":
               [{"output_type": "stream", "name": "stdout", "text": out}]} for src, out in code]
    return {"cells": cells}


def test_the_scan_finds_a_figure_no_cell_shows_and_accepts_shown_cited_and_small_ones():
    nb = _notebook(
        ["## 1. Section 12\nThe hit rate is 67% with 32 experts, top-2 of 4 games.",
         "It moved 1.45 GB (the output says 1.4), a 0.84x ratio, for 1,024 steps.",
         "An H100 copies 51 GB/s ([NVIDIA](https://nvidia.com)). `--steps 999` and $x^{77}$.",
         "We measured 13.5 experts per step.\n\n## References\n- Someone, 2021."],
        [("STEPS = 1024\nprint(rate)", "hit rate 66.8% over 32 experts"),
         ("", "moved 1.4 GB; ratio 0.84")])
    found = unmatched_figures(nb)
    assert [(cell, figure) for cell, figure, _ in found] == [(1, "1.45"), (3, "13.5")]


def test_the_scan_finds_figures_in_tables_and_lists():
    nb = _notebook(["| kind | hit |\n|---|---|\n| LRU | 51.0% |\n\n- fewer: 23 misses"],
                   [("", "LRU 51.0%")])
    assert [figure for _, figure, _ in unmatched_figures(nb)] == ["23"]


def test_the_notebooks_are_committed_executed_and_small():
    sizes = 0
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        unrun = [i for i, c in enumerate(nb["cells"])
                 if c["cell_type"] == "code" and _text(c).strip() and not c["execution_count"]]
        # the first cell (the Colab install) runs everywhere, its body only on Colab
        assert not unrun, f"{path.name}: cells {unrun} have not run; run `make notebooks`"
        sizes += path.stat().st_size
    assert sizes < 5e6, f"the executed notebooks take {sizes / 1e6:.1f} MB (at most 5)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_figure_in_the_prose_is_shown_by_a_cell_or_cited(path):
    found = unmatched_figures(json.loads(path.read_text()))
    assert not found, f"{path.name}: figures in markdown that no output shows:\n" + "\n".join(
        f"  cell {cell}: {figure!r} in: {sentence[:160]}" for cell, figure, sentence in found)
