"""recipe=dpo: preference data, the DPO family end to end, reference modes, audio-token masking, ZeRO-3."""

from __future__ import annotations

import json

import pytest
import torch

from data_pipelines.preference_corpus import write_preference_corpus
from steptrain.config import ConfigError, load_config
from steptrain.data import DataError
from steptrain.data.preference import PairBatches, load_preference_data
from steptrain.inputs import resolve_inputs
from steptrain.models.loader import load_tokenizer
from steptrain.objectives import LOSSES
from steptrain.recipes import dpo
from tests.conftest import TORCHRUN, read_metrics, run_cli, train_losses


@pytest.fixture(scope="module")
def pref(tmp_path_factory):
    """A small corpus: reference log-probs are computed over every pair, so runs scale with its size."""
    return write_preference_corpus(tmp_path_factory.mktemp("pref"), n_train=96, n_eval=16, seed=0)


@pytest.fixture(scope="module")
def pref_large(tmp_path_factory):
    """Rejected replies use only digits the prompt lacks: a preference a tiny model learns reliably. Held-out
    accuracy after 150 steps over trainer seeds 0-4 x corpus seeds 0-1: 0.98-1.0 (margins 3.4-6.7); with
    random-digit negatives 0.79-0.95, with the default mix (random digits or a wrong order) 0.58-0.78."""
    return write_preference_corpus(tmp_path_factory.mktemp("pref_large"), n_train=1200, n_eval=96, seed=0,
                                   negatives=("foreign",))


def dpo_args(assets, pref, out, *extra) -> list[str]:
    return [
        "experiment=dpo", f"model.path={assets['model']}", f"data.train_files=[{pref['train']}]",
        f"data.eval_files=[{pref['eval']}]", f"output_dir={out}", "data.max_length=64", "trainer.batch_size=8",
        "optim.lr=2e-3", "optim.warmup_ratio=0", "trainer.max_steps=4", "logging.progress_bar=false",
        "logging.tensorboard=false", "logging.plot=false", "trainer.eval_batches=0", *extra,
    ]


def test_both_row_formats_give_the_same_pair_and_bad_rows_are_named(assets, pref, tmp_path):
    cfg = load_config(dpo_args(assets, pref, tmp_path))
    tok = load_tokenizer(cfg.model)
    prompt = [{"role": "user", "content": "copy: 1 2 3"}]
    swift = {"messages": [*prompt, {"role": "assistant", "content": "1 2 3"}], "rejected_response": "4 5 6"}
    trl = {"chosen": [*prompt, {"role": "assistant", "content": "1 2 3"}],
           "rejected": [*prompt, {"role": "assistant", "content": "4 5 6"}]}
    (a_c, a_r), (b_c, b_r) = (load_preference_data([r], tok, cfg.data, resolve_inputs(cfg, tok)).pairs[0] for r in (swift, trl))
    assert (a_c.input_ids, a_c.labels, a_r.input_ids, a_r.labels) == (b_c.input_ids, b_c.labels, b_r.input_ids, b_r.labels)
    # labels only on the last reply, and the two sides share the prompt tokens
    trained = [t for t, lab in zip(a_r.input_ids, a_r.labels, strict=True) if lab != -100]
    assert tok.decode(trained).startswith("4 5 6")
    n_prompt = a_c.labels.index(next(lab for lab in a_c.labels if lab != -100))
    assert a_c.input_ids[:n_prompt] == a_r.input_ids[:n_prompt]

    bad = tmp_path / "bad.jsonl"
    rows = [swift, {"messages": swift["messages"]}, {**swift, "rejected_response": "1 2 3"},
            {"chosen": trl["chosen"], "rejected": [{"role": "user", "content": "other"}, trl["rejected"][1]]}]
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for line, reason in ((2, "missing rejected_response"), (3, "chosen equals rejected"),
                         (4, "chosen and rejected differ before the last reply")):
        lines = bad.read_text().splitlines()
        one = tmp_path / f"bad{line}.jsonl"
        one.write_text("\n".join([lines[0]] * (line - 1) + [lines[line - 1]]) + "\n")
        with pytest.raises(DataError, match=rf"bad{line}\.jsonl:{line}: {reason}"):
            load_preference_data([str(one)], tok, cfg.data, resolve_inputs(cfg, tok))
    skip_cfg = load_config(dpo_args(assets, pref, tmp_path, "data.on_error=skip"))
    skipped = load_preference_data([str(bad)], tok, skip_cfg.data, resolve_inputs(skip_cfg, tok))
    assert skipped.stats["pairs"] == 1 and sum(skipped.stats["skipped"].values()) == 3


def test_contradictory_dpo_settings_fail_before_loading(assets, pref, tmp_path):
    with pytest.raises(ConfigError, match="objective.reference=adapter_off needs peft=lora"):
        load_config(dpo_args(assets, pref, tmp_path, "objective.reference=adapter_off"))
    with pytest.raises(ConfigError, match="objective.label_smoothing is used by objective.loss=cdpo|robust"):
        load_config(dpo_args(assets, pref, tmp_path, "objective.label_smoothing=0.1"))
    with pytest.raises(ConfigError, match=r"objective.loss='kto' is not one of"):
        load_config(dpo_args(assets, pref, tmp_path, "objective.loss=kto"))


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains_and_logs_reward_metrics(assets, pref, tmp_path, loss):
    extra = ["objective.label_smoothing=0.1"] if loss in ("cdpo", "robust") else []
    result = dpo.run(load_config(dpo_args(assets, pref, tmp_path, f"objective.loss={loss}", "trainer.max_steps=2",
                                          *extra)))
    train = result["train"]
    assert train["step"] == 2 and torch.isfinite(torch.tensor(train["loss"]))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "pairs"):
        assert key in train and f"eval/{key}" in result["eval"]
    first_eval = next(r for r in read_metrics(tmp_path) if "eval/loss" in r)
    if loss == "sigmoid":  # policy == reference before the first update: the loss is log 2
        assert first_eval["eval/loss"] == pytest.approx(0.693147, abs=1e-5)


def test_dpo_raises_held_out_preference_accuracy(assets, pref_large, tmp_path):
    result = dpo.run(load_config(dpo_args(assets, pref_large, tmp_path, "trainer.max_steps=150", "trainer.eval_every=0")))
    evals = [r for r in read_metrics(tmp_path) if "eval/rewards/accuracy" in r]
    assert evals[0]["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert result["eval"]["eval/rewards/accuracy"] > 0.9  # 96 held-out pairs; chance is 0.5
    assert result["eval"]["eval/rewards/margins"] > 1.0


def test_precomputed_and_adapter_off_references_agree_and_the_cache_survives_resume(assets, pref, tmp_path):
    lora = ["peft=lora", "peft.r=4", "peft.dropout=0", "trainer.max_steps=4", "trainer.save_every=2"]
    dpo.run(load_config(dpo_args(assets, pref, tmp_path / "pre", *lora)))
    dpo.run(load_config(dpo_args(assets, pref, tmp_path / "off", *lora, "objective.reference=adapter_off")))
    pre, off = train_losses(tmp_path / "pre"), train_losses(tmp_path / "off")
    assert sorted(pre) == [1, 2, 3, 4]
    for step in pre:
        assert off[step] == pytest.approx(pre[step], rel=1e-5, abs=1e-6)
    cache = tmp_path / "pre" / dpo.CACHE
    stamp = cache.stat().st_mtime_ns
    # Resume from step 2: the cache (initial model) is reused, not recomputed with the trained policy.
    import shutil

    shutil.rmtree(tmp_path / "pre" / "checkpoints" / "step_4")
    resumed = dpo.run(load_config(dpo_args(assets, pref, tmp_path / "pre", *lora, "resume=auto")))
    assert cache.stat().st_mtime_ns == stamp
    assert resumed["train"]["loss"] == pre[4]


def test_masked_audio_positions_contribute_nothing_to_reply_logps(assets, pref, tmp_path):
    """AQAA's masking: logits that predict discrete audio tokens can change arbitrarily, the log-probs
    (hence every DPO loss and its gradient) stay bit-identical; unmasked, they move."""
    from steptrain.engines import build_engine
    from steptrain.models.loader import audio_code_ids, load_model

    codes = 8
    cfg = load_config(dpo_args(assets, pref, tmp_path, f"model.audio_codes={codes}"))
    tok = load_tokenizer(cfg.model)

    row = {"messages": [{"role": "user", "content": "say: 1 2"}, {"role": "assistant", "content": "1 2<audio>"}],
           "rejected_response": "3 4<audio>", "audio_codes": [[1, 2, 3, 4]], "rejected_audio_codes": [[5, 6, 7, 0]]}
    pairs = load_preference_data([row], tok, cfg.data, resolve_inputs(cfg, tok)).pairs
    batch = PairBatches(pairs, tok.pad_token_id, None).batch([[0]])
    first, last = audio_code_ids(tok, codes)
    targets = torch.roll(batch["labels"], -1, dims=1)  # logits at t predict labels at t + 1
    audio_pos = (targets >= first) & (targets <= last)
    assert int(audio_pos.sum()) == 8
    model, _ = load_model(cfg.model, tok)
    engine = build_engine(cfg.engine, cfg.trainer, cfg.optim)

    class Perturbed(torch.nn.Module):
        def __init__(self, inner, scale):
            super().__init__()
            self.inner, self.scale = inner, scale

        def forward(self, **kw):
            out = self.inner(**kw)
            noise = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(0))
            out.logits = out.logits + self.scale * noise * audio_pos[..., None]
            return out

    with torch.no_grad():
        base, _ = dpo.reply_logps(Perturbed(model, 0.0), batch, engine, (first, last))
        moved, _ = dpo.reply_logps(Perturbed(model, 5.0), batch, engine, (first, last))
        unmasked_base, _ = dpo.reply_logps(Perturbed(model, 0.0), batch, engine, None)
        unmasked_moved, _ = dpo.reply_logps(Perturbed(model, 5.0), batch, engine, None)
    assert torch.equal(base, moved)
    assert not torch.allclose(unmasked_base, unmasked_moved)


@pytest.mark.slow
def test_zero3_two_ranks_match_single_process(assets, pref, tmp_path):
    common = ["trainer.max_steps=3", "trainer.batch_size=4"]
    dpo.run(load_config(dpo_args(assets, pref, tmp_path / "single", *common, "trainer.grad_accum=2")))
    run_cli(["train", *dpo_args(assets, pref, tmp_path / "zero3", *common, "engine=deepspeed")], launcher=TORCHRUN)
    single, zero3 = train_losses(tmp_path / "single"), train_losses(tmp_path / "zero3")
    assert sorted(zero3) == [1, 2, 3]
    for step in single:
        assert zero3[step] == pytest.approx(single[step], rel=1e-5)
    evals = [r["eval/rewards/accuracy"] for r in read_metrics(tmp_path / "zero3") if "eval/rewards/accuracy" in r]
    assert evals == [r["eval/rewards/accuracy"] for r in read_metrics(tmp_path / "single") if "eval/rewards/accuracy" in r]


def test_deaf_negatives_pair_each_clip_with_another_clips_reply():
    from steptrain.data.preference import deaf_negatives

    rows = [{"messages": [{"role": "user", "content": "<audio>What digits?"}, {"role": "assistant", "content": f"{i} {i}"}],
             "rejected_response": "no", "audios": [f"a{i}.wav"], "_source": f"f.jsonl:{i}"} for i in range(6)]
    text_only = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                 "rejected_response": "no"}
    extra = deaf_negatives([*rows, text_only], fraction=0.5, seed=0)
    assert len(extra) == 3  # half of the 6 audio rows; the text-only row never qualifies
    replies = {r["audios"][0]: r["messages"][-1]["content"] for r in rows}
    for pair in extra:
        assert pair["negative"] == "deaf" and pair["messages"][-1]["content"] == replies[pair["audios"][0]]
        assert pair["rejected_response"] in replies.values()
        assert pair["rejected_response"] != replies[pair["audios"][0]]  # a reply written for another clip
    assert deaf_negatives(rows, fraction=0.5, seed=0) == extra  # seeded


def test_shared_prompt_rows_score_each_reply_as_its_own_sequence(assets, pref, tmp_path):
    from steptrain.data.preference import SharedPromptBatches
    from steptrain.engines import build_engine
    from steptrain.models.loader import load_model

    cfg = load_config(dpo_args(assets, pref, tmp_path))
    tok = load_tokenizer(cfg.model)
    pairs = load_preference_data([str(pref["eval"])], tok, cfg.data, resolve_inputs(cfg, tok)).pairs[:6]
    model, _ = load_model(cfg.model, tok)
    model.eval()
    engine = build_engine(cfg.engine, cfg.trainer, cfg.optim)
    rows = [[i] for i in range(len(pairs))]
    shared = SharedPromptBatches(pairs, tok.pad_token_id)
    assert all(0 < p < len(c.input_ids) for p, (c, _) in zip(shared.prefix, pairs, strict=True))
    assert shared.lengths[0] == len(pairs[0][0].input_ids) + len(pairs[0][1].input_ids) - shared.prefix[0]
    with torch.no_grad():
        two_rows, n2 = dpo.reply_logps(model, PairBatches(pairs, tok.pad_token_id, None).batch(rows), engine, None)
        one_row, n1 = dpo.reply_logps(model, shared.batch(rows), engine, None)
        # the rejected reply must not see the chosen one: changing the chosen reply leaves it unchanged
        c, r = pairs[0]
        p = shared.prefix[0]
        other = type(c)(c.input_ids[:p] + [t if i < p else tok.pad_token_id + 1 for i, t in enumerate(c.input_ids)][p:],
                        c.labels, c.source)
        moved, _ = dpo.reply_logps(model, SharedPromptBatches([(other, r)], tok.pad_token_id).batch([[0]]), engine, None)
    assert torch.equal(n1, n2)
    torch.testing.assert_close(one_row, two_rows, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(moved[1], one_row[len(pairs)], rtol=0, atol=1e-6)
    assert not torch.isclose(moved[0], one_row[0])


def test_shared_prompt_and_two_row_training_agree(assets, pref, tmp_path):
    for share in ("true", "false"):
        dpo.run(load_config(dpo_args(assets, pref, tmp_path / share, "trainer.max_steps=3",
                                     f"objective.share_prompt={share}")))
    shared, separate = train_losses(tmp_path / "true"), train_losses(tmp_path / "false")
    assert sorted(shared) == [1, 2, 3]
    for step in separate:
        assert shared[step] == pytest.approx(separate[step], rel=1e-5)


def test_dpo_on_a_speech_model_with_heard_audio_and_deaf_negatives(assets, tmp_path):
    """Speech prompts (two-row batches with clip features) and deaf negatives: the reply written for another
    clip is the rejected one, so the preference can only be learned by listening."""
    from data_pipelines.speech_corpus import write_speech_corpus

    corpus = write_speech_corpus(tmp_path / "speech", n_train=24, n_eval=4, seed=0, bad_rows=False)
    rows = [json.loads(line) for line in corpus["asr_train"].read_text().splitlines()]
    pairs = tmp_path / "speech" / "pairs.jsonl"  # audio paths are relative to the JSONL: same folder
    pairs.write_text("".join(json.dumps({**r, "rejected_response": "0 0 0"}) + "\n" for r in rows))
    args = ["experiment=dpo", "model.preset=tiny-speech", f"model.tokenizer_path={assets['model']}",
            f"data.train_files=[{pairs}]", "data.eval_fraction=0.25", "data.deaf_negatives=1.0",
            f"output_dir={tmp_path / 'run'}", "trainer.max_steps=2", "trainer.batch_size=4", "optim.lr=1e-3",
            "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false"]
    cfg = load_config(args)
    result = dpo.run(cfg)
    assert result["train"]["pairs"] == 4 and torch.isfinite(torch.tensor(result["train"]["loss"]))
    assert result["eval"]["eval/pairs"] == 6  # a quarter of 24 rows held out, without deaf negatives

    from steptrain.recipes.pairs import load_pairs

    tok = load_tokenizer(cfg.model)
    inputs = resolve_inputs(cfg, tok)
    data = load_pairs(cfg, tok, inputs)
    assert len(data.train.pairs) == 2 * 18 and inputs.features is not None  # 18 rows + one deaf pair each
    assert all(chosen.audio and rejected.audio for chosen, rejected in data.train.pairs)
