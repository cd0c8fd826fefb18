"""Local artifacts: atomic writes, manifest last, rerun skipping, refusal of unfinished artifacts."""

from __future__ import annotations

import pytest

from eyas import storage
from eyas.storage import Artifact, ArtifactError


def test_write_read_roundtrip(tmp_path):
    uri = str(tmp_path / "a" / "b.json")
    storage.write_json(uri, {"x": 1})
    assert storage.read_json(uri) == {"x": 1}
    assert not list((tmp_path / "a").glob("*.tmp-*"))  # no temp files left


def test_reader_refuses_artifact_without_manifest(tmp_path):
    art = Artifact(str(tmp_path / "art"))
    storage.write_bytes(art.path("shard-0.parquet"), b"x")
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        art.manifest()


def test_prepare_skips_finished_same_config_and_refuses_other(tmp_path):
    art = Artifact(str(tmp_path / "art"))
    assert art.prepare("h1", force=False) is True
    storage.write_bytes(art.path("shard.bin"), b"x")
    art.write_manifest("data", {"k": 1}, "h1", counts={"read": 1})
    assert art.prepare("h1", force=False) is False  # no-op rerun
    with pytest.raises(ArtifactError, match="force=true"):
        art.prepare("h2", force=False)
    assert art.prepare("h2", force=True) is True
    assert not (tmp_path / "art").exists()  # forced rerun starts clean


def test_partial_artifact_is_cleared_before_a_run(tmp_path):
    art = Artifact(str(tmp_path / "art"))
    storage.write_bytes(art.path("stale.bin"), b"x")
    assert art.prepare("h", force=False) is True
    assert storage.list_files(art.uri) == []


def test_list_files_recursive_and_suffix(tmp_path):
    for name in ("a/1.parquet", "a/b/2.parquet", "c.json"):
        storage.write_bytes(str(tmp_path / name), b"x")
    found = storage.list_files(str(tmp_path), ".parquet")
    assert [f.rsplit("/", 1)[1] for f in found] == ["1.parquet", "2.parquet"]


def test_unsupported_scheme_is_an_error():
    with pytest.raises(ArtifactError, match="unsupported storage URI"):
        storage.resolve("ftp://x/y")


def test_expand_file_dir_and_glob(tmp_path):
    for name in ("d/a.jsonl", "d/b.json", "d/c.txt", "d/sub/e.parquet"):
        storage.write_bytes(str(tmp_path / name), b"x")
    exts = (".jsonl", ".json", ".parquet")
    assert storage.expand(str(tmp_path / "d/a.jsonl"), exts) == [str(tmp_path / "d/a.jsonl")]
    names = [f.rsplit("/", 1)[1] for f in storage.expand(str(tmp_path / "d"), exts)]
    assert names == ["a.jsonl", "b.json", "e.parquet"]
    assert storage.expand(str(tmp_path / "d/*.json*"), exts) == [str(tmp_path / "d/a.jsonl"), str(tmp_path / "d/b.json")]
    with pytest.raises(ArtifactError, match="no such file"):
        storage.expand(str(tmp_path / "nothing/*.json"), exts)
