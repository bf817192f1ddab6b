"""engine=deepspeed for real on CPU: 2 ranks under torchrun (gloo), ZeRO-2 and ZeRO-3.

The same recipe gives the single-process loss curve; ZeRO-3 partitions; SIGKILL + resume is bit-identical;
LoRA adapters and full weights export gathered (never as empty shards) and reload with equal logits.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from steptrain.cli import main
from steptrain.config import ConfigError, load_config
from steptrain.engines.deepspeed_config import deepspeed_config
from tests.conftest import ROOT, TORCHRUN, base_overrides, kill_mid_run, read_metrics, run_cli, train_losses

DS = ["engine=deepspeed"]


def _deepspeed_launcher() -> list[str]:
    """DeepSpeed's own launcher (`deepspeed --num_gpus 2 --module steptrain ...`); it counts CPU "devices".
    On a free port: its default (29500) is shared by every run on the machine (pytest-xdist workers too)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port), "--module"]


def _base(tmp_path) -> list[str]:
    return ["model.preset=tiny", f"model.tokenizer_path={tmp_path}", f"data.train_files=[{tmp_path / 'x.jsonl'}]", f"output_dir={tmp_path}", *DS]


def _ds_config(tmp_path, *overrides, world_size=2):
    cfg = load_config([*_base(tmp_path), *overrides])
    return deepspeed_config(cfg.engine, cfg.trainer, cfg.optim, world_size=world_size, precision="bf16", on_gpu=False)


@pytest.fixture
def jsonl(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}]}\n')


def test_deepspeed_json_is_generated_from_steptrain_settings(tmp_path, jsonl):
    ds = _ds_config(tmp_path, "trainer.batch_size=3", "trainer.grad_accum=4", "optim.max_grad_norm=0.5",
                    "engine.zero_stage=2", "engine.offload_optimizer=cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 3 * 4 * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert "optimizer" not in ds and "scheduler" not in ds


def test_user_deepspeed_file_fills_auto_keeps_extras_and_names_contradictions(tmp_path, jsonl):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto",
        "zero_optimization": {"stage": "auto", "overlap_comm": True, "reduce_bucket_size": 5e7},
    }))
    ds = _ds_config(tmp_path, "trainer.batch_size=2", f"engine.config_file={user}")
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["overlap_comm"] is True and ds["zero_optimization"]["reduce_bucket_size"] == 5e7

    user.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"ds\.json: zero_optimization\.stage=2 contradicts engine\.zero_stage"):
        _ds_config(tmp_path, f"engine.config_file={user}")
    user.write_text(json.dumps({"gradient_clipping": 1.0}))
    with pytest.raises(ConfigError, match=r"gradient_clipping=1\.0 contradicts optim\.max_grad_norm"):
        _ds_config(tmp_path, "optim.max_grad_norm=2.0", f"engine.config_file={user}")
    user.write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    with pytest.raises(ConfigError, match=r"remove the 'optimizer' section; steptrain builds it from optim"):
        _ds_config(tmp_path, f"engine.config_file={user}")
    user.write_text('{\n  "zero_optimization": {,\n}')
    with pytest.raises(ConfigError, match=r"ds\.json:2: not valid JSON"):
        _ds_config(tmp_path, f"engine.config_file={user}")


def test_contradictory_deepspeed_settings_fail_before_loading(tmp_path, jsonl):
    with pytest.raises(ConfigError, match=r"engine\.offload_param=cpu needs engine\.zero_stage=3"):
        load_config([*_base(tmp_path), "engine.zero_stage=2", "engine.offload_param=cpu"])
    with pytest.raises(ConfigError, match=r"engine\.zero_stage=4 is not one of: 0, 1, 2, 3"):
        load_config([*_base(tmp_path), "engine.zero_stage=4"])
    with pytest.raises(ConfigError, match=r"engine=deepspeed needs engine\.zero_stage=1\|2\|3"):
        load_config([*_base(tmp_path), "engine.zero_stage=0"])


@pytest.mark.slow
def test_zero2_and_zero3_follow_the_single_process_loss_curve(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    # Eval with 5 generated rows on 2 ranks: an uneven split that ZeRO-3 must run in lockstep.
    common = ["trainer.max_steps=5", "trainer.batch_size=2", f"data.eval_files=[{assets['eval']}]",
              "trainer.eval_batches=3", "trainer.generate_eval=5", "trainer.max_new_tokens=4"]
    assert main(["train", *base_overrides(assets, tmp_path / "single", *common, "trainer.grad_accum=2")]) == 0
    single = train_losses(tmp_path / "single")
    single_eval = [r for r in read_metrics(tmp_path / "single") if "eval/loss" in r]
    for stage, launcher in ((2, _deepspeed_launcher()), (3, TORCHRUN)):
        out = tmp_path / f"zero{stage}"
        run_cli(["train", *base_overrides(assets, out, *common, *DS, f"engine.zero_stage={stage}")], launcher=launcher)
        got = train_losses(out)
        assert sorted(got) == [1, 2, 3, 4, 5]
        for step in single:
            assert got[step] == pytest.approx(single[step], rel=1e-5), (stage, step)
        evals = [r for r in read_metrics(out) if "eval/loss" in r]
        assert [r["step"] for r in evals] == [r["step"] for r in single_eval]
        assert evals[-1]["eval/loss"] == pytest.approx(single_eval[-1]["eval/loss"], rel=1e-4)
        assert evals[-1]["eval/generated"] == 5


@pytest.mark.slow
def test_zero3_partitions_at_load_and_survives_a_rank_without_audio(assets, tmp_path):
    out = tmp_path / "probe"
    proc = subprocess.run(
        [*TORCHRUN, str(ROOT / "tests" / "ds_probe.py"), str(assets["root"]), str(out)], cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    shares = [(int(a), int(b)) for a, b in re.findall(r"rank \d: (\d+) of (\d+) parameter elements", proc.stdout)]
    assert len(shares) == 2 and all(2 * local == total for local, total in shares), shares  # half each
    gathered, original = load_file(str(out / "full.safetensors")), load_file(str(assets["model"] / "model.safetensors"))
    for name, tensor in original.items():
        assert torch.equal(gathered[name], tensor), name
    assert (out / "mixed_ok").exists()


@pytest.mark.slow
def test_zero3_sigkill_and_resume_is_bit_identical(assets, tmp_path):
    common = ["trainer.max_steps=12", "trainer.save_every=3", "trainer.keep_last=2", "trainer.batch_size=2", *DS,
              "peft=lora", "peft.r=4", "peft.dropout=0.1"]
    ref, broken = tmp_path / "ref", tmp_path / "broken"
    run_cli(["train", *base_overrides(assets, ref, *common)], launcher=TORCHRUN)
    args = base_overrides(assets, broken, *common)
    kill_mid_run(["train", *args], broken, at_step=7, launcher=TORCHRUN)
    assert (broken / "checkpoints" / "step_6" / "deepspeed").is_dir()
    run_cli(["train", *args, "resume=auto"], launcher=TORCHRUN)
    expected, got = train_losses(ref), train_losses(broken)
    assert sorted(got) == list(range(1, 13))
    assert got == expected


def _logits(model, assets) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["tokenizer"])
    ids = tok(["reverse 1 2 3 4", "sort 9 3 7"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


@pytest.mark.slow
def test_zero3_exports_reload_with_equal_logits(assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def base():
        return AutoModelForCausalLM.from_pretrained(assets["model"]).eval()

    common = ["trainer.max_steps=4", "trainer.batch_size=2"]
    lora = ["peft=lora", "peft.r=4", "peft.dropout=0"]
    # LoRA under ZeRO-3 vs the same run on one process: the gathered adapters give the same logits.
    assert main(["train", *base_overrides(assets, tmp_path / "lora1", *common, *lora, "trainer.grad_accum=2")]) == 0
    run_cli(["train", *base_overrides(assets, tmp_path / "lora3", *common, *lora, *DS)], launcher=TORCHRUN)
    for name in ("lora1", "lora3"):
        assert main(["export", str(tmp_path / name / "checkpoints" / "step_4"), str(tmp_path / f"{name}_out")]) == 0
    adapter = load_file(str(tmp_path / "lora3_out" / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    ref = _logits(PeftModel.from_pretrained(base(), tmp_path / "lora1_out").eval(), assets)
    got = _logits(PeftModel.from_pretrained(base(), tmp_path / "lora3_out").eval(), assets)
    assert (got - _logits(base(), assets)).abs().max() > 1e-3  # the adapter is not empty
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)

    # Full fine-tuning with consolidate_on_save=false: export rebuilds the weights from the ZeRO shards.
    run_cli(["train", *base_overrides(assets, tmp_path / "full3", *common, *DS, "engine.consolidate_on_save=false")],
            launcher=TORCHRUN)
    ckpt = tmp_path / "full3" / "checkpoints" / "step_4"
    assert not (ckpt / "model.safetensors").exists()
    assert main(["export", str(ckpt), str(tmp_path / "full3_out")]) == 0
    assert main(["train", *base_overrides(assets, tmp_path / "full1", *common, "trainer.grad_accum=2")]) == 0
    assert main(["export", str(tmp_path / "full1" / "checkpoints" / "step_4"), str(tmp_path / "full1_out")]) == 0
    full3 = AutoModelForCausalLM.from_pretrained(tmp_path / "full3_out").eval()
    full1 = AutoModelForCausalLM.from_pretrained(tmp_path / "full1_out").eval()
    torch.testing.assert_close(_logits(full3, assets), _logits(full1, assets), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_one_process_without_launcher_runs_zero2_with_offload(assets, tmp_path):
    # DeepSpeed itself in a fresh process: its one-process group and communication backend are process-wide.
    out = tmp_path / "offload"
    run_cli(["train", *base_overrides(assets, out, "trainer.max_steps=3", *DS, "engine.zero_stage=2",
                                      "engine.offload_optimizer=cpu")])
    single = tmp_path / "single"
    assert main(["train", *base_overrides(assets, single, "trainer.max_steps=3")]) == 0
    got, expected = train_losses(out), train_losses(single)
    assert sorted(got) == [1, 2, 3]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5)
