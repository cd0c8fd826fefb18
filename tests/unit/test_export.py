"""Exported draft directories: round trip, the checker on good and corrupted dirs, the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from eyas.draft.model import DraftConfig, Eagle3Draft
from eyas.draft.vocab import build_vocab_mapping
from eyas.export.check import check_draft_dir
from eyas.export.writer import save_draft

EXPECTED_KEYS = {
    "fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d",
    *(f"midlayer.self_attn.{p}_proj.weight" for p in "qkvo"),
    *(f"midlayer.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    *(f"midlayer.{n}.weight" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm")),
}


def make_draft(hidden: int = 64, vocab: int = 512, draft_vocab: int = 100) -> Eagle3Draft:
    config = DraftConfig(hidden_size=hidden, intermediate_size=32, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         max_position_embeddings=512, vocab_size=vocab,
                         draft_vocab_size=draft_vocab, target_hidden_size=hidden,
                         aux_layer_ids=[0, 2, 3], torch_dtype="float32")
    torch.manual_seed(0)
    draft = Eagle3Draft(config)
    draft.set_vocab_mapping(*build_vocab_mapping(torch.randint(0, 50, (vocab,)), draft_vocab))
    return draft


@pytest.fixture
def good_dir(tmp_path):
    directory = tmp_path / "draft"
    save_draft(make_draft(), directory, dtype="bfloat16")
    return directory


def rewrite(directory, mutate_tensors=None, mutate_config=None):
    weights = directory / "model.safetensors"
    if mutate_tensors:
        tensors = load_file(str(weights))
        mutate_tensors(tensors)
        save_file(tensors, str(weights))
    if mutate_config:
        cfg = json.loads((directory / "config.json").read_text())
        mutate_config(cfg)
        (directory / "config.json").write_text(json.dumps(cfg))


def test_saved_keys_dtypes_and_config(good_dir):
    tensors = load_file(str(good_dir / "model.safetensors"))
    assert set(tensors) == EXPECTED_KEYS
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert tensors["fc.weight"].shape == (64, 192) and tensors["fc.weight"].dtype == torch.bfloat16
    cfg = json.loads((good_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["torch_dtype"] == "bfloat16"
    assert cfg["tie_word_embeddings"] is False and cfg["draft_vocab_size"] == 100


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_gives_identical_outputs(tmp_path, dtype):
    draft = make_draft().to(getattr(torch, dtype))
    save_draft(draft, tmp_path / "d", dtype=dtype)
    loaded = Eagle3Draft.from_pretrained(str(tmp_path / "d"))
    assert loaded.fc.weight.dtype == getattr(torch, dtype)
    torch.manual_seed(1)
    emb, aux = torch.randn(2, 5, 64), torch.randn(2, 5, 192)
    pos = torch.arange(5).expand(2, 5)
    with torch.no_grad():
        out_a, kv_a = draft(emb, draft.fuse(aux), pos)
        out_b, kv_b = loaded(emb, loaded.fuse(aux), pos)
        assert torch.equal(out_a, out_b) and torch.equal(kv_a[0], kv_b[0])
        assert torch.equal(draft.logits(out_a), loaded.logits(out_b))
    assert torch.equal(loaded.d2t, draft.d2t) and torch.equal(loaded.t2d, draft.t2d)


def test_check_passes_on_good_dir(good_dir, stories260k):
    assert check_draft_dir(good_dir) == []
    assert check_draft_dir(good_dir, target_dir=stories260k) == []


def test_check_lists_each_problem(good_dir):
    def corrupt(t):
        del t["midlayer.mlp.up_proj.weight"]
        t["norm.weight"] = torch.ones(63, dtype=torch.bfloat16)
        t["d2t"] = t["d2t"].clone()
        t["d2t"][3] += 1
        t["embed_tokens.weight"] = torch.zeros(512, 64, dtype=torch.bfloat16)

    rewrite(good_dir, corrupt, lambda c: c.update(architectures=["LlamaForCausalLM"]))
    problems = check_draft_dir(good_dir)
    text = "\n".join(problems)
    assert "missing key 'midlayer.mlp.up_proj.weight'" in text
    assert "norm.weight: shape (63,); expected (64,)" in text
    assert "vocab mapping: d2t maps draft id 3" in text
    assert "unexpected key 'embed_tokens.weight'" in text
    assert "architectures=['LlamaForCausalLM']" in text
    assert len(problems) == 5


def test_check_dtype_and_config_problems(good_dir):
    rewrite(good_dir, lambda t: t.update(t2d=t["t2d"].to(torch.int64),
                                         **{"fc.weight": t["fc.weight"].float()}),
            lambda c: c.update(tie_word_embeddings=True, num_hidden_layers=1))
    text = "\n".join(check_draft_dir(good_dir))
    assert "t2d: dtype torch.int64; expected torch.bool" in text
    assert "fc.weight: dtype torch.float32; expected torch.bfloat16" in text
    assert "tie_word_embeddings=True" in text


def test_check_against_wrong_target(tmp_path, stories260k):
    directory = tmp_path / "d"
    save_draft(make_draft(hidden=32, vocab=500), directory)
    text = "\n".join(check_draft_dir(directory, target_dir=stories260k))
    assert "vocab_size=500 but the target has 512" in text
    assert "hidden_size=32 but the target has 64" in text
    assert "fc.weight takes 96 inputs but 3 * the target's hidden_size is 192" in text


def test_check_missing_files(tmp_path):
    assert any("config.json: not found" in p for p in check_draft_dir(tmp_path))


def test_cli_exit_codes(good_dir, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "eyas.export.check", str(good_dir)],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK" in ok.stdout
    rewrite(good_dir, lambda t: t.pop("lm_head.weight"),
            lambda c: c.update(architectures=["X"]))
    bad = subprocess.run([sys.executable, "-m", "eyas.export.check", str(good_dir)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "missing key 'lm_head.weight'" in bad.stdout and "architectures" in bad.stdout


def test_convert_for_vllm_and_back(good_dir, tmp_path):
    """--for vllm writes the same tensors with vLLM's top-level ids (eagle_config's + 1);
    --for sglang gives back the original config.json."""
    from eyas.export.convert import main

    vllm_dir, back_dir = tmp_path / "vllm", tmp_path / "back"
    assert main([str(good_dir), str(vllm_dir), "--for", "vllm"]) == 0
    assert main([str(vllm_dir), str(back_dir)]) == 0
    original = json.loads((good_dir / "config.json").read_text())
    vllm = json.loads((vllm_dir / "config.json").read_text())
    assert vllm.pop("eagle_aux_hidden_state_layer_ids") == [1, 3, 4]  # outputs [0, 2, 3] + 1
    assert vllm == original == json.loads((back_dir / "config.json").read_text())
    for d in (vllm_dir, back_dir):
        assert (d / "model.safetensors").read_bytes() == (good_dir / "model.safetensors").read_bytes()
        assert check_draft_dir(d) == []


def test_convert_refuses_a_broken_draft(good_dir, tmp_path, capsys):
    from eyas.export.convert import main

    rewrite(good_dir, lambda t: t.pop("lm_head.weight"))
    assert main([str(good_dir), str(tmp_path / "out"), "--for", "vllm"]) == 1
    assert "missing key 'lm_head.weight'" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("top", "needle"), [
    ([0, 2, 3], r"vLLM needs \[1, 3, 4\]"),  # the SGLang numbering under vLLM's key
    ([1, 3, 4], None),
])
def test_check_vllm_ids_against_eagle_config(good_dir, top, needle):
    rewrite(good_dir, mutate_config=lambda c: c.update(eagle_aux_hidden_state_layer_ids=top))
    problems = check_draft_dir(good_dir)
    assert problems == [] if needle is None else any(re.search(needle, p) for p in problems)
    rewrite(good_dir, mutate_config=lambda c: c.pop("eagle_config"))
    assert any("no eagle_config" in p for p in check_draft_dir(good_dir))
