"""A Serve replica killed under load (issue 11): only the requests in flight at the kill fail,
each as ``replica_lost`` (Ray's proxy answers them with a plain-text 500), later requests
succeed, and service is back within 30 s.

The load is the project's own load-test client (``runner.ClientWorker`` in this process, closed
loop, ``client.send_request`` per request), so the error kind and the recovery time are the
ones a load-test report shows (``metrics.summarize``).
"""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest

from conftest import free_port

pytestmark = pytest.mark.integration

MODEL = "stories260k"
APP = "faults"
CONCURRENCY = 12
REQUESTS = 160
WARMUP = CONCURRENCY
KILL_AFTER = 50  # measured requests finished before the kill
MAX_TOKENS = 8
MAX_ONGOING = 4  # generation requests the replica runs at once; the rest wait in it
RECOVERY_BOUND_S = 30.0
BODY_TIMEOUT_S = 5.0  # the app's body_timeout_s: bounds a request Ray re-sends without its body


@pytest.fixture(scope="module")
def url(ray_local, stories260k):
    """One eyas app (stories260k, one replica) on its own Serve instance; shut down after."""
    from ray import serve

    from eyas.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model": str(stories260k), "served_model_name": MODEL,
            "engine": {"max_batch_size": 4, "num_threads": 1}, "body_timeout_s": BODY_TIMEOUT_S,
            "deployment": {"num_replicas": 1, "max_ongoing_requests": MAX_ONGOING,
                           "ray_actor_options": {"num_cpus": 0.5}}}
    try:
        serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
        yield f"http://127.0.0.1:{port}/{APP}"
    finally:
        serve.shutdown()


def replica_names() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{APP}#"))


def kill_replica(name: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


async def load_with_kill(url: str) -> tuple[list, float, float]:
    """Closed-loop load; once KILL_AFTER measured requests are done, kill the replica.
    Returns (measured records, kill start, kill end) on the load-test client's clock."""
    from eyas.loadtest.client import Clock, build_body, make_target
    from eyas.loadtest.runner import ClientWorker, closed_loop_plans
    from eyas.loadtest.workloads import Prompt

    clock = Clock()
    prompts = ["Once upon a time", "The little dog", "Tom and Lily went to the park", "One day"]
    bodies = [build_body(Prompt(text=p), MODEL, MAX_TOKENS, 0.0, ignore_eos=True)
              for p in prompts]
    worker = ClientWorker()
    await worker.set_endpoint("eyas", make_target(url, chat=False, api_key=None), bodies)
    [plan] = closed_loop_plans({"endpoint": "eyas", "point": f"c{CONCURRENCY}",
                                "start_at": clock.now(), "timeout_s": 90.0},
                               CONCURRENCY, REQUESTS, WARMUP, num_actors=1)
    [victim] = replica_names()
    kill: dict[str, float] = {}

    async def killer() -> None:
        while await worker.progress() < WARMUP + KILL_AFTER:
            await asyncio.sleep(0.02)
        kill["start"] = clock.now()
        await asyncio.to_thread(kill_replica, victim)
        kill["end"] = clock.now()

    try:
        result, _ = await asyncio.gather(worker.run(plan), killer())
    finally:
        await worker.close()
    return result.records, kill["start"], kill["end"]


def test_killed_replica_loses_only_in_flight_requests_and_recovers(url) -> None:
    from eyas.loadtest.metrics import recovery_s, summarize

    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    [victim] = replica_names()
    records, kill_start, kill_end = asyncio.run(load_with_kill(url))
    assert len(records) == REQUESTS

    failed = [r for r in records if not r.ok]
    kinds = {(r.error_kind, r.http_status, r.error) for r in failed}
    assert failed, "the kill failed no request: the replica was idle or not killed"
    # Lost with the replica, counted as replica_lost: those still waiting in it get Ray's
    # plain-text 500; those it was already streaming (200 sent, at most max_ongoing_requests)
    # are cut mid-body. Rarely (3 times in CI) Ray's proxy hands a request the dead replica had
    # taken to the new replica WITHOUT its body: once that replica is up (within the recovery
    # bound) the app answers its own JSON 408 ("0 bytes came") after body_timeout_s. Lost with
    # the replica too, but an answer of the app: http_408.
    lost = [r for r in failed if r.error_kind == "replica_lost"]
    stranded = [r for r in failed if r.error_kind == "http_408" and "(0 bytes came)" in r.error]
    assert len(lost) + len(stranded) == len(failed), kinds
    cut = [r for r in lost if r.http_status == 200]
    assert all(r.http_status == 500 and not r.chunk_times_s for r in lost if r not in cut), kinds
    assert len(cut) <= MAX_ONGOING, kinds
    # Only the requests in flight at the kill: each lane had at most one, sent before the kill
    # returned, and the client learned of the loss at once.
    assert len(failed) <= CONCURRENCY, kinds
    assert all(r.start <= kill_end for r in failed), [r.start - kill_end for r in failed]
    assert all(r.end - kill_start <= 10.0 for r in lost), [r.end - kill_start for r in lost]
    assert all(r.end - kill_start <= RECOVERY_BOUND_S + BODY_TIMEOUT_S for r in stranded), \
        [r.end - kill_start for r in stranded]
    # Whatever was sent after the first loss reached the client succeeded.
    first_loss = min(r.end for r in failed)
    later = [r for r in records if r.start >= first_loss]
    assert later and all(r.ok for r in later), [(r.error_kind, r.error) for r in later if not r.ok]
    assert sum(r.ok for r in records) == REQUESTS - len(failed)

    # Back within 30 s: the project's recovery metric, and a fresh request after the kill.
    rec = recovery_s(records)
    assert rec is not None and not math.isnan(rec) and 0 <= rec <= RECOVERY_BOUND_S, rec
    back = min(r.end for r in records if r.ok and r.start >= kill_end)
    assert back - kill_start <= RECOVERY_BOUND_S, back - kill_start
    row = summarize(records)
    assert row["replica_lost"] == len(lost) and row["recovery_s"] == rec
    assert row["errors_by_kind"] == {k: v for k, v in
                                     (("http_408", len(stranded)), ("replica_lost", len(lost)))
                                     if v}

    # Serve replaced the replica; the app answers normally.
    replacement = replica_names()
    assert len(replacement) == 1 and replacement != [victim], replacement
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    print(f"\nreplica_lost={len(lost)} cut_streams={len(cut)} recovery_s={rec:.2f} "
          f"back_after_kill_s={back - kill_start:.2f}")
