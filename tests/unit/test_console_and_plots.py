"""What a person reads: one short console line per training report (Ray Train's own multi-KB
report lines silenced), progress as plain lines when stderr is not a terminal, and load-test
plots with a title, p90 whiskers, error markers and the throughput-vs-TPOT trade-off."""

from __future__ import annotations

import builtins
import importlib.util
import io
import logging
import os
import sys

from eyas.loadtest.config import LoadTestConfig
from eyas.loadtest.report import plot_bytes, plot_title, write_plots
from eyas.loadtest.runner import Progress
from eyas.runtime import say
from eyas.train.loop import quiet_ray_train_reports, report_line

# ----------------------------------------------------------------------------- training console


def test_one_short_line_per_report() -> None:
    metrics = {"step": 40, "loss": 3.21456, "acc_0": 0.2712, "tokens_per_s": 411.6,
               "steps": [{"step": i, "loss": 1.0} for i in range(10)]}
    line = report_line(metrics, 190, seconds_per_step=2.5)
    assert line == ("[eyas.train] step 40/190  loss 3.215  acc_0 0.271  412 tok/s  eta 6m15s")
    assert "\n" not in line and len(line) < 100


def test_worker_lines_reach_the_console_once_under_ray_trains_print(capfd, monkeypatch) -> None:
    """In a Ray Train worker ``print`` is Ray's redirected_print, ``sys.stdout`` is wrapped and
    the root logger writes to the console: a print shows twice; ``say`` once."""
    from ray.train.v2._internal.logging.patch_print import redirected_print

    root = logging.getLogger()
    handler = logging.StreamHandler(sys.__stdout__)
    wrapped = open(os.dup(sys.__stdout__.fileno()), "w", buffering=1)  # noqa: SIM115
    monkeypatch.setattr(builtins, "print", redirected_print)
    monkeypatch.setattr(sys, "stdout", wrapped)
    monkeypatch.setattr(root, "level", logging.INFO)
    root.addHandler(handler)
    try:
        print("[eyas.train] printed")
        say("[eyas.train] said")
        sys.__stdout__.flush()
        wrapped.flush()
    finally:
        root.removeHandler(handler)
        wrapped.close()
    out = capfd.readouterr().out.splitlines()
    assert out.count("[eyas.train] printed") == 2  # the defect say() avoids
    assert out.count("[eyas.train] said") == 1


def test_ray_train_report_lines_are_silenced() -> None:
    origin = importlib.util.find_spec("ray.train.v2._internal.execution.context").origin
    logger = logging.getLogger(origin)  # Ray names it after its file: logging.getLogger(__file__)
    before = logger.level
    try:
        quiet_ray_train_reports()
        assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(before)


# ----------------------------------------------------------------------------- progress


def test_progress_off_a_terminal_is_plain_lines() -> None:
    out = io.StringIO()  # not a TTY, like `ray job logs`, CI or a file
    bar = Progress("baseline c4", 10, enabled=True, every_s=0.0, stream=out)
    for n in range(1, 11):
        bar.update(n)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0] == "baseline c4: 1/10 requests" and lines[-1] == "baseline c4: 10/10 requests"


def test_progress_lines_are_periodic_with_a_final_one() -> None:
    out = io.StringIO()
    bar = Progress("eagle3 c1", 100, enabled=True, every_s=3600.0, stream=out)
    for n in range(1, 101):
        bar.update(n)
    bar.close()
    assert out.getvalue().splitlines() == ["eagle3 c1: 100/100 requests"]


# ----------------------------------------------------------------------------- plots


def rows(failed_at: int | None = None) -> list[dict]:
    out = []
    for name, acc, speed in (("baseline", 1.0, 1.0), ("eagle3", 2.4, 1.6)):
        for c in (1, 2, 4, 8):
            out.append({"endpoint": name, "point": f"c{c}", "mode": "concurrency",
                        "concurrency": c, "request_rate": None,
                        "tpot_ms_median": 20.0 * c ** 0.5 / speed,
                        "tpot_ms_p90": 26.0 * c ** 0.5 / speed,
                        "output_throughput": 50.0 * c * speed,
                        "failed": 3 if (name == "eagle3" and c == failed_at) else 0,
                        "acceptance_length_mean": acc if name == "eagle3" else 1.0})
    return out


def cfg(tmp_path) -> LoadTestConfig:
    return LoadTestConfig(endpoints=[
        {"name": "baseline", "url": "http://h/baseline", "model": "smollm2"},
        {"name": "eagle3", "url": "http://h/eagle3", "model": "smollm2"}],
        output=str(tmp_path), max_tokens=128)


def test_title_names_model_endpoints_and_speculation(tmp_path) -> None:
    title = plot_title(cfg(tmp_path), rows())
    assert title.splitlines()[0] == "smollm2: baseline vs eagle3"
    assert "eagle3 (acc len 2.40)" in title and "baseline (acc len 1.00)" in title
    assert "max_tokens=128" in title


def test_plots_include_the_tradeoff_and_mark_errors(tmp_path) -> None:
    import matplotlib.image

    files = write_plots(str(tmp_path), rows(), plot_title(cfg(tmp_path), rows()))
    assert set(files) == {"tpot_vs_concurrency", "throughput_vs_concurrency",
                          "throughput_vs_tpot"}
    for uri in files.values():
        assert matplotlib.image.imread(uri).shape[2] in (3, 4)
    clean = plot_bytes(rows(), "concurrency", "tpot_ms_median", "TPOT (ms)")
    marked = plot_bytes(rows(failed_at=4), "concurrency", "tpot_ms_median", "TPOT (ms)")
    assert clean != marked  # the failed point is circled


def test_tpot_plot_has_p90_whiskers_and_a_log2_axis(tmp_path, monkeypatch) -> None:
    from matplotlib.axes import Axes

    seen: dict = {}
    real_errorbar, real_xscale = Axes.errorbar, Axes.set_xscale

    def errorbar(self, x, y, yerr=None, **kw):
        seen.setdefault("yerr", []).append(yerr)
        return real_errorbar(self, x, y, yerr=yerr, **kw)

    def set_xscale(self, value, **kw):
        seen["xscale"] = (value, kw.get("base"))
        return real_xscale(self, value, **kw)

    monkeypatch.setattr(Axes, "errorbar", errorbar)
    monkeypatch.setattr(Axes, "set_xscale", set_xscale)
    plot_bytes(rows(), "concurrency", "tpot_ms_median", "TPOT (ms)")
    assert seen["xscale"] == ("log", 2)
    lower, upper = seen["yerr"][0]
    assert lower == [0.0] * 4 and upper[0] == 6.0  # p90 - p50 at c1 for the baseline
