"""Checkpoints shaped like the ones users download, written by the tests themselves (not by steptrain's save).

Four tokenizer conventions, each a small byte-level BPE trained here with its own special tokens, saved
next to a tiny random causal LM (``save_pretrained``):
- ``chatml``: Qwen2-style ChatML, no BOS token, a default system turn, eos ``<|im_end|>``;
- ``own_bos``: Llama-3-style headers, a template that writes ``{{ bos_token }}`` itself and a tokenizer
  that also adds BOS when asked to (the double-BOS trap);
- ``inst``: Mistral-style ``[INST] ... [/INST]`` that raises on a system turn;
- ``base``: a base model with no chat template at all.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CHATML = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
INST = (
    "{{- bos_token }}{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}{{- raise_exception('System role not supported') }}"
    "{%- elif m['role'] == 'user' %}{{- '[INST] ' + m['content'] + ' [/INST]' }}"
    "{%- elif m['role'] == 'assistant' %}{{- ' ' + m['content'] + eos_token }}{%- endif %}{%- endfor %}"
)

STYLES = {
    # name: (special tokens, bos, eos, pad, chat template, tokenizer adds BOS by itself, architecture)
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>", CHATML, False, "qwen2"),
    "own_bos": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", LLAMA3, True, "llama"),
    "inst": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "<unk>", INST, True, "llama"),
    "base": (["<|endoftext|>"], None, "<|endoftext|>", "<|endoftext|>", None, False, "qwen2"),
}

# What each template trains after a reply, i.e. the tokens that end an assistant turn.
REPLY_END = {"chatml": "<|im_end|>\n", "own_bos": "<|eot_id|>", "inst": "</s>", "base": "<|endoftext|>"}
# Text in front of the reply inside the trained span (the plain and [INST] templates put a space there).
REPLY_START = {"chatml": "", "own_bos": "", "inst": " ", "base": " "}

TASKS = ("copy", "reverse")


def _corpus() -> list[str]:
    words = "copy reverse the digits user assistant system you are a helpful assistant answer".split()
    lines = [f"{t}: " + " ".join(str((i * 7 + k) % 10) for k in range(5)) for i in range(200) for t in TASKS]
    return lines + [" ".join(words)] * 20


def build_tokenizer(style: str) -> PreTrainedTokenizerFast:
    specials, bos, eos, pad, template, adds_bos, _ = STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   chat_template=template)


def build_checkpoint(style: str, directory: Path) -> Path:
    """A tokenizer of ``style`` and a tiny random LM of its architecture, saved as users download them."""
    tok = build_tokenizer(style)
    arch = STYLES[style][-1]
    sizes = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    model = (Qwen2ForCausalLM(Qwen2Config(**sizes)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**sizes)))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def build_whisper(directory: Path) -> Path:
    """A tiny random HF Whisper (128 mel bins like large-v3, 30 s of positions), saved by transformers."""
    import torch
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=64, num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                           encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
                           max_source_positions=1500, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, decoder_start_token_id=1)
    WhisperModel(config).save_pretrained(directory)
    return directory


def rows(n: int = 16) -> list[dict]:
    """Single-turn digit tasks (no system turn: the [INST] template refuses one) and one two-turn row."""
    out = []
    for i in range(n):
        digits = [str((i * 3 + k) % 10) for k in range(4)]
        task = TASKS[i % 2]
        answer = digits if task == "copy" else digits[::-1]
        out.append({"messages": [{"role": "user", "content": f"{task}: {' '.join(digits)}"},
                                 {"role": "assistant", "content": " ".join(answer)}]})
    if n > 1:
        out[1]["messages"] += [{"role": "user", "content": "copy: 1 2"}, {"role": "assistant", "content": "1 2"}]
    return out


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path
