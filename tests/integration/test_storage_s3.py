"""Artifacts on a real S3 server (SeaweedFS on loopback)."""

from __future__ import annotations

import pytest

from eyas import storage
from eyas.storage import Artifact, ArtifactError

pytestmark = pytest.mark.integration


def test_s3_roundtrip_and_manifest(s3_prefix):
    art = Artifact(f"{s3_prefix}/art")
    assert art.prepare("h", force=False)
    storage.write_bytes(art.path("shards/0.bin"), b"abc")
    with pytest.raises(ArtifactError):
        art.manifest()
    art.write_manifest("data", {}, "h", counts={"read": 3})
    assert art.manifest()["counts"] == {"read": 3}
    assert storage.read_bytes(art.path("shards/0.bin")) == b"abc"
    assert storage.list_files(art.uri, ".bin") == [art.path("shards/0.bin")]
    assert art.prepare("h", force=False) is False
    assert art.prepare("h", force=True) is True
    assert not storage.exists(art.manifest_uri)


def test_copy_streams_trees_and_files_through_s3(s3_prefix, tmp_path):
    """local tree -> S3 -> local tree, byte for byte, including a file larger than one copy
    chunk (streamed, never read whole); a single file too; a missing source names itself."""
    import os

    src = tmp_path / "draft"
    (src / "sub").mkdir(parents=True)
    big = os.urandom(storage.COPY_CHUNK + 12345)
    (src / "model.safetensors").write_bytes(big)
    (src / "sub" / "config.json").write_text('{"a": 1}')
    remote = storage.join(s3_prefix, "copied")
    storage.copy(str(src), remote)
    assert sorted(storage.list_files(remote)) == [storage.join(remote, "model.safetensors"),
                                                  storage.join(remote, "sub/config.json")]
    back = tmp_path / "back"
    storage.copy(remote, str(back))
    assert (back / "model.safetensors").read_bytes() == big
    assert (back / "sub" / "config.json").read_text() == '{"a": 1}'
    storage.copy(storage.join(remote, "sub/config.json"), str(tmp_path / "one" / "c.json"))
    assert (tmp_path / "one" / "c.json").read_text() == '{"a": 1}'
    with pytest.raises(ArtifactError, match="nope.*does not exist"):
        storage.copy(storage.join(remote, "nope"), str(tmp_path / "x"))
