"""Write a load test's results (through ``eyas.storage``, so local paths, s3:// and gs:// work)
and print the comparison table.

Files under ``cfg.output``: ``requests.jsonl`` (one measured request per line, with its TTFT,
TPOT and E2E in ms), ``summary.json`` (config + one row per endpoint x point), ``summary.csv``
(the same rows), ``tpot_vs_<x>.png`` and ``throughput_vs_<x>.png`` for x = concurrency and/or
rate (one line per endpoint), and ``manifest.json`` last.
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
    """Rows as CSV; ``errors_by_kind`` becomes ``kind:count;kind:count``, NaN an empty cell."""
    flat = []
    for row in rows:
        errs = ";".join(f"{k}:{v}" for k, v in row.get("errors_by_kind", {}).items())
        flat.append(clean({**row, "errors_by_kind": errs}))
    buf = io.StringIO()
    if flat:
        writer = csv.DictWriter(buf, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    return buf.getvalue().encode()


def plot_bytes(rows: list[dict[str, Any]], mode: str, y_field: str, y_label: str) -> bytes:
    """A PNG of ``y_field`` against the point's x, one line per endpoint."""
    from matplotlib.figure import Figure  # heavy import; Figure avoids pyplot's global state

    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    ax = fig.subplots()
    x_field = _X_FIELD[mode]
    for name in dict.fromkeys(r["endpoint"] for r in rows):
        pts = sorted((r[x_field], r[y_field]) for r in rows if r["endpoint"] == name
                     and r["mode"] == mode and r[y_field] is not None and not math.isnan(r[y_field]))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if mode == "concurrency":
        ax.set_xscale("log", base=2)
        xs = sorted({r[x_field] for r in rows if r["mode"] == mode})
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
    ax.set_xlabel(_X_LABEL[mode])
    ax.set_ylabel(y_label)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_plots(out: str, rows: list[dict[str, Any]]) -> dict[str, str]:
    """Median TPOT and output throughput against concurrency and/or rate."""
    files = {}
    for mode in ("concurrency", "rate"):
        if not any(r["mode"] == mode for r in rows):
            continue
        for name, y_field, y_label in (("tpot", "tpot_ms_median", "median TPOT (ms)"),
                                       ("throughput", "output_throughput", "output tokens/s")):
            uri = storage.join(out, f"{name}_vs_{mode}.png")
            storage.write_bytes(uri, plot_bytes(rows, mode, y_field, y_label))
            files[f"{name}_vs_{mode}"] = uri
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
    files |= write_plots(out, rows)
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


def format_table(result: LoadTestResult) -> str:
    """Fixed-width table; the speedups compare each endpoint with the first at the same point:
    ``x thrpt`` = output throughput ratio, ``x TPOT`` = first's median TPOT / this one's."""
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
    return "\n".join(body)


def print_table(result: LoadTestResult) -> None:
    """Print the comparison table (latencies in ms) and where the results were written."""
    print(format_table(result))
    for name, uri in result.files.items():
        print(f"  {name}: {uri}")
