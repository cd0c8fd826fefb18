"""Training on Ray Train end to end: real stories260k features, 2 gloo workers, a killed worker,
a stopped and restarted job, export + check, and the offline acceptance job on the result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from eyas import storage
from eyas.config import load_config
from eyas.export.check import check_draft_dir
from eyas.features.schema import FEATURE_SCHEMA, encode_row
from eyas.train.config import TrainJobConfig
from eyas.train.trainer import run_training

pytestmark = pytest.mark.integration
JOBS = Path(__file__).resolve().parents[2] / "jobs"
AUX_LAYER_IDS = [0, 2, 3]  # stories260k has 5 layers: EAGLE-3's formula collapses, pick 3 distinct
SUBJECTS = ["little dog", "big cat", "small bird", "girl named Lily", "boy named Tom", "red ball",
            "happy frog", "old tree", "tiny fish", "brave bunny", "kind bear", "shiny car"]


def feature_rows(model_dir: Path, n: int, new_tokens: int) -> list[dict]:
    """On-policy rows: the target's greedy replies to story prompts, with its real hidden states."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = []
    for i in range(n):
        prompt = f"Once upon a time, there was a {SUBJECTS[i % len(SUBJECTS)]}{' at home' * (i // len(SUBJECTS))}."
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                      add_generation_prompt=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            full = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0]
            states = model(full[None], output_hidden_states=True).hidden_states  # (emb, layer 0.., final norm)
        aux = torch.cat([states[j + 1][0] for j in AUX_LAYER_IDS], dim=-1)  # (T, 3H) layer OUTPUTS
        mask = [0] * len(ids) + [1] * (len(full) - len(ids))
        rows.append(encode_row(f"r{i}", full.tolist(), mask, aux, states[-1][0]))
    return rows


@pytest.fixture(scope="module")
def features(stories260k, tmp_path_factory) -> str:
    """A finished features artifact: 12 train rows (one file), 4 eval rows, manifest last."""
    torch.set_num_threads(1)
    uri = str(tmp_path_factory.mktemp("features") / "features")
    rows = feature_rows(stories260k, 16, new_tokens=32)
    for split, part in (("train", rows[:12]), ("eval", rows[12:])):
        Path(uri, split).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(part, schema=FEATURE_SCHEMA), f"{uri}/{split}/part-00000.parquet")
    target = {"path": str(stories260k), "num_layers": 5, "hidden_size": 64, "vocab_size": 512,
              "aux_layer_ids": AUX_LAYER_IDS, "hidden_states_indices": [i + 1 for i in AUX_LAYER_IDS]}
    storage.Artifact(uri).write_manifest("features", {"encoding": "bf16"}, "test", target=target)
    return uri


def overrides(features: str, output: str, **train) -> list[str]:
    base = {"batch_size": 2, "max_length": 64, "lr": 3e-3, "warmup_ratio": 0.2, "checkpoint_every": 2,
            "num_workers": 1, "cpus_per_worker": 0.5, "max_steps": 6, "shuffle_buffer": 6, **train}
    return [f"run.output={output}", f"features.artifact={features}"] + [f"train.{k}={v}" for k, v in base.items()]


def run_job(script: str, args: list[str]) -> dict:
    sys.path.insert(0, str(JOBS))
    try:
        module = __import__(script)
        return module.main(["--config", str(JOBS / "configs" / f"{script}.yaml"), *args])
    finally:
        sys.path.remove(str(JOBS))


def test_two_workers_killed_worker_recovers_then_export_and_evaluate(ray_local, features, stories260k, tmp_path,
                                                                     monkeypatch):
    """2 gloo workers; rank 0 os._exit()s before step 3 once; the run resumes from the step-2
    checkpoint (not 0), finishes, exports a checked draft; the evaluate job scores it. Outputs are
    RELATIVE paths (workers and actors run in other directories)."""
    monkeypatch.chdir(tmp_path)
    out = "train"
    args = overrides(features, out, num_workers=2, max_steps=4, fault_injection_step=3, max_failures=1,
                     cache_data="true")
    manifest = run_job("train_draft", args)
    assert manifest["steps"] == 4 and manifest["resumed_at"] == [2]
    assert storage.exists(f"{out}/checkpoints/run/_fault_injected_step3")
    assert set(manifest["final"]) >= {f"acc_{j}" for j in range(7)} and manifest["tokens_per_s"] > 0
    assert manifest["vocab"]["source"] == "identity" and manifest["aux_layer_ids"] == AUX_LAYER_IDS
    assert check_draft_dir(f"{out}/draft", stories260k) == []
    assert run_job("train_draft", args) == manifest  # finished: a no-op rerun

    report_dir = "eval"
    ev = run_job("evaluate_draft", [f"run.output={report_dir}", f"features.artifact={features}",
                                    f"evaluate.draft={out}/draft", "evaluate.max_length=64", "evaluate.batch_size=3"])
    report = json.loads(Path(report_dir, "acceptance.json").read_text())
    assert ev["counts"]["rows"] == 4 and set(ev["tau"]["head"]) == {str(d) for d in range(1, 8)}
    assert report["data_equals_target_argmax"] > 0.9  # the rows are the target's own greedy replies
    for drafter in ("head", "ngram"):
        assert all(v >= 1.0 for v in report["references"]["data"][drafter]["tau"].values())


def test_stopped_job_restarts_at_its_checkpoint_with_identical_losses(ray_local, features, tmp_path, s3_prefix):
    """Reference: one uninterrupted run (Ray Train local mode, same math as 1 worker). Then a
    1-worker job writing to S3 dies before step 5 with no failure budget; rerun with the same name,
    it resumes at step 4 mid-epoch (6 shuffled batches of 2 rows per epoch) and its steps 5-6 equal
    the uninterrupted run's; the draft is exported to S3."""
    import ray.data

    # the seam: any Dataset of feature rows (here in the object store: no read tasks to start)
    train = {"train": ray.data.from_arrow(pq.read_table(f"{features}/train"))}
    reference = run_training(load_config(TrainJobConfig, None, overrides(features, str(tmp_path / "ref"),
                                                                         num_workers=0)), train)
    out = f"{s3_prefix}/job"
    with pytest.raises(Exception, match="(?i)fail|error"):
        run_training(load_config(TrainJobConfig, None, overrides(features, out, fault_injection_step=5,
                                                                 max_failures=0)), train)
    assert not storage.Artifact(out).is_complete()
    resumed = run_training(load_config(TrainJobConfig, None, overrides(features, out)), train)
    assert resumed["resumed_at"] == [4] and resumed["steps"] == reference["steps"] == 6
    assert [s["step"] for s in resumed["last_steps"]] == [s["step"] for s in reference["last_steps"]] == [5, 6]
    got, want = [s["loss"] for s in resumed["last_steps"]], [s["loss"] for s in reference["last_steps"]]
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)  # the same model, optimizer, lr and batches
    assert storage.list_files(f"{out}/draft") == [f"{out}/draft/config.json", f"{out}/draft/model.safetensors",
                                                  f"{out}/draft/ngram_store.npz"]  # written to s3 too
    assert storage.exists(f"{out}/checkpoints/run") and storage.exists(f"{out}/vocab_mapping.safetensors")


@pytest.mark.gpu
def test_one_gpu_worker_bf16_autocast_and_gpu_evaluation(ray_local, features, stories260k, tmp_path):
    """NCCL backend, bf16 autocast, a GPU worker; then the evaluation actor on the GPU."""
    out = str(tmp_path / "gpu")
    manifest = run_job("train_draft", overrides(features, out, use_gpu="true", precision="bf16", max_steps=4,
                                                cpus_per_worker=1))
    assert manifest["steps"] == 4 and manifest["final"]["loss"] == manifest["final"]["loss"]  # not NaN
    assert check_draft_dir(f"{out}/draft", stories260k) == []
    ev = run_job("evaluate_draft", [f"run.output={tmp_path / 'gpu-eval'}", f"features.artifact={features}",
                                    f"evaluate.draft={out}/draft", "evaluate.num_gpus_per_actor=1"])
    assert ev["counts"]["rows"] == 4
