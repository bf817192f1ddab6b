"""Config composition and validation: every bad config fails before anything is built, naming the key."""

from __future__ import annotations

import pytest

from steptrain.cli import main
from steptrain.config import ConfigError, load_config


@pytest.fixture()
def base(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    return [f"model.path={model}", f"data.train_files=[{data}]", f"output_dir={tmp_path / 'out'}"]


def error_of(overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    return str(info.value)


def test_valid_config_composes_with_defaults(base):
    cfg = load_config(base)
    assert cfg.engine.name == "single" and cfg.peft.method == "none" and cfg.recipe.name == "sft"
    assert cfg.trainer.max_steps == 0 and cfg.data.template == "auto"


def test_experiment_sets_groups_and_overrides_still_win(base):
    cfg = load_config(["experiment=sft_lora", "peft.r=4", *base])
    assert cfg.peft.method == "lora" and cfg.peft.r == 4 and cfg.experiment == "sft_lora"
    assert cfg.optim.lr == pytest.approx(2e-4)


def test_unknown_key_names_key_and_valid_keys(base):
    msg = error_of([*base, "trainer.max_stepz=3"])
    assert "unknown config key 'trainer.max_stepz'" in msg
    assert "max_steps" in msg and "grad_accum" in msg


def test_unknown_top_level_key(base):
    msg = error_of([*base, "outptu_dir=x"])
    assert "'outptu_dir'" in msg and "output_dir" in msg


def test_wrong_type_names_key(base):
    msg = error_of([*base, "trainer.max_steps=abc"])
    assert "trainer.max_steps" in msg and "abc" in msg


def test_unknown_group_option_lists_choices(base):
    msg = error_of([*base, "engine=tpu"])
    assert "engine" in msg and "single" in msg and "ddp" in msg


def test_enum_value_lists_choices(base):
    msg = error_of([*base, "data.truncation=middle"])
    assert "data.truncation='middle' is not one of: right, left, drop" in msg


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["model.preset=tiny"], "exactly one of model.path"),
        (["optim.warmup_steps=5", "optim.warmup_ratio=0.1"], "optim.warmup_steps and optim.warmup_ratio"),
        (["data.eval_fraction=0.1", "data.eval_files=[{data}]"], "data.eval_fraction and data.eval_files"),
        (["trainer.batch_size=0"], "trainer.batch_size=0 must be >= 1"),
        (["trainer.max_steps=5", "optim.warmup_steps=9"], "exceeds trainer.max_steps=5"),
        (["peft=lora", "peft.target_modules=[]"], "peft.target_modules"),
        (["engine.backend=nccl", "engine.device=cpu"], "engine.backend=nccl needs engine.device=cuda"),
        (["trainer.generate_eval=8"], "trainer.generate_eval needs eval rows"),
        (["resume=/no/such/dir"], "resume='/no/such/dir'"),
    ],
)
def test_contradictions(base, extra, expected):
    data = base[1].split("[")[1].rstrip("]")
    msg = error_of([*base, *(e.format(data=data) for e in extra)])
    assert expected in msg


def test_missing_required_pieces(tmp_path):
    msg = error_of([])
    assert "output_dir is required" in msg and "data.train_files is empty" in msg
    assert "exactly one of model.path" in msg


def test_missing_data_file_named(base, tmp_path):
    msg = error_of([*base[:1], f"data.train_files=[{tmp_path / 'nope.jsonl'}]", base[2]])
    assert "nope.jsonl" in msg and "does not exist" in msg


def test_cli_reports_config_error_before_building_anything(base, tmp_path, capsys):
    code = main(["train", *base, "trainer.max_stepz=3"])
    assert code == 2
    assert "unknown config key 'trainer.max_stepz'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_asr_experiment_composes_with_speech_parts(base, tmp_path):
    llm = tmp_path / "llm"
    llm.mkdir()
    cfg = load_config(["experiment=asr_sft", f"model.llm_path={llm}", f"model.encoder_path={llm}", "model.path=null",
                       *base[1:]])
    assert cfg.optim.lr_mult == {"audio_adapter": 2.5, "embed_tokens": 2.5, "lm_head": 2.0}
    assert cfg.model.freeze_encoder and cfg.data.loss_on == "last_assistant"
    msg = error_of([*base, f"model.encoder_path={llm}"])
    assert "model.encoder_path goes with model.llm_path" in msg
    # a fresh encoder kept frozen could never learn: refused, naming both keys
    msg = error_of(["experiment=asr_sft", f"model.llm_path={llm}", "model.path=null", *base[1:]])
    assert "model.encoder_path" in msg and "model.freeze_encoder=true" in msg
    assert load_config(["experiment=asr_sft", f"model.llm_path={llm}", "model.path=null", "model.freeze_encoder=false",
                        *base[1:]]).model.freeze_encoder is False


def test_unknown_experiment_lists_the_experiments(base):
    msg = error_of(["experiment=sft_lorra", *base])
    assert msg.startswith("unknown choice experiment=sft_lorra; valid choices for experiment: ")
    assert "sft_lora" in msg and "asr_sft" in msg and "dpo" in msg


@pytest.mark.parametrize("name", ["quickstart", "sft_lora", "asr_sft", "tts_sft", "spoken_chat_sft"])
def test_every_experiment_composes(base, name):
    # quickstart names the demo's eval file, which only exists after `make demo`: replace it here
    cfg = load_config([f"experiment={name}", *base, "data.eval_files=[]", "trainer.generate_eval=0"])
    assert cfg.experiment == name
    if name == "tts_sft":
        assert cfg.model.audio_codes == 6561


def test_audio_tokenizer_needs_audio_codes(base):
    assert "needs model.audio_codes > 0" in error_of([*base, "data.audio_tokenizer=kmeans:/x"])


def test_dict_fields_take_new_keys_from_the_command_line(base):
    cfg = load_config([*base, "optim.lr_mult={embed_tokens:5.0,lm_head:2}"])
    assert cfg.optim.lr_mult == {"embed_tokens": 5.0, "lm_head": 2.0}
    assert "wrong type" in error_of([*base, "optim.lr_mult={embed_tokens:fast}"])
