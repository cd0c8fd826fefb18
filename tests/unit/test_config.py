"""Config loading: YAML + dotted overrides, strict validation with key paths."""

from __future__ import annotations

from typing import Literal

import pytest

from eyas.config import (
    ConfigError,
    StrictModel,
    apply_overrides,
    config_hash,
    load_config,
    parse_override,
)


class Inner(StrictModel):
    policy: Literal["redact", "drop"] = "redact"
    batch: int = 8


class Outer(StrictModel):
    name: str = "x"
    inner: Inner = Inner()
    layers: list[int] = [1, 2]


def test_override_values_are_yaml_typed():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=s3://bucket/x") == (["a"], "s3://bucket/x")


@pytest.mark.parametrize("bad", ["novalue", "=3", "a.b"])
def test_malformed_override_is_an_error(bad):
    with pytest.raises(ConfigError, match="key.sub=value|empty key"):
        parse_override(bad)


def test_overrides_merge_and_revalidate(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: y\ninner:\n  batch: 4\n")
    cfg = load_config(Outer, path, ["inner.policy=drop", "layers=[3,4,5]"])
    assert cfg.name == "y" and cfg.inner.batch == 4 and cfg.inner.policy == "drop"
    assert cfg.layers == [3, 4, 5]


def test_unknown_key_names_its_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  bacth: 4\n")
    with pytest.raises(ConfigError, match=r"inner\.bacth"):
        load_config(Outer, path)


def test_wrong_type_from_override_names_its_path():
    with pytest.raises(ConfigError, match=r"inner\.policy"):
        load_config(Outer, None, ["inner.policy=keep"])


def test_override_into_scalar_is_an_error():
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_hash_changes_with_content():
    assert config_hash(Outer()) == config_hash(Outer())
    assert config_hash(Outer()) != config_hash(Outer(name="z"))


def test_actor_threads_round_cpus_up_unless_set():
    from eyas.runtime import actor_threads

    assert actor_threads(None, 0.25) == 1 and actor_threads(None, 1.5) == 2
    assert actor_threads(None, 2) == 2 and actor_threads(3, 0.5) == 3


def test_job_start_prints_one_line_unless_asked_for_the_whole_config(capsys) -> None:
    from eyas.config import parse_job_args
    from eyas.train.config import TrainJobConfig

    parse_job_args(TrainJobConfig, "t", None, ["train.lr=0.002"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "overrides: train.lr=0.002" in out[0] and "hash" in out[0]
    parse_job_args(TrainJobConfig, "t", None, ["--show-config", "train.lr=0.002"])
    assert "lr: 0.002" in capsys.readouterr().out
