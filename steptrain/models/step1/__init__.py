"""Step-1 (Step-Audio-Chat, Step-Audio-TTS-3B) as a native transformers model, no remote code.

Importing this package (``steptrain.models`` does) registers ``model_type: step1`` with ``AutoConfig`` and
``AutoModelForCausalLM``, so a released Step-1 directory loads with ``AutoModelForCausalLM.from_pretrained``
and ``save_pretrained`` writes the released layout back (docs/released_layouts.md, "Step-1 (Step-Audio-Chat,
Step-Audio-TTS-3B)"). The SentencePiece tokenizer: :mod:`steptrain.models.step1.tokenizer`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from steptrain.models.step1.configuration import Step1Config
from steptrain.models.step1.modeling import Step1ForCausalLM, Step1Model, alibi_slopes
from steptrain.models.step1.presets import STEP1_PRESETS, build_step1_preset, step1_preset_config
from steptrain.models.step1.tokenizer import Step1Tokenizer, convert_step1_tokenizer, load_step1_tokenizer
from steptrain.models.step1.tokenizer import _register as _register_tokenizer


def _register() -> None:
    try:
        AutoConfig.register(Step1Config.model_type, Step1Config)
    except ValueError:  # already registered (module reloaded)
        pass
    try:
        AutoModelForCausalLM.register(Step1Config, Step1ForCausalLM)
    except ValueError:
        pass
    _register_tokenizer()


_register()

__all__ = [
    "STEP1_PRESETS",
    "Step1Config",
    "Step1ForCausalLM",
    "Step1Model",
    "Step1Tokenizer",
    "alibi_slopes",
    "build_step1_preset",
    "convert_step1_tokenizer",
    "load_step1_tokenizer",
    "step1_preset_config",
]
