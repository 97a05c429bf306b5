"""bench/memory.py's reading of its runs: the linear extrapolation to the fit limit.

No timing or memory measured here: the bench itself measures them."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("memory_bench", REPO / "bench" / "memory.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)  # puts the repository root on sys.path for bench.grpo_step
extrapolated_fit = _bench.extrapolated_fit


def _cell(framework: str, t: int, peak: float, status: str = "ok") -> dict:
    return {"framework": framework, "T": t, "status": status, "peak_rss_gib": peak}


def test_the_fit_is_extrapolated_from_the_two_longest_lengths():
    # The line through (1,024, 1.62 GiB) and (4,096, 1.77 GiB) reaches 16 GiB at
    # 4,096 + (16 - 1.77) * 3,072 / 0.15 tokens; the shorter length's fixed costs do not
    # bend it, and the other framework's cells and a stopped run are not read.
    cells = [_cell("tandem", 256, 1.60), _cell("tandem", 1024, 1.62),
             _cell("tandem", 4096, 1.77), _cell("trl", 4096, 6.07),
             _cell("tandem", 8192, 20.0, status="stopped")]
    assert extrapolated_fit(cells, "tandem", 16.0) == pytest.approx(
        4096 + (16 - 1.77) * 3072 / 0.15)
    assert extrapolated_fit(cells, "tandem", 1.77) == pytest.approx(4096)


def test_no_extrapolation_without_two_lengths_or_growth():
    assert extrapolated_fit([_cell("trl", 1024, 5.6)], "trl", 16.0) is None
    flat = [_cell("trl", 1024, 5.6), _cell("trl", 4096, 5.6)]
    assert extrapolated_fit(flat, "trl", 16.0) is None
    shrinking = [_cell("trl", 1024, 5.6), _cell("trl", 4096, 5.5)]
    assert extrapolated_fit(shrinking, "trl", 16.0) is None
