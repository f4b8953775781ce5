"""Request and response bodies, in the shapes OpenAI and TEI clients already send and expect.

Strict scalar types (``StrictStr``, ``StrictInt``) so that ``[1, "2"]`` or ``true`` is a 422 rather than being
coerced into something the client did not mean. Unknown fields are ignored, as TEI and OpenAI do, so newer
clients that send extra options keep working.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator


def _valid_unicode(v: str) -> str:
    """JSON may carry lone surrogates (``"\\ud800"``); they are not text and the tokenizer cannot take them."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"character {exc.start} is an unpaired surrogate (U+{ord(v[exc.start]):04X}); send valid Unicode"
        ) from None
    return v


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]
TokenIds = list[StrictInt]
# A string, a list of strings, one list of token ids, or a list of lists of token ids (OpenAI and TEI).
Inputs = Text | list[Text] | TokenIds | list[TokenIds]
TextInputs = Text | list[Text]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _direction(v: object) -> object:
    """TEI spells it ``Left``/``Right``; accept any case so hand-written requests do not trip on it."""
    if isinstance(v, str) and v.lower() in ("left", "right"):
        return v.capitalize()
    return v


class _NoPrompt(_Body):
    prompt_name: str | None = Field(
        None,
        description="TEI's sentence-transformers prompt; this server has none "
        "configured, so any value is refused with 422 rather than ignored.",
    )

    @field_validator("prompt_name")
    @classmethod
    def _refuse_prompt(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError(
                f"prompt {v!r} is not available: this model has no prompts (send the text with its "
                "prompt prepended instead)"
            )
        return v


class _Truncation(_Body):
    truncate: bool | None = Field(None, description="Truncate long inputs (default: the server's auto-truncate).")
    truncation_direction: Literal["Left", "Right"] = Field("Right", description="Which end to cut when truncating.")

    @field_validator("truncation_direction", mode="before")
    @classmethod
    def _norm_direction(cls, v: object) -> object:
        return _direction(v)


# ------------------------------------------------------------------------------------------ OpenAI


class OpenAIEmbeddingRequest(_Body):
    input: Inputs = Field(
        ...,
        description="A string, a list of strings, token ids, or a list of token id lists "
        "(up to max_inputs_per_openai_request, 2,048 by default, as OpenAI allows).",
    )
    model: str | None = Field(None, description="Accepted and not checked: this server serves one model.")
    encoding_format: Literal["float", "base64"] | None = Field(
        "float",
        description="float: lists of numbers; base64: each vector's little-endian float32 bytes. Optional as in "
        "OpenAI's API: null means float, like dimensions, user and model, whose null is their default.",
    )
    dimensions: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Keep the first N dimensions and renormalise to unit length (at most the model's size)."
    )
    user: str | None = Field(
        None,
        description="An end-user id, as OpenAI takes it; written to the request's access-log line, otherwise unused.",
    )


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


# ------------------------------------------------------------------------------------------ TEI


class EmbedRequest(_Truncation, _NoPrompt):
    inputs: Inputs
    normalize: bool = True
    dimensions: Annotated[int, Field(ge=1)] | None = None


class EmbedAllRequest(_Truncation, _NoPrompt):
    """TEI's ``/embed_all``: every token's final hidden state, unpooled and unnormalised."""

    inputs: Inputs


class ClassifyRequest(_Truncation):
    inputs: TextInputs
    raw_scores: bool = Field(False, description="Return logits instead of softmax probabilities.")
    top_k: Annotated[int, Field(ge=1)] | None = Field(None, description="Only the k best labels per input.")


class PredictRequest(_Truncation):
    """TEI's ``/predict``: a string ``"a"`` (or ``["a"]``), a pair ``["a", "b"]``, or a batch of singles and pairs
    ``[["a"], ["b", "c"]]``. The models served here classify single sequences: a pair is refused with 422."""

    inputs: Text | list[Text] | list[list[Text]]
    raw_scores: bool = False


class TextClassificationParameters(_Body):
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="Scores: softmax over the labels (default), each logit's sigmoid, or the raw logits."
    )
    top_k: Annotated[int, Field(ge=1)] | None = Field(None, description="Only the k best labels per input.")


class TextClassificationRequest(_Truncation):
    """The Hugging Face Inference API's text-classification body (what ``InferenceClient.text_classification``
    posts): accepted on ``POST /`` and ``/invocations``."""

    inputs: TextInputs
    parameters: TextClassificationParameters = Field(default_factory=TextClassificationParameters)


class TokenizeRequest(_NoPrompt):
    inputs: TextInputs
    add_special_tokens: bool = True


class DecodeRequest(_Body):
    ids: TokenIds | list[TokenIds] = Field(..., description="One token id list, or a list of them.")
    skip_special_tokens: bool = True


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(..., description="Unix time at which this server loaded the model.")
    owned_by: str


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class Prediction(BaseModel):
    label: str
    score: float


class SimpleToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class ErrorResponse(BaseModel):
    """TEI's error body; ``error_type`` is TEI's name where TEI has the case (``Validation``, ``Empty``, ...)."""

    error: str
    error_type: str


class OpenAIError(BaseModel):
    message: str
    type: str = Field(..., description="invalid_request_error, rate_limit_error or server_error")
    param: str | None = Field(None, description="The request field at fault, where there is one.")
    code: str | None = Field(
        None,
        description="invalid_api_key, model_not_found, or this server's error kind "
        "(empty, validation, too_many_inputs, overloaded, timeout, ...).",
    )


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error body, on the OpenAI routes (``/v1/*`` and their aliases)."""

    error: OpenAIError
