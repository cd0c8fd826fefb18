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
