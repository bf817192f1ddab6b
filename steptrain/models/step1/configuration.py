"""Configuration of Step-1, the LLM of Step-Audio-Chat and Step-Audio-TTS-3B (``model_type: step1``).

The field names are those of the released config.json (docs/released_layouts.md, "Step-1 (Step-Audio-Chat,
Step-Audio-TTS-3B)"): ``num_attention_groups`` is the number of key/value heads and ``max_seq_len`` the
context length. ``num_key_value_heads`` and ``max_position_embeddings`` are read-only aliases for code that
expects the usual transformers names; they are not written to config.json. Fields a released config carries
that this class does not name (``auto_map``, ``alibi_slopes``, ...) are kept and written back unchanged.
"""

from __future__ import annotations

from transformers import PreTrainedConfig


class Step1Config(PreTrainedConfig):
    """Sizes of a Step-1 decoder. Defaults: the class defaults of the released remote code (hidden 5120,
    48 layers, 40 heads, 8 groups; docs/released_layouts.md), not a released model's sizes.

    Fields:
        num_attention_groups: key/value heads (grouped-query attention); query head h uses group
            ``h // (num_attention_heads // num_attention_groups)``.
        max_seq_len: context length (ALiBi needs no position table; kept for the official code and vLLM).
        alibi_slopes (optional, not a declared field so that it is written only when given): explicit
            per-head slopes, a field StepFun's vLLM fork reads; absent: the standard ALiBi slopes of
            :func:`steptrain.models.step1.modeling.alibi_slopes`.
        tie_word_embeddings: False: the released checkpoints store ``lm_head.weight`` separately.
    """

    model_type = "step1"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {"num_key_value_heads": "num_attention_groups", "max_position_embeddings": "max_seq_len"}
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = 65536
    hidden_size: int = 5120
    intermediate_size: int = 13312
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_attention_groups: int = 8
    max_seq_len: int = 4096
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 3
    pad_token_id: int | None = 0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_attention_groups:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_attention_groups={self.num_attention_groups}")
        slopes = getattr(self, "alibi_slopes", None)
        if slopes is not None and len(slopes) != self.num_attention_heads:
            raise ValueError(f"alibi_slopes has {len(slopes)} entries for {self.num_attention_heads} heads")
        ratio = getattr(self, "max_pos_interp_ratio", None)
        if ratio not in (None, 1, 1.0):
            raise NotImplementedError(f"max_pos_interp_ratio={ratio}: the slope rescaling of StepFun's vLLM fork is "
                                      "not implemented (docs/released_layouts.md)")

    def to_dict(self) -> dict:
        """The config dict, with the weights' dtype also under ``torch_dtype`` (transformers 5 writes ``dtype``;
        the released config.json and the transformers 4.x the official remote code runs on read ``torch_dtype``)."""
        out = super().to_dict()
        if out.get("dtype") is not None:
            out["torch_dtype"] = out["dtype"]
        return out
