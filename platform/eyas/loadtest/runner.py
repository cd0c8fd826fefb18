"""Generate load with Ray client actors and gather the timelines: ``run_load_test(cfg)``.

Load points, in order: every closed-loop concurrency, then every Poisson rate. At each point
every endpoint is measured in turn (point-major, so slow drift in the machines hits all
endpoints alike). All client actors start a phase together at a shared wall-clock instant.

- Closed loop at concurrency C: the C in-flight slots ("lanes") are dealt to ``min(N, C)``
  actors as evenly as possible; each actor runs one asyncio lane per slot, and a lane sends its
  next request only when its previous one has ended, so at most C requests are ever in flight
  (exactly C until the request list runs out). Lane ``g`` starts ``g * ramp_up_s / C`` after
  the phase start. Each lane first sends warm-up requests while any are left (the W warm-ups
  are dealt to actors in proportion to their lanes), then measured ones: with the default
  W = C every lane is warm, every connection open and the ramp-up over before anything is
  measured, and the load never drops between warm-up and measurement. Measured requests are
  dealt in proportion to the lanes; with ``duration_s`` an actor stops issuing
  ``duration_s`` after its first measured request.
- Open loop at rate λ: first a closed-loop warm-up phase (W lanes), then one seeded Poisson
  arrival schedule (exponential gaps with mean 1/λ, the first arrival at 0) per point,
  identical for every endpoint, dealt round-robin to the actors; each request is sent at its
  arrival time whatever is still in flight.

Request ``i`` of a point uses prompt ``i % len(prompts)``, for every endpoint.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from eyas.api_key import read_api_key
from eyas.loadtest.client import Clock, Target, build_body, make_target, new_session, send_request
from eyas.loadtest.config import EndpointConfig, LoadTestConfig
from eyas.loadtest.metrics import RequestRecord, summarize
from eyas.loadtest.workloads import Prompt, load_prompts

SERVE_PROXY = "{serve_proxy}"  # URL host placeholder: a node that runs a Serve proxy
START_LEAD_S = 0.3  # time for a phase's plans to reach every actor before the common start
RATE_WARMUP = 8  # default warm-up requests at an open-loop point


@dataclass(frozen=True)
class Point:
    """One load level: a closed-loop concurrency or an open-loop rate (requests/s)."""

    concurrency: int | None = None
    rate: float | None = None

    @property
    def label(self) -> str:
        return f"c{self.concurrency}" if self.concurrency is not None else f"rate{self.rate:g}"


@dataclass
class ShardPlan:
    """One actor's share of one phase (warm-up or measured) of one endpoint at one point."""

    endpoint: str
    point: str
    start_at: float
    timeout_s: float
    concurrency: int | None = None  # closed loop: lanes in this actor
    lane_first: int = 0  # closed loop: global number of this actor's first lane
    total_lanes: int = 1
    ramp_up_s: float = 0.0
    warmup_indices: list[int] = field(default_factory=list)  # closed loop, sent first
    indices: list[int] | None = None  # request indices; None = unbounded (duration mode)
    index_first: int = 0  # unbounded closed loop: first, first + stride, ...
    index_stride: int = 1
    arrivals: list[float] | None = None  # open loop: offsets from start_at, one per index
    duration_s: float | None = None

    @property
    def total(self) -> int | None:
        """Requests this plan sends (warm-up included); None when bounded by time only."""
        return None if self.indices is None else len(self.indices) + len(self.warmup_indices)


@dataclass
class ShardResult:
    records: list[RequestRecord]  # measured requests only
    max_in_flight: int
    warmup_failed: int = 0


@dataclass
class LoadTestResult:
    """What ``run_load_test`` measured and wrote."""

    rows: list[dict[str, Any]]  # one summary per endpoint x point, in sweep order
    files: dict[str, str]  # name -> URI of every written file
    records: list[RequestRecord] = field(repr=False, default_factory=list)  # measured only


def sweep_points(cfg: LoadTestConfig) -> list[Point]:
    return [Point(concurrency=c) for c in cfg.concurrencies] + [
        Point(rate=r) for r in cfg.request_rates]


def poisson_arrivals(rate: float, seed: int, n: int | None, duration_s: float | None) -> list[float]:
    """Arrival offsets (s): first at 0, then exponential gaps of mean ``1/rate``; stops after
    ``n`` arrivals or past ``duration_s``, whichever comes first."""
    if n is None and duration_s is None:
        raise ValueError("poisson_arrivals needs n or duration_s, else the schedule is endless")
    rng, t, out = random.Random(seed), 0.0, []
    while (n is None or len(out) < n) and (duration_s is None or t < duration_s):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def split_weighted(total: int, weights: list[int]) -> list[int]:
    """``total`` split into integer parts proportional to ``weights`` (largest remainders)."""
    wsum = sum(weights)
    exact = [total * w / wsum for w in weights]
    parts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts


def _ranges(counts: list[int]) -> list[list[int]]:
    """Consecutive index ranges of the given sizes: [2, 1] -> [[0, 1], [2]]."""
    out, first = [], 0
    for m in counts:
        out.append(list(range(first, first + m)))
        first += m
    return out


def closed_loop_plans(base: dict[str, Any], concurrency: int, n: int | None, warmup: int,
                      num_actors: int, ramp_up_s: float = 0.0) -> list[ShardPlan]:
    """Lanes split evenly over ``min(num_actors, concurrency)`` actors; warm-up and measured
    requests in proportion to the lanes (unbounded, interleaved indices when ``n`` is None)."""
    k = min(num_actors, concurrency)
    lanes = split_weighted(concurrency, [1] * k)
    warm = _ranges(split_weighted(warmup, lanes))
    measured = _ranges(split_weighted(n, lanes)) if n is not None else [None] * k
    plans = []
    for a in range(k):
        plans.append(ShardPlan(**base, concurrency=lanes[a], lane_first=sum(lanes[:a]),
                               total_lanes=concurrency, ramp_up_s=ramp_up_s,
                               warmup_indices=warm[a], indices=measured[a], index_first=a,
                               index_stride=k))
    return plans


def open_loop_plans(base: dict[str, Any], arrivals: list[float], num_actors: int) -> list[ShardPlan]:
    """Arrivals dealt round-robin: actor a sends requests a, a + N, a + 2N, ..."""
    k = min(num_actors, len(arrivals))
    return [ShardPlan(**base, indices=list(range(a, len(arrivals), k)), arrivals=arrivals[a::k])
            for a in range(k)]


def warmup_count(cfg: LoadTestConfig, point: Point) -> int:
    """Warm-up requests at a point: as configured, else C (closed loop) or RATE_WARMUP."""
    if cfg.warmup_requests is not None:
        return cfg.warmup_requests
    return point.concurrency if point.concurrency is not None else RATE_WARMUP


def point_phases(cfg: LoadTestConfig, point: Point, endpoint: str,
                 num_actors: int) -> list[list[ShardPlan]]:
    """The phases of one endpoint at one point, each a list of per-actor plans: one closed-loop
    phase (warm-up inside), or a warm-up phase (if any) then the open-loop phase."""
    base = {"endpoint": endpoint, "point": point.label, "start_at": 0.0,
            "timeout_s": cfg.request_timeout_s}
    w = warmup_count(cfg, point)
    if point.concurrency is not None:
        return [closed_loop_plans({**base, "duration_s": cfg.duration_s}, point.concurrency,
                                  cfg.requests_per_point, w, num_actors, cfg.ramp_up_s)]
    assert point.rate is not None
    arrivals = poisson_arrivals(point.rate, cfg.seed, cfg.requests_per_point, cfg.duration_s)
    phases = [closed_loop_plans(base, w, 0, w, num_actors)] if w else []
    return [*phases, open_loop_plans({**base, "duration_s": cfg.duration_s}, arrivals, num_actors)]


class ClientWorker:
    """Load generator running in one Ray actor (an asyncio event loop); usable without Ray."""

    def __init__(self) -> None:
        self._clock = Clock()
        self._session = None
        self._endpoints: dict[str, tuple[Target, list[dict[str, Any]]]] = {}
        self._done = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._warmup_failed = 0

    async def set_endpoint(self, name: str, target: Target, bodies: list[dict[str, Any]]) -> None:
        """Remember an endpoint's URL, headers and request bodies (sent once, used per point)."""
        self._endpoints[name] = (target, bodies)

    async def progress(self) -> int:
        """Requests finished in the current ``run`` call."""
        return self._done

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run(self, plan: ShardPlan) -> ShardResult:
        """Execute one plan; returns the measured requests' records (warm-up ones are dropped)
        and the most requests this actor had in flight."""
        if self._session is None:
            self._session = new_session()
        self._done, self._max_in_flight, self._warmup_failed = 0, 0, 0
        if plan.arrivals is not None:
            records = await self._open_loop(plan)
        else:
            records = await self._closed_loop(plan)
        return ShardResult(records=records, max_in_flight=self._max_in_flight,
                           warmup_failed=self._warmup_failed)

    async def _sleep_until(self, t: float) -> None:
        await asyncio.sleep(max(0.0, t - self._clock.now()))

    async def _one(self, plan: ShardPlan, index: int, warmup: bool = False) -> RequestRecord:
        target, bodies = self._endpoints[plan.endpoint]
        rec = RequestRecord(endpoint=plan.endpoint, point=plan.point, index=index, start=0.0,
                            warmup=warmup)
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            return await send_request(self._session, target, bodies[index % len(bodies)], rec,
                                      self._clock, plan.timeout_s)
        finally:
            self._in_flight -= 1
            self._done += 1

    def _indices(self, plan: ShardPlan) -> Iterator[int]:
        if plan.indices is not None:
            return iter(plan.indices)
        return itertools.count(plan.index_first, plan.index_stride)

    async def _closed_loop(self, plan: ShardPlan) -> list[RequestRecord]:
        warm, measured, records = iter(plan.warmup_indices), self._indices(plan), []
        deadline: float | None = None

        async def lane(g: int) -> None:
            nonlocal deadline
            await self._sleep_until(plan.start_at + g * plan.ramp_up_s / plan.total_lanes)
            for index in warm:  # shared iterators: each lane takes the next index
                rec = await self._one(plan, index, warmup=True)
                self._warmup_failed += not rec.ok
            for index in measured:
                if deadline is None and plan.duration_s is not None:
                    deadline = self._clock.now() + plan.duration_s
                if deadline is not None and self._clock.now() >= deadline:
                    return
                records.append(await self._one(plan, index))

        lanes = range(plan.lane_first, plan.lane_first + (plan.concurrency or 1))
        await asyncio.gather(*(lane(g) for g in lanes))
        return records

    async def _open_loop(self, plan: ShardPlan) -> list[RequestRecord]:
        assert plan.indices is not None and plan.arrivals is not None
        tasks = []  # the arrivals already end before duration_s
        for index, offset in zip(plan.indices, plan.arrivals, strict=True):
            await self._sleep_until(plan.start_at + offset)
            tasks.append(asyncio.create_task(self._one(plan, index)))
        return list(await asyncio.gather(*tasks))


class Progress:
    """A tqdm bar on a terminal; elsewhere (``ray job logs``, CI, a file), where a bar's carriage
    returns make one endless line, a plain line every ``every_s`` seconds and one at the end."""

    def __init__(self, desc: str, total: int | None, enabled: bool, every_s: float = 10.0,
                 stream: Any = None) -> None:
        self.desc, self.total, self.enabled, self.n = desc, total, enabled, 0
        self.every_s, self._last_print, self._printed = every_s, time.time(), -1
        self.stream = stream if stream is not None else sys.stderr
        self._bar = None
        if enabled and _is_terminal(self.stream):
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="req", leave=False,
                                 file=self.stream)
            except ImportError:
                self._bar = None

    def update(self, n: int) -> None:
        if not self.enabled or n == self.n:
            return
        if self._bar is not None:
            self._bar.update(n - self.n)
        elif time.time() - self._last_print >= self.every_s:
            self._line(n)
        self.n = n

    def _line(self, n: int) -> None:
        print(f"{self.desc}: {n}/{self.total or '?'} requests", file=self.stream, flush=True)
        self._last_print, self._printed = time.time(), n

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self._printed != self.n:
            self._line(self.n)


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def run_phase(actors: list[Any], plans: list[ShardPlan], desc: str, progress: bool) -> ShardResult:
    """Run one plan per actor, showing progress; all records and the summed in-flight maxima
    (an upper bound of the in-flight requests across actors)."""
    import ray

    start_at = time.time() + START_LEAD_S
    refs = [actor.run.remote(replace(plan, start_at=start_at))
            for actor, plan in zip(actors, plans, strict=False)]
    totals = [p.total for p in plans]
    total = None if None in totals else sum(t for t in totals if t is not None)
    bar = Progress(desc, total, progress)
    pending = refs
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        bar.update(sum(ray.get([a.progress.remote() for a in actors[: len(plans)]])))
    bar.close()
    results = ray.get(refs)
    records = sorted((r for res in results for r in res.records), key=lambda r: r.index)
    return ShardResult(records=records, max_in_flight=sum(r.max_in_flight for r in results),
                       warmup_failed=sum(r.warmup_failed for r in results))


def endpoint_key(ep: EndpointConfig) -> str | None:
    """The endpoint's bearer token from ``api_key_env`` or ``api_key_file`` (None: no auth)."""
    return read_api_key(ep.api_key_file, ep.api_key_env, f"endpoint {ep.name}: ")


def endpoint_target(ep: EndpointConfig, chat: bool, proxy_host: Callable[[], str] | None = None
                    ) -> Target:
    """The endpoint's route and headers (its API key read here, ``{serve_proxy}`` resolved)."""
    return make_target(resolve_url(ep.url, proxy_host or serve_proxy_host), chat,
                       endpoint_key(ep))


def resolve_url(url: str, proxy_host: Callable[[], str]) -> str:
    """``url`` with the ``{serve_proxy}`` host replaced by ``proxy_host()`` (called only then)."""
    return url.replace(SERVE_PROXY, proxy_host()) if SERVE_PROXY in url else url


def serve_proxy_host() -> str:
    """The IP of a node that runs a Serve HTTP proxy, as every node can reach it.

    Ray Serve 2.60 runs proxies only on the controller's node and on nodes with replicas
    (``ray/serve/_private/controller.py`` ``_update_proxy_nodes``), so ``127.0.0.1`` from a
    client actor on a CPU node reaches nothing. The controller's node always has one: look it
    up through the state API; fall back to this driver's node (a ``ray job submit`` driver runs
    on the head, where the controller runs)."""
    import ray

    return _controller_node_ip() or ray.util.get_node_ip_address()


def _controller_node_ip() -> str | None:
    """The IP of the live Serve controller's node (None: no Serve yet, no state API)."""
    import ray

    try:
        from ray.util.state import list_actors

        actors = list_actors(filters=[("class_name", "=", "ServeController"),
                                      ("state", "=", "ALIVE")])
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    except Exception:
        return None
    return next((ips[a.node_id] for a in actors if a.node_id in ips), None)


def capacity_warnings(cfg: LoadTestConfig, infos: dict[str, dict[str, Any] | None]) -> list[str]:
    """Warnings for endpoints whose ``/v1/server_info`` shows a running-request cap below the
    largest concurrency (SGLang caps speculative engines at 48 unless max_running_requests is
    set): such a comparison measures the cap, not the engine."""
    top = max(cfg.concurrencies, default=0)
    out = []
    for name, info in infos.items():
        backend = (info or {}).get("backend_info") or {}
        cap = backend.get("max_running_requests")
        if isinstance(cap, int) and cap < top:
            out.append(f"endpoint {name}: the server runs at most {cap} requests at once per "
                       f"replica (max_running_requests) but the sweep goes to concurrency {top}; "
                       "set the same sglang.max_running_requests >= that in every app")
    return out


def server_info(target: Target, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """``GET /v1/server_info`` next to the target's completions route (None when unavailable)."""
    import json
    import urllib.request

    base = target.url.rsplit("/v1/", 1)[0]
    headers = {k: v for k, v in target.headers.items() if k == "Authorization"}
    try:
        req = urllib.request.Request(base + "/v1/server_info", headers=headers)
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except Exception:  # another server kind, auth, network: no warning then
        return None


def round_counts(info: dict[str, Any] | None) -> dict[str, int] | None:
    """Decode rounds per speculation setting in a ``/v1/server_info`` answer (the eyas engine's
    ``backend_info.speculation_rounds``; empty before the first round); None when the server
    reports none."""
    rounds = ((info or {}).get("backend_info") or {}).get("speculation_rounds")
    return None if rounds is None else {name: int(r["rounds"]) for name, r in rounds.items()}


def round_shares(before: dict[str, int] | None, after: dict[str, int] | None
                 ) -> dict[str, float] | None:
    """Each setting's share of the decode rounds run between two ``round_counts``; None when
    either is missing, nothing ran, or a count went down (another replica answered: with
    several replicas per endpoint the reads may hit different ones)."""
    if before is None or after is None:
        return None
    delta = {name: n - before.get(name, 0) for name, n in after.items()}
    total = sum(delta.values())
    if total <= 0 or min(delta.values()) < 0 or set(before) - set(after):
        return None
    return {name: d / total for name, d in sorted(delta.items()) if d}


def request_bodies(cfg: LoadTestConfig, ep: EndpointConfig,
                   prompts: list[Prompt]) -> list[dict[str, Any]]:
    """One request body per prompt for ``ep``; a prompt with its own output length (the random
    and sharegpt workloads) asks for exactly that many tokens: max_tokens with ignore_eos."""
    return [build_body(p, ep.model, p.output_len or cfg.request_max_tokens, cfg.temperature,
                       cfg.ignore_eos or p.output_len is not None, cfg.continuous_usage_stats,
                       cfg.extra_body) for p in prompts]


def start_actors(cfg: LoadTestConfig, targets: dict[str, Target]) -> list[Any]:
    """``num_client_actors`` client actors, spread over nodes, each told every endpoint
    (``targets``: ``endpoint_target`` per endpoint name)."""
    import ray

    prompts = load_prompts(cfg.workload, cfg.seed, cfg.endpoints[0].model, cfg.max_tokens)
    actor_cls = ray.remote(num_cpus=cfg.client_actor_cpus, scheduling_strategy="SPREAD")(ClientWorker)
    actors = [actor_cls.remote() for _ in range(cfg.num_client_actors)]
    calls = []
    infos = {}
    for ep in cfg.endpoints:
        target = targets[ep.name]
        infos[ep.name] = server_info(target)
        bodies_ref = ray.put(request_bodies(cfg, ep, prompts))
        calls += [a.set_endpoint.remote(ep.name, target, bodies_ref) for a in actors]
    ray.get(calls)
    for warning in capacity_warnings(cfg, infos):
        print(f"[eyas.loadtest] WARNING: {warning}", file=sys.stderr, flush=True)
    return actors


def stop_actors(actors: list[Any]) -> None:
    import ray

    ray.get([a.close.remote() for a in actors])
    for a in actors:
        ray.kill(a)


def measure_point(cfg: LoadTestConfig, actors: list[Any], point: Point, ep: EndpointConfig,
                  target: Target) -> tuple[dict[str, Any], list[RequestRecord]]:
    """Warm up, then measure one endpoint at one point; its summary row and its records. The
    row's ``speculation_shares``: the share of the server's decode rounds per speculation
    setting over the point, warm-up included (from ``/v1/server_info`` before and after)."""
    before = round_counts(server_info(target))
    results = [run_phase(actors, plans, f"{ep.name} {point.label}", cfg.progress)
               for plans in point_phases(cfg, point, ep.name, len(actors))]
    shares = round_shares(before, round_counts(server_info(target)))
    res = results[-1]  # a separate warm-up phase returns no records
    row = {"endpoint": ep.name, "point": point.label,
           "mode": "concurrency" if point.concurrency is not None else "rate",
           "concurrency": point.concurrency, "request_rate": point.rate,
           "max_in_flight": res.max_in_flight,
           "warmup_requests": warmup_count(cfg, point),
           "warmup_failed": sum(r.warmup_failed for r in results),
           **summarize(res.records, cfg.slo.ttft_ms, cfg.slo.tpot_ms),
           "speculation_shares": shares}
    return row, res.records


def run_load_test(cfg: LoadTestConfig) -> LoadTestResult:
    """Run the whole sweep on the current Ray cluster (``ray.init`` first), write the results
    under ``cfg.output`` (requests.jsonl, summary.json/.csv, plots, manifest.json)."""
    from eyas.loadtest.report import write_results

    targets = {ep.name: endpoint_target(ep, cfg.workload.chat) for ep in cfg.endpoints}
    actors = start_actors(cfg, targets)
    rows: list[dict[str, Any]] = []
    records: list[RequestRecord] = []
    try:
        for point in sweep_points(cfg):
            for ep in cfg.endpoints:
                row, recs = measure_point(cfg, actors, point, ep, targets[ep.name])
                rows.append(row)
                records.extend(recs)
    finally:
        stop_actors(actors)
    files = write_results(cfg, rows, records)
    return LoadTestResult(rows=rows, files=files, records=records)
