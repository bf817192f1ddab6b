"""Speech SFT end to end: DTMF speech corpus -> tiny encoder+adapter+Qwen2 -> train, evaluate, export."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from steptrain.cli import main
from steptrain.config import load_saved_config
from steptrain.data import collate, load_sft_data
from steptrain.export import export_checkpoint, rebuild_from_checkpoint
from steptrain.inputs import clip_features, resolve_inputs
from steptrain.models.forward import lm_logits
from steptrain.models.loader import load_tokenizer
from tests.conftest import read_metrics


def speech_args(assets, speech, out, *extra):
    return [
        "model.preset=tiny-speech", f"model.tokenizer_path={assets['model']}",
        f"data.train_files=[{speech['asr_train']}]", f"data.eval_files=[{speech['asr_eval']}]",
        f"output_dir={out}", "data.max_length=128", "trainer.batch_size=8", "trainer.max_steps=6",
        "optim.lr=2e-3", "trainer.generate_eval=4", "trainer.max_new_tokens=12",
        "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false", *extra,
    ]


def _audio_batch(ckpt, speech):
    cfg = load_saved_config(ckpt / "config.yaml")
    tok = load_tokenizer(cfg.model)
    data = load_sft_data([str(speech["asr_eval"])], tok, cfg.data, resolve_inputs(cfg, tok))
    return collate([[0], [1], [2]], data.examples, pad_id=tok.pad_token_id, packing=False, audio_features=clip_features)


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_asr_sft_trains_evaluates_and_exports(assets, speech, tmp_path, peft):
    out = tmp_path / "run"
    assert main(["train", *speech_args(assets, speech, out, f"peft={peft}")]) == 0
    records = read_metrics(out)
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    evals = [r for r in records if "eval/cer" in r]
    assert [r["step"] for r in evals] == [0, 6] and evals[-1]["eval/generated"] == 4
    ckpt = out / "checkpoints" / "step_6"
    trained, _, _ = rebuild_from_checkpoint(ckpt)
    if peft == "lora":
        names = [n for n, p in trained.named_parameters() if p.requires_grad]
        assert names and not any("audio_encoder" in n for n in names)  # the encoder stays frozen
        assert any("audio_adapter" in n for n in names)
    batch = _audio_batch(ckpt, speech)
    assert batch["audio_features"].shape[0] == 3
    with torch.no_grad():
        expected = lm_logits(trained, batch)
    exported = export_checkpoint(ckpt, tmp_path / "export", merge_lora=True)
    reloaded = AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        torch.testing.assert_close(lm_logits(reloaded, batch), expected, atol=1e-5, rtol=1e-5)


def test_steptrain_eval_reports_cer_for_checkpoint_and_export(assets, speech, tmp_path, capsys):
    import json

    out = tmp_path / "run"
    assert main(["train", *speech_args(assets, speech, out, "trainer.max_steps=2", "trainer.generate_eval=0",
                                       "data.eval_files=[]")]) == 0
    ckpt = out / "checkpoints" / "step_2"
    capsys.readouterr()
    assert main(["eval", str(ckpt), str(speech["asr_eval"]), "--limit", "4", "--max-new-tokens", "8"]) == 0
    from_ckpt = json.loads(capsys.readouterr().out)
    assert from_ckpt["generated"] == 4 and {"cer", "wer", "exact_match", "loss"} <= from_ckpt.keys()
    export_checkpoint(ckpt, tmp_path / "export")
    assert main(["eval", str(tmp_path / "export"), str(speech["asr_eval"]), "--limit", "4", "--max-new-tokens", "8"]) == 0
    from_export = json.loads(capsys.readouterr().out)
    assert from_export["cer"] == pytest.approx(from_ckpt["cer"]) and from_export["loss"] == pytest.approx(from_ckpt["loss"])


def test_ctc_pretrained_encoder_starts_a_frozen_encoder_sft(assets, speech, tmp_path):
    """The asr_demo set-up: data_pipelines.pretrain_audio_encoder writes what model.encoder_path loads."""
    from safetensors.torch import load_file

    from data_pipelines.pretrain_audio_encoder import main as pretrain
    from steptrain.models.speech.modeling import ENCODER_WEIGHTS

    enc = tmp_path / "encoder"
    pretrain([str(speech["asr_train"].parent), str(enc), "--llm-path", str(assets["model"]), "--steps", "2"])
    out = tmp_path / "run"
    args = [a for a in speech_args(assets, speech, out) if not a.startswith("model.preset=")]
    extra = [f"model.llm_path={assets['model']}", f"model.encoder_path={enc}", "model.freeze_encoder=true"]
    assert main(["train", *args, *extra]) == 0
    trained, _, _ = rebuild_from_checkpoint(out / "checkpoints" / "step_6")
    saved = load_file(enc / ENCODER_WEIGHTS)
    for name, value in trained.audio_encoder.state_dict().items():
        assert torch.equal(value, saved[f"audio_encoder.{name}"])  # loaded, and frozen in training
