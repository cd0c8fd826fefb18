"""The corpus n-gram store: equal to counting with back-off, its chains, its file, and its place
in the offline evaluation (the engine's corpus branch is tested in test_engine_speculative.py)."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from eyas.engine.ngram_store import STORE_FILE, NgramStore, split_sequences, write_store
from eyas.evaluate.report import format_table, summarize
from eyas.evaluate.scorer import draft_store, score_batch


def counted_next(seqs: list[list[int]], context: list[int], min_n: int, max_n: int) -> int | None:
    """Reference: count every (n-gram, next) pair; back off from the longest matching context,
    stop at the first length that never occurred; ties go to the smallest token."""
    found = None
    for n in range(1, min(max_n, len(context)) + 1):
        followers = Counter(s[i + n] for s in seqs for i in range(len(s) - n)
                            if s[i:i + n] == context[-n:])
        if not followers:
            break
        if n >= min_n:
            best = max(followers.values())
            found = min(t for t, c in followers.items() if c == best)
    return found


@pytest.mark.parametrize("min_n,max_n", [(2, 5), (1, 3)])
def test_next_token_equals_counting_with_back_off(min_n, max_n):
    rng = random.Random(0)
    seqs = [[rng.randint(0, 5) for _ in range(rng.randint(0, 40))] for _ in range(40)]
    store = NgramStore.build(seqs, min_n, max_n)
    for _ in range(1500):
        context = [rng.randint(0, 5) for _ in range(rng.randint(0, 8))]
        assert store.next_token(context) == counted_next(seqs, context, min_n, max_n), context


def test_chains_follow_the_corpus_and_stop_where_it_ends():
    seqs = [[7, 1, 2, 3, 4, 5], [9, 1, 2, 3, 4, 6], [8, 1, 2, 3, 4, 5]]
    store = NgramStore.build(seqs, min_n=2, max_n=5)
    assert store.propose([40, 1, 2], 10) == [3, 4, 5]  # 4 -> 5 twice, -> 6 once; nothing after 5
    assert store.propose([9, 1, 2, 3], 10) == [4, 6]  # the longer context (9 1 2 3 4) decides
    assert NgramStore.build(seqs, 2, 4).propose([9, 1, 2, 3], 10) == [4, 5]  # 9 out of reach
    assert store.propose([40, 1, 2], 2) == [3, 4]
    assert store.propose([2], 5) == [] and store.propose([], 5) == []  # shorter than min_n
    assert store.propose([11, 12], 5) == []  # never seen


def test_file_round_trip_and_format_check(tmp_path):
    store = NgramStore.build([[1, 2, 3, 1, 2, 4]], 2, 3)
    store.save(str(tmp_path / STORE_FILE))
    again = NgramStore.load(str(tmp_path / STORE_FILE))
    assert (again.min_n, again.max_n) == (2, 3) and np.array_equal(again.keys, store.keys)
    assert again.propose([1, 2], 3) == store.propose([1, 2], 3)
    np.savez(tmp_path / "old.npz", keys=store.keys, next_tokens=store.next_tokens,
             meta=np.array([99, 2, 3]))
    with pytest.raises(ValueError, match="rebuild it"):
        NgramStore.load(str(tmp_path / "old.npz"))


def test_store_is_built_from_the_train_split(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "features" / "train").mkdir(parents=True)
    (tmp_path / "features" / "eval").mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": [[1, 2, 3, 4], [5, 1, 2, 3, 9]]}),
                   tmp_path / "features" / "train" / "a.parquet")
    pq.write_table(pa.table({"input_ids": [[1, 2, 3, 7]]}), tmp_path / "features" / "eval" / "b.parquet")
    assert list(split_sequences(str(tmp_path / "features" / "train"))) == [[1, 2, 3, 4], [5, 1, 2, 3, 9]]
    uri, contexts = write_store(str(tmp_path / "features"), str(tmp_path / "draft"), max_n=3)
    store = draft_store(str(tmp_path / "draft"))
    assert uri.endswith(STORE_FILE) and contexts == len(store) > 0
    assert store.propose([1, 2, 3], 1) in ([4], [9])  # never 7: eval rows are not in the store
    assert draft_store(str(tmp_path / "features")) is None


def test_evaluation_scores_the_corpus_drafters():
    """A store built from the rows themselves predicts every reply token the rows hold."""
    from test_evaluate_acceptance import EMBED, LM_HEAD, make_batch, make_draft

    draft, batch, depth = make_draft(), make_batch(b=3, t=12), 3
    ids = batch["input_ids"]
    store = NgramStore.build([ids[i, :int(batch["attention_mask"][i].sum())].tolist() for i in range(3)],
                             min_n=2, max_n=12)
    stats = score_batch(draft, EMBED, LM_HEAD, batch, depth, 1, 2, store=store)
    report = summarize(stats, depth)
    data = report["references"]["data"]
    assert set(data) == {"head", "ngram", "head+ngram", "corpus", "head+ngram+corpus"}
    assert data["corpus"]["tau"]["3"] > 2.0  # nearly every chain of 3 is right
    assert data["head+ngram+corpus"]["tau"]["3"] >= data["head+ngram"]["tau"]["3"]
    assert "tau head+ngram+corpus" in format_table(report)
    plain = score_batch(draft, EMBED, LM_HEAD, batch, depth, 1, 2)
    assert set(plain["walks"]["data"]) == {"head", "ngram", "head+ngram"}
