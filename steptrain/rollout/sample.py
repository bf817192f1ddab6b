"""`steptrain sample`: K sampled completions per prompt, scored by the reward functions, written as JSONL.

Two steps of Step-Audio-R1's MGRD loop (and of most RL data pipelines) are this one operation:
- RL data filtering (``keep="prompts"``): sample K answers with the previous round's model and keep a
  prompt only if its pass count lies in ``pass_range`` (R1: 3 to 6 of 8), so RL sees neither solved nor
  hopeless questions. Kept rows get ``pass_count`` and ``num_samples``.
- Self-distillation (``keep="responses"``): every sampled response whose reward reaches ``min_reward``
  becomes an SFT row (the prompt's turns plus the response as the assistant turn, ``reward`` added), for
  the next round's SFT; a judge is a reward function (``objective.reward_functions``).
A completion passes when its weighted reward is >= ``min_reward``. Sampling is seeded per batch of
prompts, so the same call gives the same file, and both modes see the same samples.
"""

from __future__ import annotations

import json
from pathlib import Path

from steptrain.checkpoint.rng import batch_rng
from steptrain.config.schema import DEFAULT_RL_REWARDS
from steptrain.data import read_rows
from steptrain.data.prompts import split_reply
from steptrain.data.reader import validate_row
from steptrain.rollout.generate import Sampling, generate_ids, stop_ids
from steptrain.rollout.prompts import load_prompts
from steptrain.rollout.rewards import build_rewards

TEMPERATURE_1 = Sampling(temperature=1.0)  # plain sampling from the model's distribution


def sample_model(
    model_dir: str, data_files: list[str], out: str, *, num_samples: int = 8, max_new_tokens: int = 256,
    sampling: Sampling = TEMPERATURE_1, keep: str = "prompts", pass_range: tuple[int, int] | None = None,
    min_reward: float = 1.0, seed: int = 0, batch_size: int = 8, overrides: list[str] = (),
) -> dict:
    """Write the kept rows to ``out`` (atomically) and return counts: prompts, samples, kept rows, mean
    reward and the histogram of pass counts (index k: prompts with k passing samples)."""
    from steptrain.engines.single import SingleEngine
    from steptrain.eval.run import load_for_inference
    from steptrain.inputs import resolve_inputs

    if keep not in ("prompts", "responses"):
        raise ValueError(f"keep must be 'prompts' or 'responses', not {keep!r}")
    model, tokenizer, cfg = load_for_inference(model_dir, list(overrides))
    if not cfg.objective.rewards:
        cfg.objective.rewards = dict(DEFAULT_RL_REWARDS)
    engine = SingleEngine(cfg.engine, cfg.trainer)
    model.to(engine.device)
    rows, _ = read_rows(list(data_files), on_error=cfg.data.on_error, check=lambda row: validate_row(row, need_reply=False))
    inputs = resolve_inputs(cfg, tokenizer)
    prompts, left_out = load_prompts(rows, tokenizer, cfg, inputs)
    rewards = build_rewards(cfg, engine.device, tokenizer, inputs.template)
    eos_ids, pad = stop_ids(model, tokenizer), tokenizer.pad_token_id
    histogram, kept, reward_sum = [0] * (num_samples + 1), 0, 0.0
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            group = [p for p in chunk for _ in range(num_samples)]
            with batch_rng(seed, 0, start, engine.device):
                completions = generate_ids(
                    model, [p.ids for p in group], eos_ids=eos_ids, pad_id=pad, max_new_tokens=max_new_tokens,
                    sampling=sampling, batch_size=len(group),
                    audio=[[inputs.features(c) for c in p.clips] for p in group] if inputs.audio else None,
                )
            texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]  # as GRPO's rewards see them
            totals = [rewards.total(s) for s in rewards(texts, [p.row for p in group])]
            reward_sum += sum(totals)
            for i, prompt in enumerate(chunk):
                row = {k: v for k, v in prompt.row.items() if k != "_source"}
                mine = range(i * num_samples, (i + 1) * num_samples)
                passed = sum(totals[j] >= min_reward for j in mine)
                histogram[passed] += 1
                if keep == "prompts":
                    if pass_range is None or pass_range[0] <= passed <= pass_range[1]:
                        f.write(json.dumps({**row, "pass_count": passed, "num_samples": num_samples}, ensure_ascii=False) + "\n")
                        kept += 1
                    continue
                turns = split_reply(prompt.row)[0]
                turns = turns[1:] if prompt.row.get("system") else turns  # the system key stays a key
                for j in mine:
                    if totals[j] >= min_reward:
                        reply = {"role": "assistant", "content": texts[j].strip()}
                        f.write(json.dumps({**row, "messages": [*turns, reply], "reward": totals[j]}, ensure_ascii=False) + "\n")
                        kept += 1
    tmp.replace(path)
    n = len(prompts)
    return {"prompts": n, "left_out": dict(left_out), "samples": n * num_samples, "kept": kept,
            "mean_reward": reward_sum / max(n * num_samples, 1), "pass_count_histogram": histogram, "out": str(path)}
