"""Configuration of the data stage (``jobs/prepare_data.py``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from eyas.config import RunConfig, StrictModel
from eyas.pii.config import PiiConfig

SourceFormat = Literal["auto", "sharegpt", "messages", "alpaca", "mt_bench", "prompt"]


class SourceConfig(StrictModel):
    """One prompt dataset: a file, a glob, or a directory; local, ``s3://`` or ``gs://``."""

    path: str
    name: str = ""  # recorded as each row's source; defaults to the file's stem
    format: SourceFormat = "auto"
    limit: int | None = Field(default=None, ge=1)  # at most this many records from this source


class GenerationConfig(StrictModel):
    """Regenerating the assistant replies with the target itself (on-policy data)."""

    mode: Literal["regenerate", "keep"] = "regenerate"  # keep = use the dataset's own replies
    engine: Literal["eyas", "hf", "sglang"] = "eyas"  # eyas: continuous batching (bench/regen_speed.py)
    max_new_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = 0
    resume: bool = True  # keep finished replies in <run.output>.regen_cache: a rerun regenerates only what is missing
    # A reply cut by max_new_tokens (finish reason "length") is kept with its end-of-turn token
    # masked 0: its tokens are the target's own, but the target never ended the turn there.
    # false: drop the conversation instead (filter reason truncated_reply). Counted either way.
    keep_truncated: bool = True
    batch_size: int = Field(default=16, ge=1)  # prompts per call (eyas: concurrent slots)
    max_seq_len: int = Field(default=2048, ge=16)  # eyas: KV cache length per slot (prompt + reply)
    num_actors: int = Field(default=1, ge=1)
    num_gpus_per_actor: float = Field(default=0.0, ge=0.0)
    num_cpus_per_actor: float = Field(default=1.0, ge=0.0)
    torch_threads: int | None = Field(default=None, ge=1)  # per actor; None: its CPUs rounded up
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tp_size: int = Field(default=1, ge=1)  # sglang tensor parallel size
    mem_fraction_static: float | None = Field(default=None, gt=0.0, lt=1.0)  # sglang


class TemplateConfig(StrictModel):
    """How the target's chat template is rendered, as the target is served."""

    # Qwen3-style thinking: passed to the template for regeneration and for the loss mask, which
    # trains the <think> block only when the target writes it (None: the template's default).
    enable_thinking: bool | None = None


class DataConfig(StrictModel):
    """Prompts -> validated, PII-scrubbed, regenerated, templated and tokenized conversations."""

    target: str = "assets:models/stories260k"  # HF model dir (tokenizer + chat template + weights)
    tokenizer: str | None = None  # defaults to target
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [
            SourceConfig(path="assets:datasets/sft/fastchat_dummy_conversation.json", limit=64),
            SourceConfig(path="assets:datasets/prompts/mt_bench_question.jsonl", limit=32),
            SourceConfig(path="assets:datasets/sft/llamafactory_alpaca_en_demo.json", limit=64),
        ]
    )
    max_length: int = Field(default=512, ge=8)  # tokens per conversation; longer ones are quarantined
    max_turns: int = Field(default=256, ge=2)  # messages per conversation; more: too_many_turns
    # characters of message text, checked before tokenizing (a 5 MB line is rejected at once);
    # None: 32 x max_length (no tokenizer here averages more than 32 characters a token)
    max_chars: int | None = Field(default=None, ge=1)
    fail_on_unreadable: bool = False  # true: exit non-zero (after writing the manifest) if a file is unreadable
    pii: PiiConfig = PiiConfig()
    generation: GenerationConfig = GenerationConfig()
    template: TemplateConfig = TemplateConfig()
    batch_size: int = Field(default=32, ge=1)  # rows per batch for validation, PII and tokenization
    pii_actors: int = Field(default=1, ge=1)
    rows_per_shard: int = Field(default=1000, ge=1)

    @property
    def char_cap(self) -> int:
        """``max_chars``, or its default of 32 characters per token of ``max_length``."""
        return self.max_chars if self.max_chars is not None else 32 * self.max_length

    @model_validator(mode="after")
    def _sources_present(self) -> DataConfig:
        if not self.sources:
            raise ValueError("data.sources is empty: name at least one prompt dataset")
        return self


class DataJobConfig(StrictModel):
    """The data job's whole configuration."""

    run: RunConfig = RunConfig(output="artifacts/data")
    data: DataConfig = DataConfig()
