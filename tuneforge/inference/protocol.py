"""What the API adds to an OpenAI request when it forwards it to the engine: which base model and
which stored adapter serve the requested name. Plain data, no torch: both processes import it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

AdapterFamily = Literal["lora", "ia3", "prompt_tuning", "prefix_tuning"]

FIELD = "tuneforge"
"""The key of the routing object in the forwarded body (removed before the body is read as OpenAI's)."""


class AdapterRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    storage_key: str = Field(description="The adapter's `.tar.gz` in the object store.")
    kind: str = Field("adapter", description="`adapter` (PEFT, onto the base) or `model` (full weights).")
    family: AdapterFamily = Field(
        "lora",
        description="The PEFT method: LoRA (DoRA and QLoRA too) adapters share mixed-adapter batches; "
        "the others run on a copy of the base of their own, one adapter per batch.",
    )


class Route(BaseModel):
    """Which weights serve a request: a base model on offer, plus a stored adapter or full model."""

    model_config = ConfigDict(extra="forbid")
    base_model: str
    adapter: AdapterRef | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="A last chunk with `usage` and no choices.")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="Text, or a list of text parts.")
    name: str | None = None

    def as_template_message(self) -> dict[str, Any]:
        """What the chat template sees: `developer` is the system role of older templates."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


Stop = str | Annotated[list[str], Field(min_length=1, max_length=4)] | None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(
        description="A base model on offer, an `ft:` model or an `ft:…:ckpt-step-N` checkpoint."
    )
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16, description="Choices to generate.")
    stop: Stop = Field(None, description="Up to 4 strings; generation stops before any of them.")
    seed: int | None = Field(None, description="Same seed, same parameters: the same sampled text.")
    stream: bool = Field(False, description="Server-sent events, ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(s for s in self.stop if s)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated name of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="Log probabilities of the chosen tokens.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: the likeliest tokens.")


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=16)]
    max_tokens: int | None = Field(16, ge=1, description="OpenAI's default is 16.")
    logprobs: int | None = Field(
        None, ge=0, le=5, description="Log probabilities of the chosen and top tokens."
    )
    echo: Literal[False] = Field(False, description="Not supported (false only).")
    suffix: None = Field(None, description="Not supported.")
