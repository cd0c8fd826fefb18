"""cluster.yaml is a valid Ray cluster-launcher config for GCP whose node types can host every job
and serve config of the project; the Grafana dashboard covers every metric the code records."""

from __future__ import annotations

import importlib.metadata
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster.yaml"
DASHBOARD = ROOT / "platform" / "eyas" / "dashboards" / "eyas_grafana.json"
# GPUs (count, Ray accelerator type) and vCPUs of the machine types cluster.yaml may use
MACHINES = {"a3-highgpu-8g": (8, "H100", 208), "a3-ultragpu-8g": (8, "H200", 224),
            "g2-standard-8": (1, "L4", 8), "n2-standard-16": (0, None, 16),
            "n2-standard-32": (0, None, 32)}


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER.read_text())


def worker_types(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    head = cluster["head_node_type"]
    return {k: v for k, v in cluster["available_node_types"].items() if k != head}


def test_matches_rays_launcher_schema(cluster) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema validates ray-schema.json")
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(cluster, json.loads(schema_path.read_text()))


def test_passes_rays_own_config_preparation(cluster) -> None:
    """What `ray up` does before it calls the cloud: fill defaults, merge commands, validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(json.loads(json.dumps(cluster)))
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_required_launcher_fields(cluster) -> None:
    provider = cluster["provider"]
    assert provider["type"] == "gcp" and provider["project_id"]
    assert provider["availability_zone"].startswith(provider["region"] + "-")
    assert cluster["cluster_name"] and cluster["auth"]["ssh_user"]
    assert cluster["head_node_type"] in cluster["available_node_types"]
    workers = worker_types(cluster)
    assert sum(t["min_workers"] for t in workers.values()) <= cluster["max_workers"]
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cluster["max_workers"], name


def test_node_resources_match_their_machine_types(cluster) -> None:
    for name, t in cluster["available_node_types"].items():
        machine = t["node_config"]["machineType"]
        assert machine in MACHINES, f"{name}: add {machine} to MACHINES with its GPUs and vCPUs"
        gpus, accel, vcpus = MACHINES[machine]
        res = t["resources"]
        assert res.get("GPU", 0) == gpus and res.get("CPU", 0) <= vcpus, name
        if gpus:
            assert res.get(f"accelerator_type:{accel}") == 1, name
            assert t["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE", name
            items = {i["key"]: i["value"] for i in t["node_config"]["metadata"]["items"]}
            assert items.get("install-nvidia-driver") == "True", name


def test_install_ports_and_credentials(cluster) -> None:
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{importlib.metadata.version('ray')}-")
    assert any('pip install -q -e ".[sglang]"' in c for c in cluster["worker_setup_commands"])
    assert any("pip install -q -e ." in c for c in cluster["head_setup_commands"])
    for name, t in worker_types(cluster).items():
        if t["resources"].get("GPU", 0) == 0:  # CPU workers skip the CUDA-only sglang wheels
            assert all("sglang" not in c for c in t.get("worker_setup_commands", [])), name
    assert cluster["file_mounts"]["/home/ray/eyas"] == "."
    creds = "/home/ray/eyas-credentials"
    assert creds in cluster["file_mounts"]
    env = [o for o in cluster["docker"]["run_options"] if o.startswith("--env ")]
    for var in ("GOOGLE_APPLICATION_CREDENTIALS", "AWS_SHARED_CREDENTIALS_FILE", "HF_TOKEN_PATH"):
        assert any(o.startswith(f"--env {var}={creds}/") for o in env), var
    head = " ".join(cluster["head_start_ray_commands"])
    worker = " ".join(cluster["worker_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" in head and "--dashboard-port=8265" in head
    assert "--metrics-export-port=8080" in head and "--metrics-export-port=8080" in worker
    assert {"**/.venv", "**/artifacts", "**/.git"} <= set(cluster["rsync_exclude"])


def walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every mapping in a YAML tree, with its dotted path."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


def actor_request(m: dict[str, Any]) -> dict[str, Any] | None:
    """GPUs, CPUs and accelerator type one actor / worker / replica of this section asks for."""
    gpus = m.get("num_gpus_per_actor", m.get("num_gpus", 0)) or 0
    gpus = 1 if m.get("use_gpu") is True else gpus  # Ray Train: one GPU per worker
    gpus = max(gpus, m.get("tp_size", 0) or 0)  # an engine's TP workers each need a GPU
    cpus = next((m[k] for k in ("num_cpus_per_actor", "cpus_per_worker", "client_actor_cpus",
                                "num_cpus") if isinstance(m.get(k), int | float)), 0)
    accel = m.get("accelerator_type")
    if not gpus and not cpus and not accel:
        return None
    return {"gpus": gpus, "cpus": cpus, "accel": accel}


def job_requests() -> list[tuple[str, dict[str, Any]]]:
    files = sorted((ROOT / "jobs" / "configs").glob("*.yaml")) + sorted(
        (ROOT / "serve_apps").glob("**/*.yaml"))
    out = []
    for f in files:
        for path, m in walk(yaml.safe_load(f.read_text()) or {}):
            if path == "run":  # run.num_cpus sizes a local Ray, not an actor
                continue
            req = actor_request(m)
            if req is not None:
                out.append((f"{f.relative_to(ROOT)}:{path}", req))
            if isinstance(m.get("tp_size"), int) and isinstance(m.get("num_gpus_per_actor"), int | float):
                assert m["tp_size"] <= m["num_gpus_per_actor"], (
                    f"{f.name}:{path}: tp_size {m['tp_size']} > num_gpus_per_actor "
                    f"{m['num_gpus_per_actor']}: the engine's TP workers need the actor's GPUs")
    return out


def test_some_node_type_hosts_every_job_and_serve_request(cluster) -> None:
    requests = job_requests()
    assert any(r["gpus"] >= 4 for _, r in requests), "no multi-GPU (70B / Scout) config found"
    workers = worker_types(cluster)
    for where, req in requests:
        fits = [name for name, t in workers.items()
                if t["resources"].get("GPU", 0) >= req["gpus"]
                and t["resources"].get("CPU", 0) >= req["cpus"]
                and (req["accel"] is None or f"accelerator_type:{req['accel']}" in t["resources"])]
        assert fits, f"{where} asks for {req}: no node type in cluster.yaml provides it"


RECORDED = re.compile(r"\.(inc|set_gauge|observe)\(\s*\"(eyas_\w+)\"")


def recorded_metrics() -> dict[str, str]:
    """eyas metric name -> kind, from every ``metrics.inc/set_gauge/observe`` call in the code."""
    found = {}
    for f in (ROOT / "platform" / "eyas").rglob("*.py"):
        for kind, name in RECORDED.findall(f.read_text()):
            found[name] = kind
    return found


def test_grafana_dashboard_has_a_panel_per_recorded_metric() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]
    assert all('SessionName=~"$SessionName"' in e for e in exprs)
    metrics = recorded_metrics()
    assert "eyas_data_rows_read_total" in metrics
    for name, kind in metrics.items():
        series = f"ray_{name}_bucket" if kind == "observe" else f"ray_{name}"
        assert any(re.search(rf"\b{series}\{{", e) for e in exprs), (
            f"{name} ({kind}) has no panel: add one to {DASHBOARD.relative_to(ROOT)} "
            f"(Prometheus name {series})")
