"""A transformers Whisper directory as `model.encoder_path`: exact encoder, ASR training, export, 80 bins."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, WhisperConfig, WhisperForConditionalGeneration, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from steptrain.config import load_config, load_saved_config
from steptrain.data import collate, load_sft_data
from steptrain.export import export_checkpoint, rebuild_from_checkpoint
from steptrain.inputs import clip_features, resolve_inputs
from steptrain.models.forward import lm_logits
from steptrain.models.loader import speech_front_end
from steptrain.models.presets import preset_config
from steptrain.models.speech import SpeechLMForCausalLM
from tests.conftest import read_metrics

IDS = {"audio_start_id": 297, "audio_end_id": 298, "audio_patch_id": 299}


def whisper_config(n_mels: int = 128, max_source_positions: int = 32) -> WhisperConfig:
    return WhisperConfig(
        vocab_size=100, num_mel_bins=n_mels, d_model=64, encoder_layers=2, encoder_attention_heads=4,
        encoder_ffn_dim=96, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=96,
        max_source_positions=max_source_positions, max_target_positions=16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )


def save_whisper(cls, path, **kw):
    """A random Whisper of class ``cls`` (all tensors perturbed: biases, norms and the position table too)."""
    torch.manual_seed(0)
    model = cls(whisper_config(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def encoder_of(model) -> WhisperEncoder:
    return model if isinstance(model, WhisperEncoder) else model.get_encoder()


@pytest.mark.parametrize("cls", [WhisperForConditionalGeneration, WhisperModel, WhisperEncoder])
def test_encoder_matches_transformers_whisper(cls, tmp_path):
    ref = encoder_of(save_whisper(cls, tmp_path / "whisper"))
    ours = SpeechLMForCausalLM.from_parts(
        None, str(tmp_path / "whisper"), llm_config=preset_config("tiny", vocab_size=300), **IDS
    ).eval()
    enc = ours.audio_encoder
    assert (enc.config.n_mels, enc.config.d_model, enc.config.ffn_dim) == (128, 64, 96)
    assert torch.equal(enc.embed_positions, ref.embed_positions.weight)  # the checkpoint's table, not sinusoids
    feats = torch.randn(2, 128, 64)  # transformers' WhisperEncoder takes exactly 2 * max_source_positions frames
    pre_norm = {}
    hook = ref.layer_norm.register_forward_pre_hook(lambda m, args: pre_norm.setdefault("x", args[0]))
    with torch.no_grad():
        out = ref(feats, output_hidden_states=True)
        frames, _ = enc.frames(feats)
    hook.remove()
    # hidden_states[-1] is after the final layer_norm; the last block's output is what enters that norm
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    torch.testing.assert_close(frames, pre_norm["x"], atol=1e-5, rtol=0)
    torch.testing.assert_close(enc.layer_norm(frames), out.last_hidden_state, atol=1e-5, rtol=0)
    with torch.no_grad():  # Step's pool sits between the blocks and Whisper's final norm
        pooled, lengths = enc(feats)
    assert pooled.shape == (2, 16, 64) and lengths.tolist() == [16, 16]
    torch.testing.assert_close(pooled, enc.layer_norm(torch.nn.functional.avg_pool1d(frames.transpose(1, 2), 2).transpose(1, 2)))


def test_80_bin_whisper_gets_80_bin_features_and_trains(assets, speech, tmp_path):
    """Whisper up to large-v2 takes 80 mel bins: the run computes them (as WhisperFeatureExtractor(80) does)."""
    import numpy as np
    from transformers import WhisperFeatureExtractor

    from steptrain.audio.io import load_audio
    from steptrain.models.loader import load_tokenizer
    from steptrain.recipes.sft import run

    save_whisper(WhisperModel, tmp_path / "whisper80", n_mels=80, max_source_positions=1500)
    cfg = load_config(asr_args(assets, speech, tmp_path / "run", tmp_path / "whisper80"))
    assert speech_front_end(cfg.model).n_mels == 80
    tok = load_tokenizer(cfg.model)
    inputs = resolve_inputs(cfg, tok)
    (example,) = load_sft_data([str(speech["asr_train"])], tok, cfg.data, inputs).examples[:1]
    clip = example.audio[0]
    feats = inputs.features(clip)
    wave = load_audio(clip.path)[clip.start : clip.start + clip.length]
    ref = WhisperFeatureExtractor(feature_size=80)(wave, sampling_rate=16000, return_tensors="np").input_features[0]
    assert feats.shape[0] == 80
    np.testing.assert_allclose(feats.numpy(), ref[:, : feats.shape[1]], atol=1e-4, rtol=0)
    run(cfg)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 5 and losses[-1] < losses[0]


def asr_args(assets, speech, out, encoder, *extra):
    return [
        f"model.llm_path={assets['model']}", f"model.encoder_path={encoder}", f"data.train_files=[{speech['asr_train']}]",
        f"output_dir={out}", "data.max_length=128", "trainer.batch_size=8", "trainer.max_steps=5", "optim.lr=2e-3",
        "trainer.generate_eval=0", "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false",
        *extra,
    ]


def test_asr_training_from_whisper_encoder_exports_and_reloads(assets, speech, tmp_path):
    from steptrain.recipes.sft import run

    ref = encoder_of(save_whisper(WhisperForConditionalGeneration, tmp_path / "whisper", max_source_positions=1500))
    out = tmp_path / "run"
    run(load_config(asr_args(assets, speech, out, tmp_path / "whisper")))
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 5 and losses[-1] < losses[0]
    ckpt = out / "checkpoints" / "step_5"
    trained, tok, _ = rebuild_from_checkpoint(ckpt)
    for name, value in trained.audio_encoder.state_dict().items():  # frozen Whisper weights, as loaded
        theirs = ref.embed_positions.weight if name == "embed_positions" else ref.state_dict()[name]
        assert torch.equal(value, theirs), name
    cfg = load_saved_config(ckpt / "config.yaml")
    data = load_sft_data([str(speech["asr_train"])], tok, cfg.data, resolve_inputs(cfg, tok))
    batch = collate([[0], [1], [2]], data.examples, pad_id=tok.pad_token_id, packing=False, audio_features=clip_features)
    with torch.no_grad():
        expected = lm_logits(trained, batch)
    exported = export_checkpoint(ckpt, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        torch.testing.assert_close(lm_logits(reloaded, batch), expected, atol=1e-6, rtol=1e-6)
