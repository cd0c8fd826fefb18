"""Target capture against transformers' own hidden states, the layer-index convention, the
overflow and eval-split rules, bytes per token, and the features YAML files (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from eyas.config import ConfigError, load_config
from eyas.draft.model import aux_ids_to_hidden_states_indices
from eyas.features.capture import capture_batch, load_target, resolve_aux_layer_ids, target_info
from eyas.features.config import FeaturesJobConfig
from eyas.features.rows import pieces, plan, select_rows, split_of
from eyas.features.schema import bytes_per_token, decode_row, encode_row
from eyas.features.stage import measure_bytes_per_token

ATOL, RTOL = 1e-5, 1e-4  # fp32 CPU: a padded batch vs one unpadded sequence
AUX_IDS = [0, 2, 3]  # stories260k (5 layers): explicit distinct layer OUTPUT indices
CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


@pytest.fixture(scope="module")
def target(stories260k):
    torch.manual_seed(0)
    model, device = load_target(str(stories260k), "float32", use_gpu=False)
    return model, device


@pytest.fixture(scope="module")
def reference(stories260k):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(stories260k), dtype=torch.float32).eval()


def sequences() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (17, 5, 30)]


def test_capture_equals_transformers_output_hidden_states(target, reference):
    """Each row of a padded batch equals an unbatched forward of the CausalLM at the right indices."""
    model, device = target
    indices = aux_ids_to_hidden_states_indices(AUX_IDS)
    assert indices == [1, 3, 4]
    captured = capture_batch(model, sequences(), indices, device)
    for seq, (aux, hidden) in zip(sequences(), captured, strict=True):
        with torch.no_grad():
            ref = reference(torch.tensor([seq]), output_hidden_states=True)
        states = [h[0] for h in ref.hidden_states]  # N + 1 entries (T, H)
        assert aux.shape == (len(seq), 3 * 64) and hidden.shape == (len(seq), 64)
        torch.testing.assert_close(aux, torch.cat([states[i] for i in indices], -1), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(hidden, states[-1], atol=ATOL, rtol=RTOL)
        # the final hidden state is the lm_head input: the target's logits are recoverable from it
        torch.testing.assert_close(reference.lm_head(hidden), ref.logits[0], atol=1e-4, rtol=RTOL)


def test_capture_never_asks_for_all_hidden_states(target):
    """Only the three hooked layer outputs are kept: the forward runs without
    output_hidden_states (which would hold all N + 1 states: 31 x T x H for SmolLM2, 82 for a
    70B target) and the hooks are removed afterwards."""
    model, device = target
    seen = []
    original = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("output_hidden_states"))
        return original(*args, **kwargs)

    model.forward = spy
    try:
        capture_batch(model, sequences(), [1, 3, 4], device)
    finally:
        del model.forward
    assert seen == [None]
    assert all(not layer._forward_hooks for layer in model.layers)


def test_aux_layer_ids_are_decoder_layer_outputs(target):
    """aux chunk k == the output of decoder layer AUX_IDS[k] (forward hooks as the reference)."""
    model, device = target
    seen: dict[int, torch.Tensor] = {}
    hooks = [model.layers[i].register_forward_hook(
        lambda _m, _a, out, i=i: seen.__setitem__(i, out[0] if isinstance(out, tuple) else out))
        for i in AUX_IDS]
    try:
        seq = sequences()[0]
        aux, _ = capture_batch(model, [seq], aux_ids_to_hidden_states_indices(AUX_IDS), device)[0]
    finally:
        for h in hooks:
            h.remove()
    for k, layer in enumerate(AUX_IDS):
        torch.testing.assert_close(aux[:, k * 64:(k + 1) * 64], seen[layer][0], atol=0.0, rtol=0.0)


def test_capture_agrees_with_the_engine_transformer(target, stories260k):
    """The project's own engine returns the same aux features for the same layer ids."""
    from eyas.engine.model import Transformer

    model, device = target
    engine = Transformer.from_pretrained(stories260k, aux_layer_ids=AUX_IDS)
    seq = sequences()[2]
    T = len(seq)
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None]  # (1, T, T) causal
    with torch.no_grad():
        _, engine_aux = engine(torch.tensor([seq]), torch.arange(T)[None], engine.new_cache(1, T),
                               torch.tensor([0]), torch.arange(T)[None], mask)
    aux, _ = capture_batch(model, [seq], aux_ids_to_hidden_states_indices(AUX_IDS), device)[0]
    torch.testing.assert_close(aux, engine_aux[0], atol=1e-4, rtol=1e-4)


def test_default_layer_ids_and_shallow_targets(stories260k):
    assert resolve_aux_layer_ids(None, 32) == [1, 15, 28]  # Llama 3.1 8B
    assert aux_ids_to_hidden_states_indices([1, 15, 28]) == [2, 16, 29]  # SGLang's numbering
    # 5 layers: EAGLE-3's formula would give [1, 1, 1]; shallow targets get [0, (N-1)//2, N-2]
    assert target_info(str(stories260k), None).aux_layer_ids == [0, 2, 3]
    with pytest.raises(ConfigError, match=r"features\.aux_layer_ids.*out of range"):
        target_info(str(stories260k), [0, 2, 4])  # 4 = the last layer
    info = target_info(str(stories260k), AUX_IDS)
    assert (info.num_layers, info.hidden_size, info.hidden_states_indices) == (5, 64, [1, 3, 4])


def test_overflow_pieces():
    assert pieces(10, 10, "truncate") == [(0, 10)]
    assert pieces(25, 10, "truncate") == [(0, 10)]
    assert pieces(25, 10, "split") == [(0, 10), (10, 20), (20, 25)]
    assert pieces(25, 10, "drop") == []
    assert pieces(0, 10, "truncate") == []


def data_batch(lengths: list[int]) -> pa.Table:
    return pa.Table.from_pylist([{"id": f"r{i}", "input_ids": list(range(n)), "loss_mask": [i % 2] * n}
                                 for i, n in enumerate(lengths)])


@pytest.mark.parametrize("overflow, counts, tokens_out", [
    ("truncate", {"truncated": 2, "split": 0, "split_pieces": 0, "dropped": 0, "out": 4}, 5 + 10 + 10 + 10),
    ("split", {"truncated": 0, "split": 2, "split_pieces": 5, "dropped": 0, "out": 7}, 5 + 10 + 25 + 11),
    ("drop", {"truncated": 0, "split": 0, "split_pieces": 0, "dropped": 2, "out": 2}, 5 + 10),
])
def test_overflow_counts_and_rows(overflow, counts, tokens_out):
    lengths = [5, 10, 25, 11]
    ids = [f"r{i}" for i in range(4)]
    planned = plan(ids, lengths, 0.0, 10, overflow)
    assert planned["counts"]["in"] == 4
    assert {k: planned["counts"][k] for k in counts} == counts
    assert planned["tokens"]["out"] == tokens_out
    assert planned["tokens"]["removed"] == sum(lengths) - tokens_out
    rows = select_rows(data_batch(lengths), "train", 0.0, 10, overflow).to_pylist()
    assert len(rows) == counts["out"] and sum(len(r["input_ids"]) for r in rows) == tokens_out
    assert all(len(r["input_ids"]) == len(r["loss_mask"]) <= 10 for r in rows)
    if overflow == "split":
        assert [r["id"] for r in rows] == ["r0", "r1", "r2#0", "r2#1", "r2#2", "r3#0", "r3#1"]
        assert sum((r["input_ids"] for r in rows if r["id"].startswith("r2")), []) == list(range(25))


def test_eval_split_is_deterministic_and_by_conversation():
    ids = [f"src:{i}" for i in range(4000)]
    first = [split_of(i, 0.1) for i in ids]
    assert first == [split_of(i, 0.1) for i in ids]
    assert 0.08 < first.count("eval") / len(ids) < 0.12
    assert [split_of(i, 0.0) for i in ids[:50]] == ["train"] * 50
    assert sum(split_of(f"src:{i}", 0.5) == "eval" for i in range(1000)) in range(450, 551)
    lengths = [30] * 40
    train = select_rows(data_batch(lengths), "train", 0.3, 10, "split").to_pylist()
    held = select_rows(data_batch(lengths), "eval", 0.3, 10, "split").to_pylist()
    train_ids = {r["id"].split("#")[0] for r in train}
    eval_ids = {r["id"].split("#")[0] for r in held}
    assert train_ids.isdisjoint(eval_ids) and len(train_ids | eval_ids) == 40
    assert eval_ids == {f"r{i}" for i in range(40) if split_of(f"r{i}", 0.3) == "eval"}
    planned = plan([f"r{i}" for i in range(40)], lengths, 0.3, 10, "split")["counts"]
    assert (planned["train"], planned["eval"]) == (len(train), len(held))


def test_split_assignment_is_pinned():
    """sha256-based, not Python's salted hash(): a changed rule would move rows between splits.
    sha256("d")[:8] / 2**64 = 0.0964, "c" 0.1816, "b" 0.2427, "a" 0.7914."""
    assert [split_of(x, 0.1) for x in "abcd"] == ["train", "train", "train", "eval"]
    assert [split_of(x, 0.5) for x in "abcd"] == ["train", "eval", "eval", "eval"]


def test_bytes_per_token_bf16_vs_fp8(target):
    """Measured on real stories260k features: bf16 = 8H + 5, fp8 = 4H + 16 + 5 (H = 64)."""
    model, device = target
    seq = sequences()[2]
    aux, hidden = capture_batch(model, [seq], [1, 3, 4], device)[0]
    mask = [1] * len(seq)
    rows = {enc: encode_row("x", seq, mask, aux, hidden, enc) for enc in ("bf16", "fp8")}
    measured = measure_bytes_per_token(64)
    assert measured["reference"] == 8 * 64 + 16
    assert bytes_per_token(rows["bf16"]) == measured["bf16"] == 8 * 64 + 5
    assert bytes_per_token(rows["fp8"]) == measured["fp8"] == 4 * 64 + 16 + 5
    back = decode_row(rows["fp8"])
    # e4m3 keeps 3 mantissa bits: per token and layer, error <= amax / 16
    amax = aux.reshape(len(seq), 3, 64).abs().amax(-1, keepdim=True)  # (T, 3, 1)
    err = (back["aux"] - aux).reshape(len(seq), 3, 64).abs()
    assert bool((err <= amax / 16 + 1e-6).all())


def test_features_yaml_files_validate(stories260k):
    for path in sorted(CONFIGS.glob("extract_features*.yaml")):
        cfg = load_config(FeaturesJobConfig, path)
        assert cfg.run.output == cfg.features.artifact
    default = load_config(FeaturesJobConfig, CONFIGS / "extract_features.yaml")
    assert default.features.aux_layer_ids == AUX_IDS
    assert target_info(str(stories260k), default.features.aux_layer_ids).aux_layer_ids == AUX_IDS
    gpu = load_config(FeaturesJobConfig, CONFIGS / "extract_features_llama31_8b.yaml")
    assert gpu.features.num_gpus_per_actor == 1 and gpu.features.aux_layer_ids is None


def test_run_output_follows_the_artifact():
    cfg = load_config(FeaturesJobConfig, None, ["features.artifact=s3://b/f"])
    assert cfg.run.output == "s3://b/f"
    with pytest.raises(ConfigError, match=r"run\.output.*features\.artifact"):
        load_config(FeaturesJobConfig, None, ["run.output=/tmp/elsewhere"])
    with pytest.raises(ConfigError, match=r"features\.overflow"):
        load_config(FeaturesJobConfig, None, ["features.overflow=wrap"])


@pytest.mark.gpu
def test_gpu_bf16_capture_tracks_cpu_fp32(target, stories260k):
    """dtype=auto on GPU runs the target in bf16; its features stay close to the fp32 CPU ones."""
    model, device = target
    gpu_model, gpu = load_target(str(stories260k), "auto", use_gpu=True)
    assert next(gpu_model.parameters()).dtype == torch.bfloat16
    indices = aux_ids_to_hidden_states_indices(AUX_IDS)
    for (aux, hidden), (g_aux, g_hidden) in zip(capture_batch(model, sequences(), indices, device),
                                                capture_batch(gpu_model, sequences(), indices, gpu), strict=True):
        for ref, got in ((aux, g_aux), (hidden, g_hidden)):
            rel = (got.float().cpu() - ref).norm() / ref.norm()
            assert rel < 3e-2, f"bf16 GPU features drift {rel:.3g} from fp32 CPU"
