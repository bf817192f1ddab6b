"""A tiny byte-level BPE tokenizer for the demo corpus, with Step-Audio special tokens and chat template.

Special tokens sit at the ids the Step-Audio code uses (docs/step_facts.md, section 2; 0 and 2 are ours):

    <unk> = 0 (also pad), <s> = 1 (BOS), </s> = 2, <|EOT|> = 3 (EOS, end of turn), <|BOT|> = 4.

Byte-level BPE with a digit-splitting pre-tokenizer: every digit (with its optional leading space) is
its own pre-token, so a space-separated digit string ``"2 7 1 9 3"`` becomes the tokens
``2 Ġ7 Ġ1 Ġ9 Ġ3`` once BPE has learnt the "Ġ"+digit merges (one token per digit), and the byte-level decoder gives the exact text back. Any other
text (Chinese, punctuation, newlines) still encodes losslessly through the 256 byte symbols.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Fixed ids: the order of this list IS the id assignment.
STEP_SPECIAL_TOKENS: list[str] = ["<unk>", "<s>", "</s>", "<|EOT|>", "<|BOT|>"]
UNK_ID, BOS_ID, EOS_TEXT_ID, EOT_ID, BOT_ID = 0, 1, 2, 3, 4

# ms-swift / OpenAI role -> Step role name. Unknown roles are rendered unchanged.
STEP_ROLE_MAP: dict[str, str] = {
    "user": "human",
    "assistant": "assistant",
    "system": "system",
    "tool": "input",
}

# Step chat template: [<s>] then "<|BOT|>{role}\n{content}<|EOT|>" per message; the generation prompt
# is "<|BOT|>assistant\n". Pass add_bos=False to apply_chat_template to leave out the leading <s>.
STEP_CHAT_TEMPLATE: str = (
    "{%- set role_map = {'user': 'human', 'assistant': 'assistant', 'system': 'system', 'tool': 'input'} -%}"
    "{%- if add_bos is not defined or add_bos -%}{{- bos_token -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set content = message['content'] if message['content'] is not none else '' -%}"
    "{%- if content is not string -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- for part in content -%}{%- if part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set content = ns.text -%}"
    "{%- endif -%}"
    "{{- '<|BOT|>' + role_map.get(message['role'], message['role']) + '\\n' + content + '<|EOT|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|BOT|>assistant\\n' -}}{%- endif -%}"
)


def _build_raw_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # one digit per pre-token, keeping its leading space: " 7" stays one piece, "1234" splits
            pre_tokenizers.Split(Regex(r" ?\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_demo_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and save it (HF format) to ``out_dir``.

    The first five ids are the Step-Audio special tokens (asserted). The returned tokenizer has
    bos "<s>", eos "<|EOT|>", pad/unk "<unk>" and the Step chat template.
    """
    tok = _build_raw_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(STEP_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, name in enumerate(STEP_SPECIAL_TOKENS):
        got = tok.token_to_id(name)
        assert got == i, f"special token {name!r} got id {got}, expected {i}"

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|EOT|>",
        pad_token="<unk>",
        unk_token="<unk>",
        additional_special_tokens=["</s>", "<|BOT|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    hf_tok.chat_template = STEP_CHAT_TEMPLATE
    for i, name in enumerate(STEP_SPECIAL_TOKENS):
        got = hf_tok.convert_tokens_to_ids(name)
        assert got == i, f"special token {name!r} got id {got} in the HF wrapper, expected {i}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(str(out_dir))
    return hf_tok
