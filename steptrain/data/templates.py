"""Chat templates that render a conversation as text segments with known loss boundaries.

Rendering to segments (rather than to one string) lets the encoder tokenize each piece on its own and
know exactly which tokens carry loss, without character-offset bookkeeping that depends on the tokenizer.

``data.template=auto`` (the default) is resolved once per run by :func:`resolve_template`, before any
model is built:
  1. a Step-family checkpoint (config.json ``model_type`` step1 / step_audio_2) gets the Step template
     with its family's BOS convention: Step-Audio-Chat / TTS-3B (step1) start with ``<s>`` as ms-swift's
     ``step_audio`` template writes it; Step-Audio 2 / R1 have no BOS (docs/step_facts.md);
  2. otherwise a tokenizer with a chat template gets that template (``jinja``), rendered exactly as its
     ``apply_chat_template`` renders it (a template that writes ``{{ bos_token }}`` gets no second BOS);
  3. otherwise a tokenizer holding ``<|BOT|>`` and ``<|EOT|>`` as single tokens gets the Step template,
     with BOS when the tokenizer has one;
  4. otherwise (a base model) the ``plain`` template, with a one-line warning naming it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from steptrain.data.errors import DataError

log = logging.getLogger("steptrain")

LOSS_ON = ("all_assistant", "last_assistant")
TEMPLATES = ("auto", "step", "jinja", "plain")  # the choices of data.template
NOT_PREFIX_STABLE = "chat template is not prefix-stable"

# Step-Audio role names (the user speaks as "human", tool results come back as "input").
STEP_ROLES = {"system": "system", "user": "human", "assistant": "assistant", "tool": "input"}
STEP_BOT, STEP_EOT = "<|BOT|>", "<|EOT|>"
# Checkpoint families (config.json model_type) that use the Step template, and whether it starts with BOS.
STEP_FAMILY_BOS = {"step1": True, "step_audio_2": False}
# The plain template's role labels (base models without a chat template).
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


@dataclass(frozen=True)
class Segment:
    text: str
    train: bool  # the tokens of this piece carry loss


class ChatTemplate:
    """Base: turns messages into segments; subclasses render the text.

    ``name`` and ``bos`` say what was resolved (``bos``: the BOS token the template writes in front, or
    None); a run records them in its config.yaml as ``data.template`` and ``data.bos``.
    """

    name = ""
    bos: str | None = None

    def __init__(self, default_system: str | None = None):
        self.default_system = default_system

    def describe(self) -> str:
        """One line for the log: which template, and whether it writes a BOS in front."""
        return f"{self.name} template, " + (f"{self.bos} in front" if self.bos else "no BOS")

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

    name = "step"

    def __init__(self, bos_token: str | None, default_system: str | None = None):
        super().__init__(default_system)
        self.bos = bos_token or None

    def _render(self, messages: list[dict], trained: set[int]) -> list[Segment]:
        out = [Segment(self.bos or "", False)]
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


class PlainTemplate(ChatTemplate):
    """For base models without a chat template: ``System: ...``, ``User: ...``, ``Assistant: ...`` lines.

    ``[BOS]{system}\\n\\nUser: {content}\\nAssistant: {reply}{EOS}\\nUser: ...``; the reply and its EOS are
    trained (EOS is what stops generation). The space after ``Assistant:`` belongs to the reply, so a
    byte-level BPE tokenizes each piece as it would tokenize the whole text.
    """

    name = "plain"

    def __init__(self, bos_token: str | None, eos_token: str, default_system: str | None = None):
        super().__init__(default_system)
        self.bos, self.eos = bos_token or None, eos_token

    def _render(self, messages: list[dict], trained: set[int]) -> list[Segment]:
        out = [Segment(self.bos or "", False)]
        for i, m in enumerate(messages):
            if m["role"] == "system":
                out.append(Segment(f"{m['content']}\n\n", False))
            elif m["role"] == "assistant":
                out += [Segment(f"{PLAIN_ROLES['assistant']}:", False),
                        Segment(f" {m['content']}{self.eos}", i in trained), Segment("\n", False)]
            else:
                out.append(Segment(f"{PLAIN_ROLES.get(m['role'], m['role'])}: {m['content']}\n", False))
        return out

    def generation_prompt(self, messages: list[dict]) -> str:
        text = "".join(s.text for s in self._render(self._with_system(messages), set()))
        return f"{text}{PLAIN_ROLES['assistant']}:"


class JinjaTemplate(ChatTemplate):
    """The tokenizer's own chat template; assistant spans are found by rendering growing prefixes.

    This works only for templates where rendering more messages appends text and never rewrites
    earlier text (templates that drop the reasoning of earlier turns do rewrite it), so that is checked.
    """

    name = "jinja"

    def describe(self) -> str:
        return "jinja template (the tokenizer's own chat_template)"

    def __init__(self, tokenizer, default_system: str | None = None):
        super().__init__(default_system)
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "data.template=jinja but the tokenizer has no chat_template; use data.template=step or plain"
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
                    f"rendering up to message {i + 1} changes earlier text; use data.template=step or plain",
                )
            out += [Segment(prefix[len(done) :], False), Segment(full[len(prefix) :], i in trained)]
            done = full
        if messages[-1]["role"] != "assistant":
            rest = self._text(messages)
            if not rest.startswith(done):
                raise DataError(
                    NOT_PREFIX_STABLE,
                    "messages after the last reply change earlier text; use data.template=step or plain",
                )
            out.append(Segment(rest[len(done) :], False))
        return out

    def generation_prompt(self, messages: list[dict]) -> str:
        return self._text(self._with_system(messages), add_generation_prompt=True)


def _single_token(tokenizer, text: str) -> bool:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front by itself (Llama-style), which the plain template then keeps."""
    if tokenizer.bos_token_id is None:
        return False
    return tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]


def resolve_template(
    name: str, tokenizer, *, family: str | None = None, bos: bool | None = None, default_system: str | None = None
) -> ChatTemplate:
    """The run's chat template (see the module docstring for ``auto``); ``family`` is the checkpoint's
    model_type, ``bos`` forces BOS on or off for the step and plain templates (None: the convention)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; valid: {', '.join(TEMPLATES)}")
    if name == "auto":
        if family in STEP_FAMILY_BOS:
            name, bos = "step", STEP_FAMILY_BOS[family] if bos is None else bos
        elif getattr(tokenizer, "chat_template", None):
            name = "jinja"
        elif _single_token(tokenizer, STEP_BOT) and _single_token(tokenizer, STEP_EOT):
            name = "step"
        else:
            name = "plain"
            log.warning("data.template=auto: the tokenizer has no chat template; using the plain template "
                        "(User: / Assistant: lines, the reply ends with EOS); set data.template to choose")
    if bos and tokenizer.bos_token is None:
        raise DataError(f"data.bos=true but the tokenizer has no bos_token (data.template={name})")
    if name == "step":
        # Split into pieces, the turn markers would train a different format and <|EOT|> could not stop
        # generation; fail now rather than train on it.
        for marker in (STEP_BOT, STEP_EOT):
            if not _single_token(tokenizer, marker):
                raise DataError(
                    f"data.template=step but {marker} is not a single token of the tokenizer",
                    "add it as a special token or use data.template=auto|jinja|plain",
                )
        use_bos = tokenizer.bos_token is not None if bos is None else bos
        return StepTemplate(tokenizer.bos_token if use_bos else None, default_system)
    if name == "plain":
        if tokenizer.eos_token is None:
            raise DataError("data.template=plain needs an eos_token to end replies; the tokenizer has none")
        use_bos = _adds_bos(tokenizer) if bos is None else bos
        return PlainTemplate(tokenizer.bos_token if use_bos else None, tokenizer.eos_token, default_system)
    return JinjaTemplate(tokenizer, default_system)


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
