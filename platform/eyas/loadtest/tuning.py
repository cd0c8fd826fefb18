"""Speculation tuning: which EAGLE-3 setting (num_steps S, eagle_topk K, num_draft_tokens D)
serves each band of load best.

- ``recommend(results_by_setting, bands, ...)`` is pure: closed-loop summary rows per setting
  (as ``run_load_test`` returns them) -> one verdict per concurrency band.
- ``tune_settings(loadtest, tune, deploy, teardown)`` drives the sweep: optionally measure the
  reference endpoints (``loadtest.endpoints``, e.g. the baseline) once, then for every setting
  ``deploy(setting) -> base URL``, run the load test against that URL, ``teardown(setting)``;
  finally ``recommend`` and write ``tuning.json`` plus ``manifest.json`` under
  ``loadtest.output``.

Scoring, per band: at each concurrency of the band, a setting's objective value is divided by
the best setting's (inverted for TPOT, where lower is better), so the best one scores 1; a
setting's band score is the geometric mean over the band's concurrencies, and the highest score
wins (ties: the first setting listed). A setting missing a point of the band, or failing more
than ``max_error_rate`` of its requests at one, is disqualified for that band.

Layout under ``loadtest.output``: ``reference/`` and ``settings/<label>/`` (each a load-test
artifact), ``tpot_vs_concurrency.png`` / ``throughput_vs_concurrency.png`` (every run in one
plot), ``tuning.json``, ``manifest.json`` (last).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import Field, model_validator

from eyas import storage
from eyas.config import StrictModel, config_hash
from eyas.loadtest.config import EndpointConfig, LoadTestConfig

Objective = Literal["output_throughput", "tpot"]
OBJECTIVE_FIELDS: dict[str, tuple[str, bool]] = {  # objective -> (summary field, higher is better)
    "output_throughput": ("output_throughput", True),
    "tpot": ("tpot_ms_median", False),
}
DEFAULT_BANDS: list[tuple[int, int]] = [(1, 4), (8, 16), (32, 64)]


class SpecSetting(StrictModel):
    """One speculative-decoding setting, with SGLang's knob names."""

    num_steps: int = Field(ge=1)
    eagle_topk: int = Field(ge=1)
    num_draft_tokens: int = Field(ge=2)
    url: str | None = Field(
        default=None, description="an endpoint already serving this setting (used when "
        "tune.deployer is unset)")

    @model_validator(mode="after")
    def _knobs(self) -> SpecSetting:
        from eyas.engine.tree import validate_tree_knobs  # torch: imported only when validating

        validate_tree_knobs(self.num_steps, self.eagle_topk, self.num_draft_tokens)
        return self

    @property
    def label(self) -> str:
        """``s5_k1_d6``: a name usable in tables, plots and paths."""
        return f"s{self.num_steps}_k{self.eagle_topk}_d{self.num_draft_tokens}"

    def knobs(self) -> dict[str, int]:
        return {"num_steps": self.num_steps, "eagle_topk": self.eagle_topk,
                "num_draft_tokens": self.num_draft_tokens}


class TuneConfig(StrictModel):
    """The ``tune:`` section of the load-test job."""

    settings: list[SpecSetting] = Field(min_length=1)
    deployer: str | None = Field(
        default=None, description="'module:factory'; factory(**deployer_args) returns an object "
        "with deploy(setting) -> base URL and teardown(setting). Unset: every setting's url")
    deployer_args: dict[str, Any] = Field(default_factory=dict)
    model: str = Field(description="the `model` sent to every deployed setting")
    api_key_env: str | None = None
    bands: list[tuple[int, int]] = Field(default_factory=lambda: list(DEFAULT_BANDS))
    objective: Objective = "output_throughput"
    max_error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    measure_reference: bool = Field(
        default=True, description="measure loadtest.endpoints once, for speedups per band")

    @model_validator(mode="after")
    def _check(self) -> TuneConfig:
        labels = [s.label for s in self.settings]
        if len(set(labels)) != len(labels):
            raise ValueError(f"tune.settings repeat a setting: {labels}")
        for lo, hi in self.bands:
            if not 1 <= lo <= hi:
                raise ValueError(f"tune.bands: [{lo}, {hi}] must satisfy 1 <= low <= high")
        if self.deployer is None:
            missing = [s.label for s in self.settings if not s.url]
            if missing:
                raise ValueError(f"tune.settings {missing} have no url and tune.deployer is unset:"
                                 " give each setting the URL of an endpoint serving it, or name a "
                                 "deployer ('module:factory')")
        elif ":" not in self.deployer:
            raise ValueError(f"tune.deployer={self.deployer!r} must be 'module:factory'")
        return self


class TuningRun(StrictModel):
    """What a tuning artifact's hash covers."""

    loadtest: LoadTestConfig
    tune: TuneConfig


def tuning_hash(loadtest: LoadTestConfig, tune: TuneConfig) -> str:
    """The config hash recorded in (and checked against) a tuning artifact's manifest."""
    return config_hash(TuningRun(loadtest=loadtest, tune=tune))


# ---------------------------------------------------------------- pure recommendation


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def closed_loop_rows(rows: Sequence[Mapping[str, Any]]) -> dict[int, Mapping[str, Any]]:
    """Closed-loop summary rows keyed by concurrency (rate points are ignored)."""
    return {int(r["concurrency"]): r for r in rows
            if r.get("mode") == "concurrency" and r.get("concurrency") is not None}


def band_label(band: tuple[int, int]) -> str:
    lo, hi = band
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def disqualification(rows: Mapping[int, Mapping[str, Any]], concurrencies: list[int],
                     value_field: str, max_error_rate: float) -> str | None:
    """Why a setting cannot win a band, or None when it can."""
    for c in concurrencies:
        row = rows.get(c)
        if row is None:
            return f"not measured at concurrency {c}"
        err = row.get("error_rate")
        if not _finite(err) or err > max_error_rate:
            return f"error rate {err} > {max_error_rate} at concurrency {c}"
        if not _finite(row.get(value_field)) or row[value_field] <= 0:
            return f"no {value_field} at concurrency {c}"
    return None


def relative(value: float, best: float, higher_is_better: bool) -> float:
    """1 for the best value, less for worse ones."""
    return value / best if higher_is_better else best / value


def geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def band_scores(values: Mapping[str, Mapping[int, float]], concurrencies: list[int],
                higher_is_better: bool) -> dict[str, float]:
    """Geometric mean over the band of each setting's value relative to the best at that point."""
    rel: dict[str, list[float]] = {label: [] for label in values}
    for c in concurrencies:
        at_c = [v[c] for v in values.values()]
        best = max(at_c) if higher_is_better else min(at_c)
        for label, v in values.items():
            rel[label].append(relative(v[c], best, higher_is_better))
    return {label: geomean(r) for label, r in rel.items()}


def reference_speedup(best: Mapping[int, float], reference: Mapping[int, Mapping[str, Any]],
                      value_field: str, higher_is_better: bool) -> float | None:
    """Geometric-mean speedup of the winner over the reference across the band, or None
    when the reference lacks a point of the band."""
    ratios = []
    for c, v in best.items():
        ref = reference.get(c, {}).get(value_field)
        if not _finite(ref) or ref <= 0:
            return None
        ratios.append(v / ref if higher_is_better else ref / v)
    return geomean(ratios)


def band_verdict(by_setting: Mapping[str, Mapping[int, Mapping[str, Any]]], band: tuple[int, int],
                 objective: Objective, max_error_rate: float,
                 reference: Mapping[int, Mapping[str, Any]] | None) -> dict[str, Any]:
    """The recommendation for one band (see the module docstring for the rule)."""
    value_field, higher = OBJECTIVE_FIELDS[objective]
    lo, hi = band
    concs = sorted({c for rows in by_setting.values() for c in rows if lo <= c <= hi})
    out: dict[str, Any] = {"band": band_label(band), "low": lo, "high": hi,
                           "concurrencies": concs, "objective": objective, "field": value_field,
                           "best": None, "score": None, "scores": {}, "values": {},
                           "disqualified": {}, "speedup_vs_reference": None, "reason": None}
    if not concs:
        out["reason"] = "no closed-loop point of this band was measured"
        return out
    values: dict[str, dict[int, float]] = {}
    for label, rows in by_setting.items():
        why = disqualification(rows, concs, value_field, max_error_rate)
        if why is not None:
            out["disqualified"][label] = why
            continue
        values[label] = {c: float(rows[c][value_field]) for c in concs}
    out["values"] = {label: {str(c): v for c, v in vs.items()} for label, vs in values.items()}
    if not values:
        out["reason"] = "every setting was disqualified in this band"
        return out
    scores = band_scores(values, concs, higher)
    best = max(scores, key=lambda label: (scores[label], -list(scores).index(label)))
    out.update(best=best, score=scores[best], scores=scores)
    if reference is not None:
        out["speedup_vs_reference"] = reference_speedup(values[best], reference, value_field,
                                                        higher)
    return out


def recommend(results_by_setting: Mapping[str, Sequence[Mapping[str, Any]]],
              bands: Sequence[tuple[int, int]] = tuple(DEFAULT_BANDS),
              objective: Objective = "output_throughput", max_error_rate: float = 0.0,
              reference: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Per band, the best setting. ``results_by_setting`` maps a setting's label to its summary
    rows (only closed-loop rows count); ``reference`` is the rows of one reference endpoint
    (e.g. the baseline) for the speedup of each band's winner. Pure: no I/O."""
    if objective not in OBJECTIVE_FIELDS:
        raise ValueError(f"objective {objective!r}: use one of {sorted(OBJECTIVE_FIELDS)}")
    by_setting = {label: closed_loop_rows(rows) for label, rows in results_by_setting.items()}
    ref = closed_loop_rows(reference) if reference is not None else None
    return [band_verdict(by_setting, tuple(band), objective, max_error_rate, ref)
            for band in bands]


def format_recommendations(recs: Sequence[Mapping[str, Any]],
                           settings: Mapping[str, Mapping[str, int]]) -> str:
    """A fixed-width table: band, its concurrencies, the winner, its S/K/D, score, speedup."""
    header = ["band", "concurrencies", "best", "S/K/D", "runner-up (score)", "x vs reference"]
    lines = [header]
    for r in recs:
        knobs = settings.get(r["best"] or "", {})
        skd = "/".join(str(knobs[k]) for k in ("num_steps", "eagle_topk", "num_draft_tokens")) \
            if knobs else "-"
        others = sorted(((s, label) for label, s in r["scores"].items() if label != r["best"]),
                        reverse=True)
        runner = f"{others[0][1]} ({others[0][0]:.3f})" if others else "-"
        speed = r["speedup_vs_reference"]
        lines.append([r["band"], ",".join(map(str, r["concurrencies"])) or "-",
                      r["best"] or f"none: {r['reason']}", skd, runner,
                      "-" if speed is None else f"{speed:.2f}"])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in lines)


# ---------------------------------------------------------------- deployers


class Deployer(Protocol):
    """Brings an endpoint serving one setting up, and down again."""

    def deploy(self, setting: SpecSetting) -> str: ...

    def teardown(self, setting: SpecSetting) -> None: ...


class StaticDeployer:
    """Settings already served at known URLs (``tune.settings[i].url``): nothing to deploy."""

    def deploy(self, setting: SpecSetting) -> str:
        if not setting.url:
            raise ValueError(f"tune setting {setting.label} has no url: set it, or name a "
                             f"tune.deployer that deploys settings")
        return setting.url

    def teardown(self, setting: SpecSetting) -> None:
        return None


def load_deployer(tune: TuneConfig) -> Deployer:
    """``tune.deployer`` ('module:factory') called with ``tune.deployer_args``, or a
    ``StaticDeployer`` when unset."""
    if tune.deployer is None:
        return StaticDeployer()
    module_name, _, attr = tune.deployer.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"tune.deployer={tune.deployer!r} cannot be imported ({exc}); name an "
                         f"importable 'module:factory'") from exc
    deployer = factory(**tune.deployer_args)
    if not (callable(getattr(deployer, "deploy", None))
            and callable(getattr(deployer, "teardown", None))):
        raise ValueError(f"tune.deployer={tune.deployer!r} returned {type(deployer).__name__}, "
                         f"which lacks deploy(setting) -> url and teardown(setting)")
    return deployer


# ---------------------------------------------------------------- the sweep


@dataclass
class TuningResult:
    """What ``tune_settings`` measured, recommended and wrote."""

    recommendations: list[dict[str, Any]]
    rows: list[dict[str, Any]]  # every run's summary rows (reference first), ordered by point
    files: dict[str, str]
    settings: dict[str, dict[str, int]] = field(default_factory=dict)  # label -> knobs


def with_endpoints(base: LoadTestConfig, endpoints: list[EndpointConfig], output: str) -> LoadTestConfig:
    """``base`` measuring other endpoints into another directory (validated again)."""
    data = base.model_dump(mode="json")
    data.update(endpoints=[e.model_dump(mode="json") for e in endpoints], output=output)
    return LoadTestConfig.model_validate(data)


def setting_endpoint(tune: TuneConfig, setting: SpecSetting, url: str) -> EndpointConfig:
    return EndpointConfig(name=setting.label, url=url, model=tune.model,
                          api_key_env=tune.api_key_env)


def by_point(rows: list[dict[str, Any]], points: list[str]) -> list[dict[str, Any]]:
    """Rows reordered point-major (reference rows stay first at each point)."""
    order = {p: i for i, p in enumerate(points)}
    return sorted(rows, key=lambda r: order.get(r["point"], len(order)))  # sort is stable


def measure_settings(loadtest: LoadTestConfig, tune: TuneConfig, deploy: Callable[[SpecSetting], str],
                     teardown: Callable[[SpecSetting], None],
                     run: Callable[[LoadTestConfig], Any]) -> dict[str, Any]:
    """deploy -> load test -> teardown per setting (teardown even when the test fails)."""
    results = {}
    for setting in tune.settings:
        url = deploy(setting)
        print(f"[eyas.loadtest] setting {setting.label}: {url}", flush=True)
        out = storage.join(loadtest.output, "settings", setting.label)
        try:
            results[setting.label] = run(with_endpoints(loadtest, [setting_endpoint(tune, setting, url)], out))
        finally:
            teardown(setting)
    return results


def tune_settings(loadtest: LoadTestConfig, tune: TuneConfig, deploy: Callable[[SpecSetting], str],
                  teardown: Callable[[SpecSetting], None],
                  run: Callable[[LoadTestConfig], Any] | None = None) -> TuningResult:
    """Measure the reference (if asked) and every setting, recommend per band, write
    ``tuning.json``, combined plots and ``manifest.json`` under ``loadtest.output``.
    ``run`` defaults to ``run_load_test`` (Ray must be initialized)."""
    from eyas.loadtest.report import clean, write_plots
    from eyas.loadtest.runner import run_load_test

    run = run or run_load_test
    root = loadtest.output
    reference = None
    if tune.measure_reference:
        reference = run(with_endpoints(loadtest, loadtest.endpoints, storage.join(root, "reference")))
    results = measure_settings(loadtest, tune, deploy, teardown, run)
    ref_rows = reference.rows if reference is not None else []
    first_ref = [r for r in ref_rows if r["endpoint"] == loadtest.endpoints[0].name]
    recs = recommend({label: res.rows for label, res in results.items()}, tune.bands,
                     tune.objective, tune.max_error_rate, first_ref if reference else None)
    points = list(dict.fromkeys(r["point"] for res in [reference, *results.values()] if res
                                for r in res.rows))
    rows = by_point(ref_rows + [r for res in results.values() for r in res.rows], points)
    settings = {s.label: s.knobs() for s in tune.settings}
    runs = {label: res.files.get("summary_json", "") for label, res in results.items()}
    files = write_plots(root, rows) | {"tuning": storage.join(root, "tuning.json")}
    doc = {"objective": tune.objective, "bands": [list(b) for b in tune.bands],
           "max_error_rate": tune.max_error_rate, "settings": settings,
           "recommendations": recs, "reference": reference.files if reference else None,
           "runs": runs, "rows": rows}
    storage.write_json(files["tuning"], clean(doc))
    art = storage.Artifact(root)
    art.write_manifest("loadtest_tuning", TuningRun(loadtest=loadtest, tune=tune).model_dump(mode="json"),
                       tuning_hash(loadtest, tune),
                       counts={"settings": len(results), "rows": len(rows)},
                       recommendations={r["band"]: r["best"] for r in recs},
                       files={k: v.rsplit("/", 1)[-1] for k, v in files.items()})
    files["manifest"] = art.manifest_uri
    return TuningResult(recommendations=recs, rows=rows, files=files, settings=settings)
