"""The Step-1 SentencePiece tokenizer without remote code.

The released Step-Audio repos ship a SentencePiece model (``tokenizer.model``) and load it through remote code
(``trust_remote_code=True``); docs/released_layouts.md, "Step-1 (Step-Audio-Chat, Step-Audio-TTS-3B)",
"Tokenizer and token ids". Two ways to use it natively:

- **As it is.** Importing ``steptrain.models`` registers :class:`Step1Tokenizer` for ``model_type: step1``,
  so ``AutoTokenizer.from_pretrained(released_dir)`` (no ``trust_remote_code``) builds a fast tokenizer from
  ``tokenizer.model`` with transformers' SentencePiece conversion, which follows the model's own normaliser
  and piece settings and encodes as ``SentencePieceProcessor.encode`` does. The tokenizer_config of the
  directory may name the remote class (``auto_map``); it is not run.
- **Converted.** :func:`convert_step1_tokenizer` writes a self-contained directory (``tokenizer.json``,
  ``tokenizer_config.json`` with ``tokenizer_class: TokenizersBackend``) that any transformers 5 loads,
  without steptrain; the CLI is ``python -m steptrain.models.step1.tokenizer SRC DST``.

Either way the Step special tokens follow the official code: ``<unk>`` 0 (also padding, config pad 0),
``<s>`` 1 (BOS), ``</s>`` 2, ``<|EOT|>`` 3 (end of turn, the EOS of generation, config eos 3), ``<|BOT|>`` 4;
``<|BOT|>`` and ``<|EOT|>`` are single special tokens also when they appear literally in text. No BOS is
added by ``encode``: steptrain's Step template writes ``<s>`` itself (as ms-swift's ``step_audio`` template).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tokenizers import AddedToken
from transformers import TokenizersBackend

STEP_SPECIAL = {"unk": "<unk>", "bos": "<s>", "eos": "<|EOT|>", "pad": "<unk>"}
TURN_TOKENS = ("<|BOT|>", "<|EOT|>")
REMOTE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def apply_step_conventions(tok):
    """Make a tokenizer built from the Step SentencePiece model follow the Step conventions (in place):
    ``<|BOT|>`` / ``<|EOT|>`` special single tokens, EOS ``<|EOT|>``, padding ``<unk>``. Returns it."""
    vocab = tok.get_vocab()
    turn = [t for t in TURN_TOKENS if t in vocab]
    if turn:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in turn], special_tokens=True)
    if "<|EOT|>" in vocab and tok.eos_token in (None, "</s>"):
        tok.eos_token = "<|EOT|>"
    if tok.pad_token is None and tok.unk_token is not None:
        tok.pad_token = tok.unk_token
    if tok.bos_token is None and "<s>" in vocab:
        tok.bos_token = "<s>"
    return tok


class Step1Tokenizer(TokenizersBackend):
    """A :class:`~transformers.TokenizersBackend` built from the Step-1 ``tokenizer.model`` (or a tokenizer.json),
    with the Step conventions of :func:`apply_step_conventions`. It defines no ``__init__`` on purpose: that is
    what lets transformers convert the SentencePiece file directly."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return apply_step_conventions(super().from_pretrained(*args, **kwargs))

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual (tokenizer.json, tokenizer_config.json), plus the SentencePiece ``tokenizer.model`` and
        remote-code files of the directory it was loaded from, which the official remote tokenizer reads."""
        from steptrain.models.step1.modeling import copy_released_files

        out = super().save_pretrained(save_directory, *args, **kwargs)
        copy_released_files(self.name_or_path, save_directory, names=("tokenizer.model",))
        return out


def load_step1_tokenizer(src: str | Path):
    """The Step-1 tokenizer of directory ``src`` (holding ``tokenizer.model``), built natively.

    The directory's own tokenizer_config.json is not read (it names the remote-code class), so only the
    SentencePiece model decides the vocabulary; the Step conventions are applied on top."""
    import tempfile

    src = Path(src)
    model = src / "tokenizer.model"
    if not model.is_file():
        raise FileNotFoundError(f"{src}: no tokenizer.model (the Step-1 SentencePiece model)")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(model, Path(tmp) / "tokenizer.model")
        return Step1Tokenizer.from_pretrained(tmp, **{f"{k}_token": v for k, v in STEP_SPECIAL.items()})


def convert_step1_tokenizer(src: str | Path, dst: str | Path) -> Path:
    """Write ``dst``: the Step-1 tokenizer of ``src`` as a self-contained fast tokenizer (tokenizer.json,
    tokenizer_config.json naming ``TokenizersBackend``, and the original tokenizer.model alongside), loadable
    by ``AutoTokenizer.from_pretrained(dst)`` without remote code and without steptrain. Returns ``dst``."""
    tok = load_step1_tokenizer(src)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in REMOTE_FILES:
        (dst / name).unlink(missing_ok=True)
    tok.save_pretrained(dst)
    import json

    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "TokenizersBackend"
    cfg.pop("auto_map", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    if Path(src).resolve() != dst.resolve():
        shutil.copy(Path(src) / "tokenizer.model", dst / "tokenizer.model")
    return dst


def _register() -> None:
    from transformers import AutoTokenizer

    from steptrain.models.step1.configuration import Step1Config

    try:
        AutoTokenizer.register(Step1Config, tokenizer_class=Step1Tokenizer)
    except ValueError:  # already registered
        pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m steptrain.models.step1.tokenizer SRC_DIR DST_DIR", file=sys.stderr)
        return 2
    out = convert_step1_tokenizer(args[0], args[1])
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
