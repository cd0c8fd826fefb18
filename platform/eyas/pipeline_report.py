"""The pipeline's closing report: counts per stage, training accuracy, offline and served
acceptance, and EAGLE-3 vs baseline per load point, with where every file is."""

from __future__ import annotations

from typing import Any


def _loadtest_summary(lt: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per load point: each endpoint's median TPOT, throughput and acceptance, and the
    speedups of the second endpoint over the first."""
    by_point: dict[str, dict[str, Any]] = {}
    for row in lt.get("rows", []):
        point = by_point.setdefault(row["point"], {"point": row["point"]})
        point[row["endpoint"]] = {"tpot_ms_median": row.get("tpot_ms_median"),
                                  "ttft_ms_median": row.get("ttft_ms_median"),
                                  "output_throughput": row.get("output_throughput"),
                                  "acceptance_length": row.get("acceptance_length_mean")}
    for sp in lt.get("speedups", []):
        by_point[sp["point"]]["speedup"] = {k: sp[k] for k in ("throughput", "tpot", "ttft")}
    return list(by_point.values())


def explain_point(point: dict[str, Any]) -> str | None:
    """Why EAGLE-3's TPOT is what it is at one load point, from the served numbers alone.

    Each EAGLE-3 round emits tau tokens (the acceptance length) for the price of a draft pass
    plus one verification forward; in units of the baseline's per-token time that price is
    tau * TPOT_eagle3 / TPOT_baseline, and the TPOT speed-up is tau divided by it.
    """
    base = (point.get("baseline") or {}).get("tpot_ms_median")
    eagle = point.get("eagle3") or {}
    tau, tpot = eagle.get("acceptance_length"), eagle.get("tpot_ms_median")
    if not all(isinstance(v, int | float) and v > 0 for v in (base, tau, tpot)):
        return None
    cost = tau * tpot / base
    verdict = "faster" if tpot < base else "slower"
    return (f"{point['point']}: each EAGLE-3 round emitted {tau:.2f} tokens and cost {cost:.2f} "
            f"baseline decode steps (draft + one verification forward), so a token took "
            f"{tpot:.1f} ms instead of {base:.1f} ms: {base / tpot:.2f}x ({verdict})")


def build_report(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Headline numbers of every stage that ran (or was found finished)."""
    report: dict[str, Any] = {"seconds": {k: round(v.get("seconds", 0.0), 1) for k, v in results.items()}}
    if "data" in results:
        report["data"] = results["data"]["counts"]
    if "features" in results:
        report["features"] = {"counts": results["features"].get("counts"),
                              "bytes_per_token": results["features"].get("bytes_per_token")}
    if "train" in results:
        t = results["train"]
        report["train"] = {"steps": t.get("steps"), "final": t.get("final"), "tokens_per_s": t.get("tokens_per_s"),
                           "draft": t.get("outputs", {}).get("draft")}
    if "evaluate" in results:
        report["evaluate"] = {"tau": results["evaluate"].get("tau"),
                              "report": results["evaluate"].get("outputs", {}).get("report")}
    if "loadtest" in results:
        points = _loadtest_summary(results["loadtest"])
        report["loadtest"] = {"points": points, "files": results["loadtest"].get("files", {}),
                              "explanation": [e for e in map(explain_point, points) if e]}
    return report


def _fmt(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


def _tau_line(tau: dict[str, Any] | None, depths: tuple[str, ...] = ("3", "5", "7")) -> str:
    if not tau:
        return "-"
    return "  ".join(f"depth {d}: {_fmt(tau.get(d))}" for d in depths)


def print_report(report: dict[str, Any], uri: str) -> None:
    """The table printed at the end of the pipeline."""
    print("\n=== eyas pipeline report ===")
    if "data" in report:
        d = report["data"]
        print(f"data: read {d['read']}, kept {d['kept']}, quarantined {d['quarantined']}, "
              f"filtered {d['filtered']} {d['by_reason']}")
    if "features" in report:
        print(f"features: {report['features']['counts']}")
    if "train" in report:
        t = report["train"]
        accs = {k: round(v, 3) for k, v in (t["final"] or {}).items() if k.startswith("acc_")}
        print(f"train: {t['steps']} steps, {_fmt(t['tokens_per_s'], 0)} tokens/s, final {accs}")
    if "evaluate" in report:
        tau = report["evaluate"]["tau"] or {}
        for drafter, values in tau.items():  # head, ngram, head+ngram, with a store +corpus
            print(f"offline tau {drafter:17s}: {_tau_line(values)}")
    if "loadtest" in report:
        print(f"{'point':>8} | {'TPOT base':>9} {'TPOT eagle3':>11} {'x TPOT':>6} | "
              f"{'tok/s base':>10} {'tok/s eagle3':>12} {'x thrpt':>7} | {'accept':>6}")
        for p in report["loadtest"]["points"]:
            base, eagle, sp = p.get("baseline", {}), p.get("eagle3", {}), p.get("speedup", {})
            print(f"{p['point']:>8} | {_fmt(base.get('tpot_ms_median')):>9} {_fmt(eagle.get('tpot_ms_median')):>11} "
                  f"{_fmt(sp.get('tpot')):>6} | {_fmt(base.get('output_throughput'), 1):>10} "
                  f"{_fmt(eagle.get('output_throughput'), 1):>12} {_fmt(sp.get('throughput')):>7} | "
                  f"{_fmt(eagle.get('acceptance_length')):>6}")
        for line in report["loadtest"].get("explanation", []):
            print(f"  {line}")
        for name, path in report["loadtest"]["files"].items():
            print(f"  {name}: {path}")
    print(f"report: {uri}")
