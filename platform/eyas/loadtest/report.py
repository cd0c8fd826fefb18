"""Write a load test's results (through ``eyas.storage``, so local paths, s3:// and gs:// work)
and print the comparison table.

Files under ``cfg.output``: ``requests.jsonl`` (one measured request per line, with its TTFT,
TPOT and E2E in ms), ``summary.json`` (config + one row per endpoint x point), ``summary.csv``
(the same rows), ``tpot_vs_<x>.png`` and ``throughput_vs_<x>.png`` for x = concurrency and/or
rate (one line per endpoint), ``throughput_vs_tpot.png`` (the trade-off: output tokens/s against
median TPOT, one point per load point), and ``manifest.json`` last.

Every plot is titled with the model(s), the endpoints and their speculation (the mean acceptance
length each endpoint reported; 1.0 is plain decoding); concurrency is on a log2 axis; latency
points are medians with a whisker up to p90; a point with failed requests is circled in red.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import TYPE_CHECKING, Any

from eyas import storage
from eyas.config import config_hash
from eyas.loadtest.config import LoadTestConfig
from eyas.loadtest.metrics import RequestRecord, e2e_s, tpot_s, ttft_s

if TYPE_CHECKING:
    from eyas.loadtest.runner import LoadTestResult

_X_FIELD = {"concurrency": "concurrency", "rate": "request_rate"}
_X_LABEL = {"concurrency": "max concurrency (closed loop)", "rate": "request rate (req/s, Poisson)"}


def clean(value: Any) -> Any:
    """NaN -> None, recursively, so the JSON is standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def request_line(r: RequestRecord) -> str:
    """One JSONL line: the raw timeline plus its per-request metrics."""
    d = r.to_dict() | {"ttft_ms": _ms(ttft_s(r)), "tpot_ms": _ms(tpot_s(r)), "e2e_ms": _ms(e2e_s(r))}
    return json.dumps(clean(d))


def csv_bytes(rows: list[dict[str, Any]]) -> bytes:
    """Rows as CSV; ``errors_by_kind`` becomes ``kind:count;kind:count``, ``speculation_shares``
    ``setting:share;...``, NaN an empty cell."""
    flat = []
    for row in rows:
        errs = ";".join(f"{k}:{v}" for k, v in row.get("errors_by_kind", {}).items())
        shares = ";".join(f"{k}:{v:.3f}" for k, v in (row.get("speculation_shares") or {}).items())
        flat.append(clean({**row, "errors_by_kind": errs, "speculation_shares": shares}))
    buf = io.StringIO()
    if flat:
        writer = csv.DictWriter(buf, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    return buf.getvalue().encode()


ERROR_STYLE = {"marker": "o", "s": 160, "facecolors": "none", "edgecolors": "red",
               "linewidths": 1.5, "zorder": 5}


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not math.isnan(x)


def plot_title(cfg: LoadTestConfig, rows: list[dict[str, Any]]) -> str:
    """Model(s) and endpoints on the first line; each endpoint's speculation (mean acceptance
    length over its points) and the sampling settings on the second."""
    models = ", ".join(dict.fromkeys(ep.model for ep in cfg.endpoints))
    parts = []
    for ep in cfg.endpoints:
        acc = [r["acceptance_length_mean"] for r in rows
               if r["endpoint"] == ep.name and _finite(r.get("acceptance_length_mean"))]
        spec = f"acc len {sum(acc) / len(acc):.2f}" if acc else "no spec stats"
        parts.append(f"{ep.name} ({spec})")
    return (f"{models}: {' vs '.join(ep.name for ep in cfg.endpoints)}\n"
            f"{'; '.join(parts)}; T={cfg.temperature:g}, max_tokens={cfg.max_tokens}")


def _log2_x(ax: Any, xs: list[float]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()


def _figure(title: str | None) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # heavy import; Figure avoids pyplot's global state

    fig = Figure(figsize=(6.4, 4.6), dpi=110)
    ax = fig.subplots()
    if title:
        ax.set_title(title, fontsize=8.5)
    return fig, ax


def _png(fig: Any, ax: Any) -> bytes:
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_bytes(rows: list[dict[str, Any]], mode: str, y_field: str, y_label: str,
               title: str | None = None) -> bytes:
    """A PNG of ``y_field`` against the point's x, one line per endpoint. For a ``*_median``
    field the whisker reaches the matching ``*_p90``; points with failures are circled red."""
    fig, ax = _figure(title)
    x_field = _X_FIELD[mode]
    p90_field = y_field.replace("_median", "_p90") if y_field.endswith("_median") else None
    for name in dict.fromkeys(r["endpoint"] for r in rows):
        pts = sorted((r[x_field], r[y_field], r.get(p90_field) if p90_field else None,
                      r.get("failed", 0)) for r in rows
                     if r["endpoint"] == name and r["mode"] == mode and _finite(r[y_field]))
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if p90_field:
            up = [max(p[2] - p[1], 0.0) if _finite(p[2]) else 0.0 for p in pts]
            ax.errorbar(xs, ys, yerr=[[0.0] * len(pts), up], marker="o", capsize=3,
                        label=f"{name} (p50, whisker p90)")
        else:
            ax.plot(xs, ys, marker="o", label=name)
        bad = [(p[0], p[1]) for p in pts if p[3]]
        if bad:
            ax.scatter([b[0] for b in bad], [b[1] for b in bad], **ERROR_STYLE,
                       label=f"{name}: with errors")
    if mode == "concurrency":
        _log2_x(ax, sorted({r[x_field] for r in rows if r["mode"] == mode}))
    ax.set_xlabel(_X_LABEL[mode])
    ax.set_ylabel(y_label)
    return _png(fig, ax)


def tradeoff_plot_bytes(rows: list[dict[str, Any]], title: str | None = None) -> bytes:
    """Output tokens/s against median TPOT (p90 whisker), one line per endpoint and mode, each
    point labelled with its concurrency or rate: up and to the left is better."""
    fig, ax = _figure(title)
    for name in dict.fromkeys(r["endpoint"] for r in rows):
        for mode in ("concurrency", "rate"):
            pts = sorted((r["tpot_ms_median"], r["output_throughput"], r.get("tpot_ms_p90"),
                          r[_X_FIELD[mode]], r.get("failed", 0)) for r in rows
                         if r["endpoint"] == name and r["mode"] == mode
                         and _finite(r["tpot_ms_median"]) and _finite(r["output_throughput"]))
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            right = [max(p[2] - p[0], 0.0) if _finite(p[2]) else 0.0 for p in pts]
            label = name if mode == "concurrency" else f"{name} (rate)"
            ax.errorbar(xs, ys, xerr=[[0.0] * len(pts), right], marker="o", capsize=3,
                        label=label)
            for x, y, _, at, _ in pts:
                ax.annotate(f"{'c' if mode == 'concurrency' else 'r'}{at:g}", (x, y),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
            bad = [(p[0], p[1]) for p in pts if p[4]]
            if bad:
                ax.scatter([b[0] for b in bad], [b[1] for b in bad], **ERROR_STYLE,
                           label=f"{name}: with errors")
    ax.set_xlabel("median TPOT (ms), whisker to p90")
    ax.set_ylabel("output tokens/s")
    return _png(fig, ax)


def write_plots(out: str, rows: list[dict[str, Any]], title: str | None = None) -> dict[str, str]:
    """Median TPOT and output throughput against concurrency and/or rate, and throughput
    against TPOT."""
    files = {}
    for mode in ("concurrency", "rate"):
        if not any(r["mode"] == mode for r in rows):
            continue
        for name, y_field, y_label in (("tpot", "tpot_ms_median", "TPOT (ms)"),
                                       ("throughput", "output_throughput", "output tokens/s")):
            uri = storage.join(out, f"{name}_vs_{mode}.png")
            storage.write_bytes(uri, plot_bytes(rows, mode, y_field, y_label, title))
            files[f"{name}_vs_{mode}"] = uri
    if rows:
        uri = storage.join(out, "throughput_vs_tpot.png")
        storage.write_bytes(uri, tradeoff_plot_bytes(rows, title))
        files["throughput_vs_tpot"] = uri
    return files


def write_results(cfg: LoadTestConfig, rows: list[dict[str, Any]],
                  records: list[RequestRecord]) -> dict[str, str]:
    """Write every result file, ``manifest.json`` last; returns name -> URI."""
    out = cfg.output
    files = {"requests": storage.join(out, "requests.jsonl"),
             "summary_json": storage.join(out, "summary.json"),
             "summary_csv": storage.join(out, "summary.csv")}
    storage.write_bytes(files["requests"], "".join(request_line(r) + "\n" for r in records).encode())
    storage.write_json(files["summary_json"],
                       clean({"config": cfg.model_dump(mode="json"), "rows": rows}))
    storage.write_bytes(files["summary_csv"], csv_bytes(rows))
    files |= write_plots(out, rows, plot_title(cfg, rows))
    art = storage.Artifact(out)
    art.write_manifest("loadtest", cfg.model_dump(mode="json"), config_hash(cfg),
                       counts={"requests": len(records), "points": len(rows)},
                       files={k: v.rsplit("/", 1)[-1] for k, v in files.items()})
    files["manifest"] = art.manifest_uri
    return files


def _fmt(x: Any, spec: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _ratio(a: Any, b: Any) -> float | None:
    """a / b when both are finite and b > 0."""
    ok = all(isinstance(v, int | float) and not math.isnan(v) for v in (a, b))
    return a / b if ok and b > 0 else None


def _join(cells: list[str], widths: list[int]) -> str:
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True))


def format_shares(shares: dict[str, float]) -> str:
    """"plain 60%, chain 1/1/2 30%, ...": speculation settings by their share of decode rounds,
    largest first (settings under 0.5% left out)."""
    return ", ".join(f"{name} {share:.0%}" for name, share in
                     sorted(shares.items(), key=lambda kv: -kv[1]) if share >= 0.005)


def format_table(result: LoadTestResult) -> str:
    """Fixed-width table; the speedups compare each endpoint with the first at the same point:
    ``x thrpt`` = output throughput ratio, ``x TPOT`` = first's median TPOT / this one's. Below
    it, per point and endpoint: the speculation settings' shares of the decode rounds (servers
    that report them) and requests lost with a replica."""
    header = ["point", "endpoint", "req/s", "out tok/s", "TTFT p50", "TPOT p50", "ITL p50",
              "acc len", "err %", "x thrpt", "x TPOT"]
    lines, base = [], {}
    for r in result.rows:
        b = base.setdefault(r["point"], r)
        lines.append([r["point"], r["endpoint"], _fmt(r["request_throughput"], ".2f"),
                      _fmt(r["output_throughput"]), _fmt(r["ttft_ms_median"]),
                      _fmt(r["tpot_ms_median"], ".2f"), _fmt(r["itl_ms_median"], ".2f"),
                      _fmt(r["acceptance_length_mean"], ".2f"), _fmt(100 * r["error_rate"]),
                      _fmt(_ratio(r["output_throughput"], b["output_throughput"]), ".2f"),
                      _fmt(_ratio(b["tpot_ms_median"], r["tpot_ms_median"]), ".2f")])
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    body = [_join(row, widths) for row in [header, ["-" * w for w in widths], *lines]]
    for r in result.rows:
        if r.get("speculation_shares"):
            body.append(f"  {r['point']} {r['endpoint']}: decode rounds "
                        f"{format_shares(r['speculation_shares'])}")
        if r.get("replica_lost"):
            back = r.get("recovery_s")
            when = ("not back before the point ended" if back is None or math.isnan(back)
                    else f"service back after {back:.1f} s")
            body.append(f"  {r['point']} {r['endpoint']}: {r['replica_lost']} requests lost "
                        f"with a replica; {when}")
    return "\n".join(body)


def print_table(result: LoadTestResult) -> None:
    """Print the comparison table (latencies in ms) and where the results were written."""
    print(format_table(result))
    for name, uri in result.files.items():
        print(f"  {name}: {uri}")
