"""Serve config validation, the YAML files in serve_apps/, Serve deployment options, and the
SGLang arguments built from a config (pure functions; sglang itself is not needed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from eyas.config import ConfigError, validate_config
from eyas.serve.app import build_app, deployment_options
from eyas.serve.backends import sglang_engine as sg
from eyas.serve.config import ServeConfig

REPO = Path(__file__).resolve().parents[2]
YAMLS = sorted((REPO / "serve_apps").glob("*.yaml"))


def cfg(**kw) -> ServeConfig:
    return validate_config(ServeConfig, {"model": "assets:models/stories260k", **kw})


def app_args(path: Path, name: str) -> dict:
    """The args of the application ``name`` in the serve file ``path``."""
    (app,) = (a for a in yaml.safe_load(path.read_text())["applications"] if a["name"] == name)
    return app["args"]


# ----------------------------------------------------------------------------- config


def test_defaults_and_model_name() -> None:
    c = cfg()
    assert c.backend == "eyas" and c.speculative is None and c.api_key_env is None
    assert c.model_name == "stories260k"
    assert cfg(served_model_name="tiny").model_name == "tiny"


@pytest.mark.parametrize(("args", "needle"), [
    ({"speculative": {"draft_path": "d", "num_steps": 3}}, "all three or none"),
    ({"speculative": {"draft_path": "d", "num_steps": 2, "eagle_topk": 1,
                      "num_draft_tokens": 8}}, "num_draft_tokens=8"),
    ({"backend": "sglang", "speculative": {"draft_path": "d", "overlap_scheduler": True,
                                           "num_steps": 5, "eagle_topk": 4,
                                           "num_draft_tokens": 8},
      "deployment": {"ray_actor_options": {"num_gpus": 1}}}, "needs eagle_topk=1"),
    ({"speculative": {"draft_path": "d", "overlap_scheduler": True}}, "SGLang option"),
    ({"backend": "sglang", "speculative": {"draft_path": "d", "ngram_tokens": 4},
      "deployment": {"ray_actor_options": {"num_gpus": 1}}}, "eyas engine options"),
    ({"backend": "sglang", "speculative": {"draft_path": "d", "max_speculative_batch": 2},
      "deployment": {"ray_actor_options": {"num_gpus": 1}}}, "eyas engine options"),
    ({"backend": "sglang", "speculative": {"draft_path": "d", "speculation": "adaptive"},
      "deployment": {"ray_actor_options": {"num_gpus": 1}}}, "speculative.speculation: adaptive"),
    ({"speculative": {"draft_path": "d", "speculation": "auto"}}, "speculative.speculation"),
    ({"backend": "sglang"}, "num_gpus >= 1"),
    ({"backend": "sglang", "sglang": {"tp_size": 4},
      "deployment": {"ray_actor_options": {"num_gpus": 2}}}, "num_gpus >= 4"),
    ({"engine": {"device": "cuda"}}, "needs a GPU"),
    ({"deployment": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}, "exceeds"),
    ({"deployment": {"num_replicas": 2, "autoscaling": {}}}, "not both"),
    ({"engine": {"max_batch_sizes": 4}}, "engine.max_batch_sizes"),
    ({"default_max_tokens": 0}, "default_max_tokens"),
])
def test_invalid_configs_name_the_problem(args, needle) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        cfg(**args)


def test_deployment_options_autoscaling_and_fixed() -> None:
    c = cfg(deployment={"autoscaling": {"min_replicas": 1, "max_replicas": 3,
                                        "target_ongoing_requests": 5},
                        "ray_actor_options": {"num_cpus": 2, "num_gpus": 1,
                                              "accelerator_type": "H200"}},
            engine={"device": "cuda"})
    opts = deployment_options(c)
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3,
                                          "target_ongoing_requests": 5.0}
    assert opts["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 1.0,
                                         "accelerator_type": "H200"}
    # Serve's limit: generation (64 running + 64 queued, the app's own bound) + control headroom
    assert "num_replicas" not in opts and opts["max_ongoing_requests"] == 64 + 64 + 64
    fixed = deployment_options(cfg(deployment={"num_replicas": 2}))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed


def test_build_app_rejects_bad_args_before_deploying() -> None:
    with pytest.raises(ConfigError, match="speculative.draft_path"):
        build_app({"model": "m", "speculative": {"num_steps": 3}})


# ----------------------------------------------------------------------------- YAML files


def test_the_yaml_files_exist() -> None:
    names = {p.name for p in YAMLS}
    assert {"stories260k.yaml", "smollm2.yaml", "llama31_8b_sglang.yaml",
            "llama4_scout_sglang.yaml"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_is_a_valid_serve_config_with_valid_args(path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    from eyas.serve.app import build_app as yaml_builder

    text = path.read_text()
    assert f"serve run serve_apps/{path.name}" in text  # the header shows the command
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    # both sides of the load test in one file: `serve deploy` replaces what the cluster runs
    assert sorted(app.route_prefix for app in schema.applications) == ["/baseline", "/eagle3"]
    for app in schema.applications:
        assert app.import_path == "eyas.serve.app:build_app"  # importable where only eyas is
        c = validate_config(ServeConfig, app.args, source=f"{path.name}:{app.name}")
        assert (c.speculative is not None) == (app.route_prefix == "/eagle3"), app.name
        bound = yaml_builder(app.args)  # builds without loading a model or importing sglang
        assert bound is not None
        if c.backend == "sglang":
            assert c.deployment.ray_actor_options.num_gpus >= c.sglang.tp_size


# ----------------------------------------------------------------------------- SGLang arguments


def test_sglang_eagle3_engine_kwargs_and_cli_flags() -> None:
    c = validate_config(ServeConfig, app_args(REPO / "serve_apps/llama31_8b_sglang.yaml", "llama31-8b-eagle3"))
    kwargs = sg.engine_kwargs(c, "/models/llama", "/tmp/draft")
    assert kwargs["speculative_algorithm"] == "EAGLE3"
    assert kwargs["speculative_draft_model_path"] == "/tmp/draft"
    assert (kwargs["speculative_num_steps"], kwargs["speculative_eagle_topk"],
            kwargs["speculative_num_draft_tokens"]) == (5, 1, 6)
    assert kwargs["model_path"] == "/models/llama" and kwargs["tp_size"] == 1
    flags = sg.server_cli_args(kwargs)
    text = " ".join(flags)
    for part in ("--speculative-algorithm EAGLE3", "--speculative-draft-model-path /tmp/draft",
                 "--speculative-num-steps 5", "--speculative-eagle-topk 1",
                 "--speculative-num-draft-tokens 6", "--context-length 8192",
                 "--served-model-name llama-3.1-8b-instruct"):
        assert part in text
    assert "--enable-metrics" in flags and "True" not in flags
    assert "disable_overlap_schedule" not in kwargs  # overlap on, as in the baseline (issue 9 item 8)


def test_sglang_knobs_all_or_none_overlap_env_and_extra_args() -> None:
    base = {"model": "m", "backend": "sglang",
            "deployment": {"ray_actor_options": {"num_gpus": 1}}}
    bare = validate_config(ServeConfig, base | {"speculative": {"draft_path": "d"}})
    kwargs = sg.engine_kwargs(bare, "m", None)
    assert kwargs["speculative_draft_model_path"] == "d"
    assert not any(k in kwargs for k in ("speculative_num_steps", "speculative_eagle_topk",
                                         "speculative_num_draft_tokens"))
    overlap = validate_config(ServeConfig, base | {"speculative": {
        "draft_path": "d", "num_steps": 3, "eagle_topk": 1, "num_draft_tokens": 4,
        "overlap_scheduler": True}})
    assert "disable_overlap_schedule" not in sg.engine_kwargs(overlap, "m", None)  # SGLang's default: on
    plain = validate_config(ServeConfig, base | {"sglang": {"extra_args": {"chunked_prefill_size": 4096}}})
    kwargs = sg.engine_kwargs(plain, "m", None)
    assert kwargs["chunked_prefill_size"] == 4096 and "speculative_algorithm" not in kwargs
    clash = validate_config(ServeConfig, base | {"sglang": {"extra_args": {"tp_size": 2}}})
    with pytest.raises(ValueError, match="tp_size"):
        sg.engine_kwargs(clash, "m", None)


def test_sglang_sampling_and_meta_info() -> None:
    from eyas.engine.sampling import SamplingParams

    d = sg.sampling_dict(SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, stop=["\n"],
                                        seed=3), seeded=True)
    assert d == {"max_new_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": -1,
                 "ignore_eos": False, "skip_special_tokens": True, "stop": ["\n"],
                 "sampling_seed": 3}
    meta = {"finish_reason": {"type": "length", "length": 40}, "prompt_tokens": 9,
            "completion_tokens": 40, "spec_verify_ct": 10, "spec_num_correct_drafts": 30}
    stats = sg.spec_stats(meta)
    assert (stats.verify_steps, stats.accepted_tokens, stats.acceptance_length) == (10, 30, 4.0)
    assert sg.finish_reason(meta) == "length" and sg.finish_reason({}) is None
    assert sg.spec_stats({"completion_tokens": 5}) is None  # no speculation
    assert sg.text_delta("Hello", "Hello world") == " world"
    with pytest.raises(RuntimeError, match="incremental_streaming_output"):
        sg.text_delta("Hello", "Help")


class _FakeTokenizerManager:
    def __init__(self) -> None:
        self.aborted: list[str] = []

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self.aborted.append(rid)


class _FakeSGLangEngine:
    def __init__(self) -> None:
        self.tokenizer_manager = _FakeTokenizerManager()


def test_sglang_stream_deltas_usage_and_abort_on_close() -> None:
    async def outputs():
        yield {"text": "Once", "meta_info": {"prompt_tokens": 3, "completion_tokens": 1}}
        yield {"text": "Once upon", "meta_info": {"prompt_tokens": 3, "completion_tokens": 4}}
        yield {"text": "Once upon a", "meta_info": {
            "prompt_tokens": 3, "completion_tokens": 5, "finish_reason": {"type": "stop"},
            "spec_verify_ct": 2}}

    async def run(close_after: int | None) -> tuple[list, list]:
        engine = _FakeSGLangEngine()
        stream = sg.SGLangStream(engine, "r1", outputs())
        got = []
        async for chunk in stream:
            got.append(chunk)
            if close_after is not None and len(got) == close_after:
                break
        await stream.aclose()
        return got, engine.tokenizer_manager.aborted

    full, aborted = asyncio.run(run(None))
    assert [c.text for c in full] == ["Once", " upon", " a"]
    assert [c.new_tokens for c in full] == [1, 3, 1] and aborted == []
    assert full[-1].finish_reason == "stop" and full[-1].spec.acceptance_length == 2.5
    part, aborted = asyncio.run(run(1))
    assert len(part) == 1 and aborted == ["r1"]


def test_sglang_backend_needs_the_package() -> None:
    try:
        import sglang  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("sglang is installed here")
    c = validate_config(ServeConfig, app_args(REPO / "serve_apps/llama31_8b_sglang.yaml", "llama31-8b-eagle3"))
    with pytest.raises(ImportError, match="eyas\\[sglang\\]"):
        sg.SGLangBackend(c, tokenizer=None)


# ----------------------------------------------------------------------------- model locations


def test_draft_download_and_remote_target_rejected(tmp_path: Path) -> None:
    from eyas.serve.backends.base import DRAFT_FILES, download_dir, target_model_path

    src = tmp_path / "draft"
    src.mkdir()
    for name in DRAFT_FILES:
        (src / name).write_bytes(name.encode())
    out = Path(download_dir(str(src), DRAFT_FILES))  # same code path as s3:// and gs://
    assert [(out / n).read_bytes() for n in DRAFT_FILES] == [n.encode() for n in DRAFT_FILES]
    (src / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        download_dir(str(src), DRAFT_FILES)
    with pytest.raises(ValueError, match="local directory"):
        target_model_path("s3://bucket/llama")
