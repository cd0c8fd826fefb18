"""Training components without Ray: configs, schedule, checkpoints, data positions, metrics, plans."""

from __future__ import annotations

import json
import math
import random
from collections import deque
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from eyas import storage
from eyas.config import ConfigError, load_config
from eyas.draft.model import DraftConfig, Eagle3Draft
from eyas.draft.vocab import build_vocab_mapping
from eyas.evaluate.config import EvaluateJobConfig
from eyas.export.writer import save_draft
from eyas.train.checkpoint import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    TrainState,
    flatten_optimizer_state,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer_state,
)
from eyas.train.config import TrainConfig, TrainJobConfig
from eyas.train.data import FeatureSpec, micro_batches, micro_batches_per_epoch
from eyas.train.loop import TTTModule, stats_to_metrics, step_stats, window_summary
from eyas.train.optim import build_optimizer, lr_factor
from eyas.train.resume import (
    copy_to_local,
    model_state,
    optimizer_state,
    restore,
    stored_checkpoints,
)
from eyas.train.trainer import HeadPlan, plan_from_init, plan_new_head, prepare_run

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("train_draft*.yaml")), ids=lambda p: p.name)
def test_train_yaml_validates(path):
    cfg = load_config(TrainJobConfig, path)
    assert cfg.train.ttt_length == 7 and cfg.train.grad_clip == 0.5
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert "python jobs/train_draft.py" in header  # the launch command is in the header


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("evaluate_draft*.yaml")), ids=lambda p: p.name)
def test_evaluate_yaml_validates(path):
    cfg = load_config(EvaluateJobConfig, path)
    assert cfg.evaluate.max_depth == 7


def test_train_config_rejects_bad_combinations():
    with pytest.raises(ConfigError, match="fsdp"):
        load_config(TrainJobConfig, None, ["train.fsdp=true"])
    with pytest.raises(ConfigError, match="local mode"):
        load_config(TrainJobConfig, None, ["train.num_workers=0", "train.fault_injection_step=3"])
    with pytest.raises(ConfigError, match="train.grad_clipp"):
        load_config(TrainJobConfig, None, ["train.grad_clipp=1"])


def test_lr_schedule_warmup_then_cosine_to_floor():
    f = lr_factor(warmup=4, total=20, min_ratio=0.1)
    warm = [f(s) for s in range(4)]
    assert warm == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f(4) == pytest.approx(1.0)
    decay = [f(s) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert f(20) == pytest.approx(0.1) and f(12) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(0, 10, 0.0)(0) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- a tiny head


def tiny_draft(vocab: int = 40, draft_vocab: int = 40, seed: int = 0) -> Eagle3Draft:
    config = DraftConfig(hidden_size=16, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=4, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 100.0},
                         max_position_embeddings=64, vocab_size=vocab, draft_vocab_size=draft_vocab,
                         target_hidden_size=16, aux_layer_ids=[0, 1, 2], torch_dtype="float32")
    torch.manual_seed(seed)
    draft = Eagle3Draft(config)
    draft.set_vocab_mapping(*build_vocab_mapping(torch.arange(vocab), draft_vocab))
    return draft


def tiny_batch(seed: int, vocab: int = 40, b: int = 2, t: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    attention = torch.ones(b, t, dtype=torch.long)
    attention[-1, -2:] = 0
    loss_mask = attention.clone()
    loss_mask[:, :3] = 0
    return {"aux": torch.randn(b, t, 48, generator=g), "hidden": torch.randn(b, t, 16, generator=g),
            "input_ids": torch.randint(0, vocab, (b, t), generator=g), "loss_mask": loss_mask,
            "attention_mask": attention}


TARGET = (torch.randn(40, 16, generator=torch.Generator().manual_seed(9)),
          torch.randn(40, 16, generator=torch.Generator().manual_seed(10)))


def run_steps(module, optimizer, scheduler, seeds) -> list[float]:
    losses = []
    for seed in seeds:
        b = tiny_batch(seed)
        loss, *_ = module(*TARGET, b["aux"], b["hidden"], b["input_ids"], b["loss_mask"], b["attention_mask"], 3, 0.8)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 0.5)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_checkpoint_round_trip_continues_identically(tmp_path):
    """Save after 3 steps, restore into fresh objects: the next steps match bit for bit."""
    cfg = TrainConfig(lr=1e-2, warmup_ratio=0.2, weight_decay=0.01)
    module = TTTModule(tiny_draft())
    optimizer, scheduler = build_optimizer(module.parameters(), cfg, max_steps=8)
    run_steps(module, optimizer, scheduler, [1, 2, 3])
    state = TrainState(step=3, epoch=1, batch_in_epoch=2, tokens_total=99, history=[{"step": 3.0, "loss": 1.0}])
    save_checkpoint(tmp_path, model_state(module), optimizer_state(module, optimizer), scheduler.state_dict(), state)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MODEL_FILE, OPTIMIZER_FILE, STATE_FILE])
    expected = run_steps(module, optimizer, scheduler, [4, 5])

    fresh = TTTModule(tiny_draft(seed=123))
    opt2, sched2 = build_optimizer(fresh.parameters(), cfg, max_steps=8)
    restored = restore(str(tmp_path), fresh, opt2, sched2)
    assert (restored.step, restored.epoch, restored.batch_in_epoch, restored.tokens_total) == (3, 1, 2, 99)
    assert sched2.last_epoch == 3
    assert run_steps(fresh, opt2, sched2, [4, 5]) == expected
    for (name, a), b in zip(module.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    module = TTTModule(tiny_draft())
    optimizer, scheduler = build_optimizer(module.parameters(), TrainConfig(), max_steps=4)
    run_steps(module, optimizer, scheduler, [1])
    save_checkpoint(tmp_path, model_state(module), optimizer_state(module, optimizer), scheduler.state_dict(),
                    TrainState(step=1))
    weights, optim, sched, state = load_checkpoint(tmp_path)
    assert set(weights) == set(tiny_draft().state_dict())  # export keys, no "draft." prefix
    assert json.loads((tmp_path / STATE_FILE).read_text())["format_version"] == 1
    assert state.step == 1 and sched["last_epoch"] == 1
    assert optim["param_groups"][0]["betas"] == (0.9, 0.95)
    with pytest.raises(FileNotFoundError, match="lacks"):
        load_checkpoint(tmp_path / "nope")


def test_stored_checkpoints_lists_complete_ones_newest_first(tmp_path):
    import pyarrow.fs as pafs

    module = TTTModule(tiny_draft())
    optimizer, scheduler = build_optimizer(module.parameters(), TrainConfig(), max_steps=4)
    for step, name in ((2, "checkpoint_a"), (6, "checkpoint_c"), (4, "checkpoint_b")):
        save_checkpoint(tmp_path / "run" / name, model_state(module), optimizer_state(module, optimizer),
                        scheduler.state_dict(), TrainState(step=step))
    (tmp_path / "run" / "checkpoint_c" / OPTIMIZER_FILE).unlink()  # an interrupted upload
    fs = pafs.LocalFileSystem()
    found = stored_checkpoints(fs, str(tmp_path / "run"))
    assert [(step, Path(d).name) for step, d in found] == [(4, "checkpoint_b"), (2, "checkpoint_a")]
    assert stored_checkpoints(fs, str(tmp_path / "missing")) == []
    local = tmp_path / "copy"
    local.mkdir()
    assert load_checkpoint(copy_to_local(fs, found[0][1], str(local)))[3].step == 4


def test_optimizer_state_flattening_round_trips():
    osd = {"state": {"a.w": {"step": torch.tensor(3.0), "exp_avg": torch.ones(2), "extra": 5}},
           "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["a.w"]}]}
    tensors, meta = flatten_optimizer_state(osd)
    assert set(tensors) == {"state/a.w/step", "state/a.w/exp_avg"}
    back = unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)))
    assert back["state"]["a.w"]["extra"] == 5 and torch.equal(back["state"]["a.w"]["exp_avg"], torch.ones(2))
    assert back["param_groups"][0]["betas"] == (0.9, 0.99)


# ----------------------------------------------------------------------------- data positions


class FakeShard:
    """iter_batches like a Ray DataIterator over ``rows`` integers."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def iter_batches(self, batch_size, batch_format, prefetch_batches, **shuffle):
        order = list(range(self.rows))
        if shuffle:
            random.Random(shuffle["local_shuffle_seed"]).shuffle(order)
        for i in range(0, self.rows, batch_size):
            yield pa.table({"x": order[i:i + batch_size]})


def take(stream, n):
    return [(e, i, t["x"].to_pylist()[0]) for (e, i, t), _ in zip(stream, range(n), strict=False)]


def test_micro_batches_walk_epochs_and_resume_at_position():
    full = take(micro_batches(FakeShard(10), 4), 7)
    assert full == [(0, 0, 0), (0, 1, 4), (0, 2, 8), (1, 0, 0), (1, 1, 4), (1, 2, 8), (2, 0, 0)]
    assert take(micro_batches(FakeShard(10), 4, epoch=0, skip=2), 2) == full[2:4]
    assert take(micro_batches(FakeShard(10), 4, epoch=1, skip=3), 1) == [(2, 0, 0)]  # end of epoch
    with pytest.raises(RuntimeError, match="past the end"):
        take(micro_batches(FakeShard(10), 4, epoch=0, skip=5), 1)
    with pytest.raises(RuntimeError, match="empty"):
        take(micro_batches(FakeShard(0), 4), 1)
    shuffled = take(micro_batches(FakeShard(10), 4, shuffle_buffer=4, seed=7), 6)
    assert [x for _, _, x in shuffled[:3]] != [x for _, _, x in shuffled[3:]]  # a new order per epoch
    assert take(micro_batches(FakeShard(10), 4, epoch=1, skip=1, shuffle_buffer=4, seed=7), 2) == shuffled[4:6]
    assert micro_batches_per_epoch(10, 2, 4) == 2
    with pytest.raises(ValueError, match="workers"):
        micro_batches_per_epoch(1, 2, 4)


def test_metrics_are_count_weighted_over_micro_batches_and_window():
    a = step_stats(torch.tensor(2.0), torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0]), torch.tensor([4, 2]), 10)
    b = step_stats(torch.tensor(4.0), torch.tensor([3.0, 2.0]), torch.tensor([1.0, 0.0]), torch.tensor([4, 6]), 30)
    m = stats_to_metrics(a + b, 2)
    assert m["loss"] == 3.0 and m["tokens"] == 40
    assert m["acc_0"] == pytest.approx(0.75) and m["acc_1"] == pytest.approx(0.25)
    assert m["step_loss_0"] == 2.0
    window = deque([{**m, "tokens_per_s": 1.0, "first_of_attempt": 1.0},
                    {**m, "tokens_per_s": 40.0, "first_of_attempt": 0.0}])
    s = window_summary(window, 2, TrainState(step=2, tokens_total=80, train_seconds=41.0))
    assert s["tokens_per_s"] == pytest.approx(40.0) and s["tokens_per_s_overall"] == pytest.approx(80 / 41)
    assert s["acc_0"] == pytest.approx(0.75) and s["steps"] == 2


# ----------------------------------------------------------------------------- driver decisions


def test_prepare_run_keeps_unfinished_runs_for_resume(tmp_path):
    art = storage.Artifact(str(tmp_path / "out"))
    storage.write_bytes(art.path("checkpoints", "run", "x"), b"ckpt")
    assert prepare_run(art, "h1", force=False) and storage.exists(art.path("checkpoints", "run", "x"))
    art.write_manifest("train", {}, "h1")
    assert prepare_run(art, "h1", force=False) is False
    with pytest.raises(storage.ArtifactError, match="force"):
        prepare_run(art, "h2", force=False)
    assert prepare_run(art, "h2", force=True) and not storage.exists(art.path("checkpoints", "run", "x"))


class FakeCountDataset:
    def __init__(self, ids, mask):
        self.table = pa.table({"input_ids": ids, "loss_mask": mask})

    def select_columns(self, cols):
        return self

    def iter_batches(self, batch_size, batch_format):
        yield self.table


def target_cfg(vocab: int) -> dict:
    return {"num_hidden_layers": 5, "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 64, "vocab_size": vocab,
            "rope_parameters": {"rope_type": "default", "rope_theta": 100.0}}


def test_new_head_identity_or_counted_mapping():
    spec = FeatureSpec("unused", [0, 2, 3], 16)
    small = plan_new_head(load_config(TrainJobConfig, None, ["train.draft_vocab_size=64"]), spec, target_cfg(40), None)
    assert small.mapping_source == "identity" and small.d2t.abs().sum() == 0 and small.t2d.all()
    ds = FakeCountDataset([[1, 7, 7, 9], [9, 9, 3]], [[0, 1, 1, 1], [1, 1, 0]])
    plan = plan_new_head(load_config(TrainJobConfig, None, ["train.draft_vocab_size=2"]), spec, target_cfg(40), ds)
    assert plan.mapping_source == "counted" and plan.t2d.nonzero().flatten().tolist() == [7, 9]
    assert plan.config.aux_layer_ids == [0, 2, 3]


def test_init_from_reuses_the_checkpoint_mapping_never_rebuilds(tmp_path):
    config = DraftConfig.from_target_config(target_cfg(40), 8, [0, 2, 3])
    draft = Eagle3Draft(config)
    used = torch.tensor([1, 5, 6, 11, 20, 21, 30, 39])
    t2d = torch.zeros(40, dtype=torch.bool)
    t2d[used] = True
    draft.set_vocab_mapping(used - torch.arange(8), t2d)
    save_draft(draft, tmp_path / "prev", dtype="float32")
    plan = plan_from_init(str(tmp_path / "prev"), FeatureSpec("unused", [0, 2, 3], 16), target_cfg(40))
    assert isinstance(plan, HeadPlan) and plan.mapping_source.startswith("init_from:")
    assert torch.equal(plan.t2d, t2d) and torch.equal(plan.d2t, used - torch.arange(8))
    assert plan.init_weights_uri.endswith("prev/model.safetensors")
    with pytest.raises(ValueError, match="layers"):
        plan_from_init(str(tmp_path / "prev"), FeatureSpec("unused", [0, 1, 3], 16), target_cfg(40))
    assert math.isclose(plan.config.rms_norm_eps, config.rms_norm_eps)
