"""The GPU path read against sglang 0.5.23 and Ray 2.60 (issue 9), checked without a GPU.

Each test names the issue item it guards. Upstream paths are inside the wheels
(``pip download --no-deps sglang==0.5.23 ray==2.60.0``): sglang's are under ``sglang/srt/``,
Ray's under ``ray/``.
"""

from __future__ import annotations

import re
import sys
import tomllib
import types
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from eyas.config import load_config, validate_config
from eyas.engine.sampling import SamplingParams
from eyas.loadtest import runner
from eyas.loadtest.config import EndpointConfig, LoadTestConfig
from eyas.loadtest.job import LoadTestJobConfig
from eyas.serve.backends import sglang_engine as sg
from eyas.serve.config import ServeConfig

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())
CONFIGS = ROOT / "jobs" / "configs"
# sglang version -> (torch it pins, that torch's CUDA major, minimum NVIDIA driver for it)
STACK = {"0.5.23": ("2.14.1", 13, 580)}


def serve_apps() -> dict[str, dict[str, Any]]:
    """application name -> application, over every serve_apps/*.yaml."""
    apps = [app for f in sorted((ROOT / "serve_apps").glob("*.yaml"))
            for app in yaml.safe_load(f.read_text())["applications"]]
    out = {app["name"]: app for app in apps}
    assert len(out) == len(apps), "two serve apps share a name"
    return out


def sglang_apps() -> dict[str, tuple[dict[str, Any], ServeConfig]]:
    return {name: (app, c) for name, app in serve_apps().items()
            if (c := validate_config(ServeConfig, app["args"], source=name)).backend == "sglang"}


GPU_LOAD_TESTS = sorted(p for p in CONFIGS.glob("load_test_*.yaml")
                        if re.search(r"llama|scout|70b|8b", p.name))


def gpu_nodes() -> dict[str, dict[str, Any]]:
    return {k: v for k, v in CLUSTER["available_node_types"].items()
            if v["resources"].get("GPU", 0) > 0}


# ----------------------------------------------------------------------------- item 1


def test_item1_one_pinned_gpu_stack() -> None:
    """sglang pins torch built for CUDA 13 (driver >= 580.65): pyproject, the container image
    and the host image must agree, and the README must say so."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["sglang"]
    pins = dict(re.fullmatch(r"([\w-]+)==([\w.]+)", req).groups() for req in extra)
    version = pins["sglang"]
    assert version in STACK, f"sglang=={version}: add its torch / CUDA / driver to STACK"
    torch_version, cuda_major, driver = STACK[version]
    assert pins.get("torch") == torch_version
    image = CLUSTER["docker"]["image"]
    cuda_tag = re.search(r"-cu(\d+)$", image)
    assert cuda_tag and int(cuda_tag.group(1)) // 10 == cuda_major, image
    for name, node in gpu_nodes().items():
        (disk,) = node["node_config"]["disks"]
        family = disk["initializeParams"]["sourceImage"]
        drv = re.search(r"nvidia-(\d+)$", family)
        assert drv and int(drv.group(1)) >= driver, f"{name}: {family} (needs driver >= {driver})"
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## On a GPU cluster (GCP)", 1)[1].split("\n## ", 1)[0]
    for claim in (f"sglang {version}", f"torch {torch_version}", f"CUDA {cuda_major}",
                  f"{driver}", image):
        assert claim in section, f"README's GPU cluster section must state {claim!r}"


# ----------------------------------------------------------------------------- item 2


def test_item2_disk_types_are_urls_gcp_accepts() -> None:
    """Ray's GCP provider expands only machineType and acceleratorType to URLs
    (ray/autoscaler/_private/gcp/node.py); a bare diskType is rejected by GCP."""
    zone = CLUSTER["provider"]["availability_zone"]
    for name, node in CLUSTER["available_node_types"].items():
        for disk in node["node_config"].get("disks", []):
            dtype = disk.get("initializeParams", {}).get("diskType")
            if dtype is None:
                continue
            m = re.fullmatch(r"(?:.*/)?zones/([\w-]+)/diskTypes/[\w-]+", dtype)
            assert m, f"{name}: diskType {dtype!r} is not zones/<zone>/diskTypes/<type>"
            assert m.group(1) == zone, f"{name}: diskType zone {m.group(1)} != {zone}"


# ----------------------------------------------------------------------------- item 4


@pytest.mark.parametrize("path", GPU_LOAD_TESTS, ids=lambda p: p.name)
def test_item4_gpu_load_tests_do_not_target_the_client_node(path: Path) -> None:
    """Serve 2.60 runs proxies on the head and on replica nodes only
    (ray/serve/_private/controller.py _update_proxy_nodes): loopback from a client actor on
    a cpu node reaches nothing."""
    cfg = load_config(LoadTestJobConfig, path)
    urls = [e.url for e in cfg.loadtest.endpoints]
    urls += [s.url for s in (cfg.tune.settings if cfg.tune else []) if s.url]
    for url in urls:
        host = urlparse(url.replace(runner.SERVE_PROXY, "proxy")).hostname
        assert host not in ("127.0.0.1", "localhost", "0.0.0.0"), f"{path.name}: {url}"


def test_item4_proxy_placeholder_resolved_at_run_time(monkeypatch) -> None:
    calls = []

    def host() -> str:
        calls.append(1)
        return "10.0.0.2"

    assert runner.resolve_url("http://{serve_proxy}:8000/eagle3/v1", host) == \
        "http://10.0.0.2:8000/eagle3/v1"
    assert runner.resolve_url("http://h:8000/v1", host) == "http://h:8000/v1" and len(calls) == 1
    ep = EndpointConfig(name="e", url="http://{serve_proxy}:8000/eagle3/v1", model="m")
    target = runner.endpoint_target(ep, True, lambda: "10.0.0.9")
    assert target.url == "http://10.0.0.9:8000/eagle3/v1/chat/completions"


def test_item4_serve_proxy_host_is_the_controller_node(monkeypatch) -> None:
    import ray
    import ray.util.state

    ctl = types.SimpleNamespace(node_id="n-head")
    monkeypatch.setattr(ray.util.state, "list_actors", lambda filters: [ctl])
    monkeypatch.setattr(ray, "nodes", lambda: [
        {"NodeID": "n-cpu", "NodeManagerAddress": "10.0.0.5", "Alive": True},
        {"NodeID": "n-head", "NodeManagerAddress": "10.0.0.1", "Alive": True}])
    assert runner.serve_proxy_host() == "10.0.0.1"

    def no_state(filters):
        raise RuntimeError("no state API")

    monkeypatch.setattr(ray.util.state, "list_actors", no_state)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.7")
    assert runner.serve_proxy_host() == "10.0.0.7"  # the driver's node (the head for a job)


# ----------------------------------------------------------------------------- item 5


def mounted(path: str) -> bool:
    return any(path.startswith(dest.rstrip("/") + "/") for dest in CLUSTER["file_mounts"])


def docker_env() -> set[str]:
    return {o.split()[1].split("=")[0] for o in CLUSTER["docker"]["run_options"]
            if o.startswith("--env ")}


def test_item5_gpu_apps_get_their_api_key_on_every_node() -> None:
    """Nothing in runtime_env (ServeConfig refuses it: Ray shows it in plain text): a key file
    under a cluster.yaml file mount, or a variable the containers get."""
    for name, (_, c) in sglang_apps().items():
        if c.api_key_file:
            assert mounted(c.api_key_file), f"{name}: {c.api_key_file} is on no node"
            key_name = Path(c.api_key_file).name
            assert key_name in (ROOT / "cluster.yaml").read_text().split("available_node_types")[0], (
                f"{name}: cluster.yaml's header must list {key_name} among the credentials")
        if c.api_key_env:
            assert c.api_key_env in docker_env(), f"{name}: nothing provisions {c.api_key_env}"


def app_for(url: str, model: str) -> tuple[str, ServeConfig]:
    """The serve app (file, config) a load-test endpoint targets: its route and model name."""
    path = urlparse(url.replace(runner.SERVE_PROXY, "proxy")).path.removesuffix("/v1")
    found = [(n, c) for n, (app, c) in sglang_apps().items()
             if app["route_prefix"] == path and c.model_name == model]
    assert len(found) == 1, f"{url} ({model}): {len(found)} serve apps match, want 1"
    return found[0]


@pytest.mark.parametrize("path", [p for p in GPU_LOAD_TESTS if "tune" not in p.name],
                         ids=lambda p: p.name)
def test_item5_item13_load_tests_target_existing_apps_with_their_key(path: Path) -> None:
    cfg = load_config(LoadTestJobConfig, path).loadtest
    for ep in cfg.endpoints:
        name, app = app_for(ep.url, ep.model)
        assert (ep.api_key_file, ep.api_key_env) == (app.api_key_file, app.api_key_env), (
            f"{path.name} endpoint {ep.name}: its key source differs from {name}'s")


def test_item5_endpoint_key_from_file(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("s3cret\n")
    ep = EndpointConfig(name="e", url="http://h:1/v1", model="m", api_key_file=str(key))
    assert runner.endpoint_target(ep, True).headers["Authorization"] == "Bearer s3cret"
    with pytest.raises(ValueError, match="cannot be read"):
        runner.endpoint_key(EndpointConfig(name="e", url="u", model="m",
                                           api_key_file=str(tmp_path / "none")))
    with pytest.raises(ValueError, match="not both"):
        EndpointConfig(name="e", url="u", model="m", api_key_file="f", api_key_env="E")


# ----------------------------------------------------------------------------- item 6


def recipe_targets(recipe: str) -> dict[str, str]:
    """'file:key.path' -> value of every ``target`` key in the recipe's stage configs."""
    out = {}
    for f in sorted(CONFIGS.glob(f"*_{recipe}.yaml")):
        def walk(node: Any, where: str, f: Path = f) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    if k == "target" and isinstance(v, str):
                        out[f"{f.name}:{where}{k}"] = v
                    walk(v, f"{where}{k}.")
        walk(yaml.safe_load(f.read_text()), "")
    return out


@pytest.mark.parametrize("recipe", ["llama31_8b", "llama33_70b", "llama4_scout"])
def test_item6_one_target_per_recipe_that_every_node_can_load(recipe: str) -> None:
    targets = recipe_targets(recipe)
    values = set(targets.values())
    assert len(values) <= 1, f"{recipe}: stages disagree on the target: {targets}"
    setup = " ".join(str(c) for k, v in CLUSTER.items() if k.endswith("setup_commands")
                     for c in v or [])
    for value in values:  # a local directory must be created by a setup step on every node
        assert not value.startswith("/") or value in setup, (
            f"{recipe}: target {value} is a local path no setup command creates; use the hub "
            "id (downloaded with HF_TOKEN_PATH on each node) or materialise it in cluster.yaml")


# ----------------------------------------------------------------------------- item 7


def test_item7_big_targets_spread_over_all_the_actors_gpus(monkeypatch, stories260k: Path) -> None:
    """On GPUs the features stage loads the text stack with device_map="auto" over every GPU
    Ray gave the actor (70B ~141 GB, Scout ~218 GB fit no single GPU); the old code loaded
    AutoModel and moved it whole to one GPU. A CPU model stands in for the loaded one."""
    import torch
    from transformers import AutoModelForCausalLM

    from eyas.config import ConfigError
    from eyas.features import capture

    seen: dict[str, Any] = {}
    real = AutoModelForCausalLM.from_pretrained
    placement: dict[str, Any] = {"model.embed_tokens": 0, "model.layers": 1, "model.norm": 3}

    def fake(path: str, **kwargs: Any) -> Any:
        seen.update(kwargs)
        model = real(path, config=kwargs["config"], dtype=torch.float32)
        model.hf_device_map = dict(placement)
        return model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    model, device = capture.load_target(str(stories260k), "auto", use_gpu=True)
    assert seen["device_map"] == "auto" and seen["dtype"] == torch.bfloat16
    assert seen["config"].model_type == "llama"
    assert hasattr(model, "layers") and not hasattr(model, "lm_head") and device.type == "cpu"
    placement["model.layers.3"] = "cpu"  # accelerate spills what the GPUs cannot hold
    with pytest.raises(ConfigError, match=r"do not fit on the actor's 4 GPU\(s\).*num_gpus_per_actor"):
        capture.load_target(str(stories260k), "auto", use_gpu=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        capture.load_target(str(stories260k), "auto", use_gpu=True)


def tiny_llama4(directory: Path) -> Path:
    """A random multimodal Llama 4 checkpoint (Scout's layout: language_model.* + vision_model.*)."""
    import torch
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    text = {"hidden_size": 32, "intermediate_size": 64, "intermediate_size_mlp": 64,
            "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 8, "vocab_size": 128, "num_local_experts": 2, "num_experts_per_tok": 1,
            "interleave_moe_layer_step": 2, "max_position_embeddings": 256,
            "attention_chunk_size": 64, "pad_token_id": 0}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
              "vision_output_dim": 16, "projector_input_dim": 16, "projector_output_dim": 16,
              "pixel_shuffle_ratio": 0.5}
    torch.manual_seed(0)
    Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision)
                                   ).save_pretrained(str(directory))
    return directory


def test_item7_scout_checkpoint_captures_its_language_model(tmp_path: Path) -> None:
    """A multimodal Llama 4 checkpoint loads its text stack only (AutoModel gave
    Llama4ForConditionalGeneration, which has no last_hidden_state) with the checkpoint's
    weights: the features equal the full model's own hidden states."""
    import torch
    from transformers import Llama4ForConditionalGeneration

    from eyas.features import capture

    path = str(tiny_llama4(tmp_path / "scout"))
    info = capture.target_info(path, [0, 2, 4])
    assert (info.num_layers, info.hidden_size, info.hidden_states_indices) == (6, 32, [1, 3, 5])
    model, device = capture.load_target(path, "float32", use_gpu=False)
    assert type(model).__name__ == "Llama4TextModel" and len(model.layers) == 6
    reference = Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    seqs = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    for seq, (aux, hidden) in zip(seqs, capture.capture_batch(model, seqs, [1, 3, 5], device),
                                  strict=True):
        with torch.no_grad():
            states = reference(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states
        torch.testing.assert_close(aux, torch.cat([states[i][0] for i in (1, 3, 5)], -1),
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(hidden, states[-1][0], atol=1e-5, rtol=1e-4)


def test_item7_big_recipes_ship_features_and_train_configs() -> None:
    """70B and Scout have serve apps for their drafts: their features and train configs exist,
    give each feature actor the GPUs the target needs, and train where the apps read the draft."""
    from eyas.features.config import FeaturesJobConfig
    from eyas.train.config import TrainJobConfig

    for recipe, gpus in (("llama33_70b", 4), ("llama4_scout", 8)):
        feats = load_config(FeaturesJobConfig, CONFIGS / f"extract_features_{recipe}.yaml")
        train = load_config(TrainJobConfig, CONFIGS / f"train_draft_{recipe}.yaml")
        assert feats.features.num_gpus_per_actor == gpus
        assert train.features.artifact == feats.features.artifact
        app = serve_apps()[f"{recipe.replace('_', '-')}-eagle3"]
        assert app["args"]["speculative"]["draft_path"] == f"{train.run.output}/draft"


# ----------------------------------------------------------------------------- item 8


def sg_cfg(**spec: Any) -> ServeConfig:
    return validate_config(ServeConfig, {
        "model": "m", "backend": "sglang", "deployment": {"ray_actor_options": {"num_gpus": 1}},
        "speculative": {"draft_path": "d", "num_steps": 3, "eagle_topk": 1,
                        "num_draft_tokens": 4, **spec}})


def test_item8_overlap_switch_maps_to_disable_overlap_schedule() -> None:
    """sglang 0.5.23 always runs EAGLE3 on the v2 worker (speculative/spec_info.py
    create_worker) and never reads SGLANG_ENABLE_SPEC_V2; overlap is on unless
    disable_overlap_schedule=True."""
    off = sg.engine_kwargs(sg_cfg(overlap_scheduler=False), "m", "d")
    on = sg.engine_kwargs(sg_cfg(overlap_scheduler=True), "m", "d")
    assert off["disable_overlap_schedule"] is True and "disable_overlap_schedule" not in on
    assert "--disable-overlap-schedule" in sg.server_cli_args(off)
    plain = validate_config(ServeConfig, {"model": "m", "backend": "sglang",
                                          "deployment": {"ray_actor_options": {"num_gpus": 1}}})
    assert "disable_overlap_schedule" not in sg.engine_kwargs(plain, "m", None)
    source = Path(sg.__file__).read_text()
    assert "os.environ" not in source and not hasattr(sg, "spec_env")


def test_item8_shipped_eagle3_apps_overlap_like_their_baselines() -> None:
    for name, (_, c) in sglang_apps().items():
        if c.speculative is not None:
            assert c.speculative.overlap_scheduler, (
                f"{name}: overlap_scheduler false disables SGLang's overlap scheduler, which "
                "the baseline keeps: the comparison would not be like for like")


# ----------------------------------------------------------------------------- items 9, 10, 13


def pairs() -> list[tuple[str, str]]:
    names = set(serve_apps())
    return [(n, n.replace("-baseline", "-eagle3")) for n in sorted(set(sglang_apps()))
            if n.endswith("-baseline") and n.replace("-baseline", "-eagle3") in names]


def test_item13_every_sglang_eagle3_app_has_a_baseline() -> None:
    apps = sglang_apps()
    for name, (_, c) in apps.items():
        if c.speculative is not None:
            assert name.replace("-eagle3", "-baseline") in apps, f"{name} has no baseline app"
    assert len(pairs()) >= 3


@pytest.mark.parametrize(("base", "spec"), pairs())
def test_item9_item10_baseline_and_eagle3_get_equal_capacity(base: str, spec: str) -> None:
    """Without max_running_requests SGLang caps speculative engines at 48
    (arg_groups/speculative_hook.py _handle_eagle_family); KV memory and GPU type must match."""
    apps = sglang_apps()
    (_, b), (_, s) = apps[base], apps[spec]
    assert s.speculative is not None and b.speculative is None
    for key in ("tp_size", "dtype", "context_length", "mem_fraction_static",
                "max_running_requests"):
        assert getattr(b.sglang, key) == getattr(s.sglang, key), f"{base}/{spec}: {key}"
    ab, asp = b.deployment.ray_actor_options, s.deployment.ray_actor_options
    assert (ab.num_gpus, ab.accelerator_type) == (asp.num_gpus, asp.accelerator_type)
    assert b.model == s.model and b.model_name == s.model_name


def test_item9_max_running_requests_cover_the_load_tests() -> None:
    for path in GPU_LOAD_TESTS:
        cfg = load_config(LoadTestJobConfig, path).loadtest
        if "tune" in path.name:
            continue
        top = max(cfg.concurrencies)
        for ep in cfg.endpoints:
            name, app = app_for(ep.url, ep.model)
            cap = sg.effective_max_running_requests(sg.engine_kwargs(app, "m", "d"))
            assert cap is None or cap >= top, f"{name}: at most {cap} running < {top} ({path.name})"


def test_item9_effective_cap_and_load_test_warning() -> None:
    assert sg.effective_max_running_requests({"speculative_algorithm": "EAGLE3"}) == 48
    assert sg.effective_max_running_requests({}) is None
    assert sg.effective_max_running_requests({"max_running_requests": 64}) == 64
    info = sg.info_dict({"speculative_algorithm": "EAGLE3", "stat_loggers": "ray"}, 8192)
    assert info["max_running_requests"] == 48 and "stat_loggers" not in info["server_args"]
    cfg = LoadTestConfig(endpoints=[{"name": "b", "url": "u", "model": "m"},
                                    {"name": "e", "url": "u", "model": "m"}],
                         concurrencies=[1, 64], output="o")
    warn = runner.capacity_warnings(cfg, {"b": {"backend_info": {"max_running_requests": None}},
                                          "e": {"backend_info": info}})
    assert len(warn) == 1 and "endpoint e" in warn[0] and "48" in warn[0]
    assert runner.capacity_warnings(cfg, {"b": None, "e": {}}) == []


def test_item10_gpu_replicas_pinned_to_a_gpu_type_with_room() -> None:
    """{num_gpus: 1} alone may land on the L4 type (~22.5 GiB usable): too little KV for an
    8B EAGLE-3 replica."""
    accels = {k.split(":", 1)[1] for n in gpu_nodes().values() for k in n["resources"]
              if k.startswith("accelerator_type:")}
    for name, (_, c) in sglang_apps().items():
        accel = c.deployment.ray_actor_options.accelerator_type
        assert accel in accels, f"{name}: pin ray_actor_options.accelerator_type to one of {accels}"
        assert accel != "L4", f"{name}: L4 leaves ~1-2 GiB of KV cache"


def test_item13_tp_is_stated_once_per_model() -> None:
    """70B and Scout: the same tp in the data stage, the serve apps and the README."""
    tps: dict[str, set[int]] = {}
    for _, (_, c) in sglang_apps().items():
        tps.setdefault(c.model, set()).add(c.sglang.tp_size)
    for f in CONFIGS.glob("prepare_data_*.yaml"):
        gen = (yaml.safe_load(f.read_text()).get("data") or {})
        model = gen.get("target")
        tp = ((gen.get("generation") or {}).get("sglang") or {}).get("tp_size") or \
            (gen.get("generation") or {}).get("tp_size")
        if model in tps and tp:
            tps[model].add(tp)
    for model, found in tps.items():
        assert len(found) == 1, f"{model}: tp sizes {found} across configs"
    readme = (ROOT / "README.md").read_text()
    scout = tps.get("meta-llama/Llama-4-Scout-17B-16E-Instruct")
    if scout:
        assert f"Scout tp {next(iter(scout))}" in readme
        assert f"Scout tp {next(iter(scout))}" in (ROOT / "cluster.yaml").read_text()


# ----------------------------------------------------------------------------- item 11


def test_item11_seed_rejected_unless_sglang_is_deterministic() -> None:
    """sampling/sampling_batch_info.py reads sampling_seed only with
    enable_deterministic_inference."""
    sampled = SamplingParams(max_tokens=4, temperature=0.7, seed=5)
    with pytest.raises(ValueError, match="enable_deterministic_inference"):
        sg.sampling_dict(sampled)
    assert sg.sampling_dict(sampled, seeded=True)["sampling_seed"] == 5
    greedy = sg.sampling_dict(SamplingParams(max_tokens=4, temperature=0.0, seed=5))
    assert "sampling_seed" not in greedy  # no effect on a greedy request
    assert sg.deterministic({"enable_deterministic_inference": True})
    assert not sg.deterministic({})


# ----------------------------------------------------------------------------- item 12


def test_item12_metrics_go_through_rays_stat_loggers(monkeypatch) -> None:
    """As sglang/srt/ray/engine.py RayEngine does: enable_metrics + the Ray-backed collectors
    of observability/ray_wrappers.py, so sglang's metrics reach Ray's Prometheus port."""
    (_, c), *_ = [v for v in sglang_apps().values() if v[1].sglang.enable_metrics]
    kwargs = sg.engine_kwargs(c, "m", "d")
    assert kwargs["stat_loggers"] == sg.RAY_STAT_LOGGERS
    assert "--stat-loggers" not in sg.server_cli_args(kwargs)  # no CLI flag for it
    fake = types.ModuleType("sglang.srt.observability.ray_wrappers")
    fake.build_ray_stat_loggers = lambda: {"scheduler": object}
    for name in ("sglang", "sglang.srt", "sglang.srt.observability"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    built = sg.materialize_kwargs(kwargs)
    assert built["stat_loggers"] == {"scheduler": object} and kwargs["stat_loggers"] == "ray"
    off = c.model_copy(update={"sglang": c.sglang.model_copy(update={"enable_metrics": False})})
    assert "stat_loggers" not in sg.engine_kwargs(off, "m", "d")


# ----------------------------------------------------------------------------- item 14


def test_item14_fallback_does_not_count_the_prefill_token() -> None:
    # 1 prefill token + 4 verify steps emitting 2 accepted + 1 bonus each = 13 tokens
    stats = sg.spec_stats({"completion_tokens": 13, "spec_verify_ct": 4})
    assert stats.accepted_tokens == 8 and stats.acceptance_length == 13 / 4
    assert sg.spec_stats({"completion_tokens": 1, "spec_verify_ct": 1}).accepted_tokens == 0
    explicit = sg.spec_stats({"completion_tokens": 13, "spec_verify_ct": 4,
                              "spec_accepted_tokens": 7})
    assert explicit.accepted_tokens == 7


# ----------------------------------------------------------------------------- item 15


def sglang_captures(cfg: dict[str, Any], num_layers: int) -> list[int]:
    """The hidden_states indices sglang 0.5.23 captures for a draft config.json: eagle_config's
    list + 1 (srt/model_executor/model_runner_components/spec_aux_hidden_state.py reads it,
    srt/models/llama.py set_eagle3_layers_to_capture adds 1), else [2, N//2, N-3]."""
    ids = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    return [2, num_layers // 2, num_layers - 3] if ids is None else [i + 1 for i in ids]


def vllm_captures(cfg: dict[str, Any], num_layers: int) -> list[int]:
    """The hidden_states indices vllm 0.34 captures: the TOP-LEVEL list as is, else
    eagle_config.layer_ids (v1/worker/gpu/spec_decode/eagle/eagle3_utils.py
    get_eagle3_aux_layers_from_config), else (2, N//2, N-3) (models/interfaces.py); id k is
    recorded after layer k-1 runs (models/llama.py LlamaModel.forward: idx + 1)."""
    ids = cfg.get("eagle_aux_hidden_state_layer_ids") or (cfg.get("eagle_config") or {}).get("layer_ids")
    return [2, num_layers // 2, num_layers - 3] if not ids else sorted(ids)


@pytest.mark.parametrize("server", ["sglang", "vllm"])
def test_item15_each_export_target_numbers_the_aux_layers_its_way(server: str, tmp_path: Path) -> None:
    """The head was trained on the outputs of layers [0, 2, 3] of a 5-layer target
    (hidden_states [1, 3, 4]); the export for each server makes THAT server capture them.
    The SGLang file alone makes vLLM fall back to its defaults, which here collide."""
    import json

    from test_export import make_draft

    from eyas.draft.model import Eagle3Draft
    from eyas.export.check import check_draft_dir
    from eyas.export.writer import save_draft

    trained = [1, 3, 4]  # hidden_states indices of aux_layer_ids [0, 2, 3]
    save_draft(make_draft(), tmp_path / "d", dtype="float32", server=server)
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    read = {"sglang": sglang_captures(cfg, 5), "vllm": vllm_captures(cfg, 5)}
    assert read[server] == trained
    assert read["sglang"] == trained  # eagle_config keeps the output indices in both files
    if server == "sglang":
        assert "eagle_aux_hidden_state_layer_ids" not in cfg and read["vllm"] == [2, 2, 2]
    assert check_draft_dir(tmp_path / "d") == []
    assert Eagle3Draft.from_pretrained(tmp_path / "d").config.aux_layer_ids == [0, 2, 3]
