"""OpenAI-compatible request and response models, errors, and the streaming (SSE) format.

Requests are strict: an unknown field, a wrong JSON type or an unsupported option (``n > 1``,
``logprobs``, ``echo``, penalties other than 0) is a 400 naming the parameter, never silently
ignored. Extensions shared with vLLM/SGLang: ``top_k``, ``ignore_eos``, ``stop_token_ids`` and
``stream_options.continuous_usage_stats`` (usage on every chunk).

Hostile input is a 4xx, never a 500: a body that is not UTF-8 JSON (or nests too deep, or has an
integer beyond Python's digit limit, or NaN/Infinity) is ``invalid_json``; a lone UTF-16
surrogate in any text field is ``invalid_value``; ``stop_token_ids`` holds at most
``MAX_STOP_TOKEN_IDS`` non-negative ids. Sampling knobs below what float32 can carry are floored
(``sampling_params``, with ``eyas.engine.sampling``'s floors, for every backend): a
temperature under ``TEMPERATURE_FLOOR`` is greedy, top_p is at least ``TOP_P_FLOOR``.

Usage extension (documented; the load tester reads it): with speculative statistics
``usage.spec = {"verify_steps": n, "accepted_tokens": m, "acceptance_length": x}`` and, for
SGLang parity, ``usage.spec_verify_ct = n``. ``acceptance_length`` is tokens emitted per
target verification step (1.0 for plain decoding).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    from eyas.engine.sampling import SamplingParams

MAX_STOP_STRINGS = 4
MAX_STOP_TOKEN_IDS = 64


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)
        self.headers = headers  # e.g. Retry-After on 503

    def body(self) -> dict[str, Any]:
        """The OpenAI-style JSON error body."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """``{"error": {...}}`` as OpenAI writes it; client-supplied text in ``message`` or ``param``
    (an unknown field's name) is cut short and made encodable, so an error can always be sent."""
    return {"error": {"message": _printable(message, 1000), "type": type_,
                      "param": None if param is None else _printable(param, 200), "code": code}}


def _printable(text: str, limit: int) -> str:
    text = text if len(text) <= limit else text[:limit] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# ----------------------------------------------------------------------------- requests


def _valid_unicode(text: str) -> str:
    """Reject lone UTF-16 surrogates (JSON allows ``"\\ud800"``; no tokenizer takes them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains an unpaired UTF-16 surrogate at character {exc.start}; "
                         "send valid Unicode text") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
TokenId = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    """Unknown fields are errors; JSON types are not coerced ("5" is not an int)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False  # a last chunk with usage (and the spec extension)
    continuous_usage_stats: bool = False  # extension: cumulative usage on every chunk


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    """A chat turn; content is text or a list of text parts (images are not supported)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def text(self) -> str:
        """The content as one string (text parts joined without separator, as OpenAI does)."""
        return self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content)

    def template_role(self) -> str:
        """The role the chat template sees ("developer" is OpenAI's newer name for system)."""
        return "system" if self.role == "developer" else self.role


class _Sampling(_Strict):
    """Fields shared by chat and text completions."""

    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what a torch.Generator takes
    user: Text | None = None  # accepted for compatibility; only logged by OpenAI itself
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Extensions (vLLM/SGLang names).
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n={n}: this server returns exactly one choice per request; "
                             "send n separate requests (with different seeds) instead")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError(f"{value}: penalties are not supported; leave them at 0")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"{len(stops)} stop strings: at most {MAX_STOP_STRINGS} are allowed")
        if any(not s for s in stops):
            raise ValueError("stop contains an empty string; remove it")
        return stop

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's parameters for this request (``max_tokens`` already resolved)."""
        from eyas.engine.sampling import TEMPERATURE_FLOOR, TOP_P_FLOOR, SamplingParams

        temperature = 0.0 if self.temperature < TEMPERATURE_FLOOR else self.temperature
        return SamplingParams(max_tokens=max_tokens, temperature=temperature,
                              top_p=max(self.top_p, TOP_P_FLOOR), top_k=max(self.top_k, 0),
                              stop=self.stop_list,
                              stop_token_ids=list(self.stop_token_ids),
                              ignore_eos=self.ignore_eos, seed=self.seed)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> ChatCompletionRequest:
        if self.logprobs or self.top_logprobs is not None:
            raise ValueError("logprobs are not supported; remove logprobs/top_logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        """The conversation as the chat template takes it."""
        return [{"role": m.template_role(), "content": m.text()} for m in self.messages]


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: one prompt, as text or token ids."""

    prompt: Text | list[TokenId] | list[Text] | list[list[TokenId]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: Text | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        batched = isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list)
        if batched and len(prompt) != 1:
            raise ValueError(f"{len(prompt)} prompts in one request: send one prompt per "
                                 "request (batches are not supported)")
        return prompt

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        for name, bad in (("echo", self.echo), ("logprobs", self.logprobs is not None),
                          ("best_of", self.best_of not in (None, 1)),
                          ("suffix", self.suffix is not None)):
            if bad:
                raise ValueError(f"{name} is not supported; remove it")
        return self

    def single_prompt(self) -> str | list[int]:
        """The prompt text or token ids (a one-element batch unwrapped)."""
        p = self.prompt
        return p[0] if isinstance(p, list) and p and isinstance(p[0], str | list) else p


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_request(model: type[_Sampling], body: bytes, max_bytes: int) -> Any:
    """Bytes of a request body -> a validated request; APIError 400/413 naming the problem."""
    if len(body) > max_bytes:
        raise APIError(413, f"request body of {len(body)} bytes exceeds the limit of {max_bytes}",
                       code="request_too_large")
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, "the request body nests too deeply to be a request; send a flat "
                       "JSON object", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit, NaN
        raise APIError(400, f"the request body is not valid JSON ({_short(exc)}); send a JSON "
                       "object", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_api_error(exc) from None
    except RecursionError:
        raise APIError(400, "the request nests too deeply", code="invalid_value") from None


def _short(exc: Exception, limit: int = 200) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


def validation_api_error(exc: ValidationError) -> APIError:
    """A pydantic error -> 400 whose ``param`` is the first bad field's dotted path."""
    errors = exc.errors()
    lines = []
    for err in errors[:5]:
        loc = ".".join(str(p)[:60] for p in err["loc"]) or "<body>"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}")
    first = errors[0]["loc"] if errors else ()
    param = ".".join(str(p)[:60] for p in first) or None
    return APIError(400, "invalid request: " + "; ".join(lines), param=param,
                    code="invalid_value")


# ----------------------------------------------------------------------------- responses


class SpecUsage(BaseModel):
    """Speculative-decoding statistics of one request (extension field ``usage.spec``)."""

    verify_steps: int
    accepted_tokens: int
    acceptance_length: float


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    spec_verify_ct: int | None = None  # SGLang's name for verify_steps (parity)
    spec: SpecUsage | None = None

    def dump(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def new_id(prefix: str) -> str:
    import uuid

    return f"{prefix}-{uuid.uuid4().hex}"


def chat_response(rid: str, model: str, text: str, finish_reason: str | None,
                  usage: Usage) -> dict[str, Any]:
    """A non-streaming ``chat.completion`` object."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text},
              "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage.dump()}


def completion_response(rid: str, model: str, text: str, finish_reason: str | None,
                        usage: Usage) -> dict[str, Any]:
    """A non-streaming ``text_completion`` object."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage.dump()}


def stream_chunk(rid: str, model: str, chat: bool, created: int, *, text: str | None = None,
                 role: bool = False, finish_reason: str | None = None,
                 usage: Usage | None = None, include_usage: bool = False) -> dict[str, Any]:
    """One streamed chunk: a content delta and/or a finish reason (``choices`` has one entry).

    With ``include_usage`` every content chunk carries ``"usage": null`` (or cumulative usage
    when given), as OpenAI does when ``stream_options.include_usage`` is on.
    """
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None,
                  "finish_reason": finish_reason}
    chunk = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
             "created": created, "model": model, "choices": [choice]}
    if usage is not None or include_usage:
        chunk["usage"] = usage.dump() if usage is not None else None
    return chunk


def usage_chunk(rid: str, model: str, chat: bool, created: int, usage: Usage) -> dict[str, Any]:
    """The last chunk of a stream with ``include_usage``: no choices, the final usage."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [], "usage": usage.dump()}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>\\n\\n`` (or ``data: [DONE]\\n\\n``)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse("[DONE]")
