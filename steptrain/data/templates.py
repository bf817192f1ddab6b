"""Chat templates that render a conversation as text segments with known loss boundaries.

Rendering to segments (rather than to one string) lets the encoder tokenize each piece on its own and
know exactly which tokens carry loss, without character-offset bookkeeping that depends on the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from steptrain.data.errors import DataError

LOSS_ON = ("all_assistant", "last_assistant")
NOT_PREFIX_STABLE = "chat template is not prefix-stable"

# Step-Audio role names (the user speaks as "human", tool results come back as "input").
STEP_ROLES = {"system": "system", "user": "human", "assistant": "assistant", "tool": "input"}
STEP_BOT, STEP_EOT = "<|BOT|>", "<|EOT|>"


@dataclass(frozen=True)
class Segment:
    text: str
    train: bool  # the tokens of this piece carry loss


class ChatTemplate:
    """Base: turns messages into segments; subclasses render the text."""

    def __init__(self, default_system: str | None = None):
        self.default_system = default_system

    def segments(self, messages: list[dict], *, loss_on: str = "all_assistant") -> list[Segment]:
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
        messages = self._with_system(messages)
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        trained = set(assistant if loss_on == "all_assistant" else assistant[-1:])
        return _merge(self._render(messages, trained))

    def generation_prompt(self, messages: list[dict]) -> str:
        """The text after which the model writes the next assistant reply."""
        raise NotImplementedError

    def _render(self, messages: list[dict], trained: set[int]) -> list[Segment]:
        raise NotImplementedError

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.default_system and not any(m["role"] == "system" for m in messages):
            return [{"role": "system", "content": self.default_system}, *messages]
        return list(messages)


class StepTemplate(ChatTemplate):
    """Step-Audio format: ``<|BOT|>{role}\\n{content}<|EOT|>`` per turn, optionally after BOS (ms-swift)."""

    def __init__(self, bos_token: str | None, default_system: str | None = None):
        super().__init__(default_system)
        self.prefix = bos_token or ""

    def _render(self, messages: list[dict], trained: set[int]) -> list[Segment]:
        out = [Segment(self.prefix, False)]
        for i, m in enumerate(messages):
            header = f"{STEP_BOT}{STEP_ROLES[m['role']]}\n"
            if m["role"] == "assistant":
                # The header is context; the reply and its end-of-turn token are what the model must produce.
                out += [Segment(header, False), Segment(m["content"] + STEP_EOT, i in trained)]
            else:
                out.append(Segment(header + m["content"] + STEP_EOT, False))
        return out

    def generation_prompt(self, messages: list[dict]) -> str:
        text = "".join(s.text for s in self._render(self._with_system(messages), set()))
        return f"{text}{STEP_BOT}assistant\n"


class JinjaTemplate(ChatTemplate):
    """The tokenizer's own chat template; assistant spans are found by rendering growing prefixes.

    This works only for templates where rendering more messages appends text and never rewrites
    earlier text (templates that drop the reasoning of earlier turns do rewrite it), so that is checked.
    """

    def __init__(self, tokenizer, default_system: str | None = None):
        super().__init__(default_system)
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "data.template=jinja but the tokenizer has no chat_template; use data.template=step"
            )
        self.tokenizer = tokenizer

    def _text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja2 errors, raise_exception() in the template, empty conversations
            raise DataError(
                "chat template error", str(e).splitlines()[0] if str(e) else type(e).__name__
            ) from e

    def _render(self, messages: list[dict], trained: set[int]) -> list[Segment]:
        out: list[Segment] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self._text(messages[:i], add_generation_prompt=True)
            full = self._text(messages[: i + 1])
            if not prefix.startswith(done) or not full.startswith(prefix):
                raise DataError(
                    NOT_PREFIX_STABLE,
                    f"rendering up to message {i + 1} changes earlier text; use data.template=step",
                )
            out += [Segment(prefix[len(done) :], False), Segment(full[len(prefix) :], i in trained)]
            done = full
        if messages[-1]["role"] != "assistant":
            rest = self._text(messages)
            if not rest.startswith(done):
                raise DataError(
                    NOT_PREFIX_STABLE,
                    "messages after the last reply change earlier text; use data.template=step",
                )
            out.append(Segment(rest[len(done) :], False))
        return out

    def generation_prompt(self, messages: list[dict]) -> str:
        return self._text(self._with_system(messages), add_generation_prompt=True)


def build_template(
    name: str, tokenizer, *, bos: bool = True, default_system: str | None = None
) -> ChatTemplate:
    """`bos` only applies to "step": a jinja template decides about BOS itself."""
    if name == "step":
        if bos and tokenizer.bos_token is None:
            raise DataError("data.step_bos=true but the tokenizer has no bos_token")
        # Split into pieces, the turn markers would train a different format and <|EOT|> could not stop
        # generation; fail now rather than train on it.
        for marker in (STEP_BOT, STEP_EOT):
            if len(tokenizer(marker, add_special_tokens=False)["input_ids"]) != 1:
                raise DataError(
                    f"data.template=step but {marker} is not a single token of the tokenizer",
                    "add it as a special token or use data.template=jinja",
                )
        return StepTemplate(tokenizer.bos_token if bos else None, default_system)
    if name == "jinja":
        return JinjaTemplate(tokenizer, default_system)
    raise ValueError(f"unknown chat template {name!r}; valid: step, jinja")


def _merge(segments: list[Segment]) -> list[Segment]:
    """Drop empty pieces and join neighbours with the same flag, so context is tokenized in one piece."""
    out: list[Segment] = []
    for s in segments:
        if not s.text:
            continue
        if out and out[-1].train == s.train:
            out[-1] = Segment(out[-1].text + s.text, s.train)
        else:
            out.append(s)
    return out
