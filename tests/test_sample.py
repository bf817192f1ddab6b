"""`steptrain sample`: pass-count filtering of RL prompts and reward-filtered responses as SFT rows."""

from __future__ import annotations

import json
from collections import Counter

from steptrain.cli import main
from tests.rl_rewards import digit_share

DIGITS = ["objective.rewards={digits:1.0}", "objective.reward_functions={digits:'tests.rl_rewards:digit_share'}"]


def _sample(assets, out, *extra):
    return main(["sample", str(assets["model"]), str(assets["eval"]), "--out", str(out), "--num-samples", "4",
                 "--max-new-tokens", "6", "--min-reward", "0.1", *extra, "--set", *DIGITS])


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prompt_filter_and_self_distillation_rows_agree(assets, tmp_path, capsys):
    assert _sample(assets, tmp_path / "responses.jsonl", "--keep", "responses") == 0
    responses = _rows(tmp_path / "responses.jsonl")
    assert responses
    for row in responses:  # each kept response is an SFT row: the prompt's turns, then the sample
        assert row["messages"][-1]["role"] == "assistant" and row["messages"][-2]["role"] == "user"
        assert row["reward"] >= 0.1
        assert digit_share([row["messages"][-1]["content"]], [row]) == [row["reward"]]
    passes = Counter(json.dumps(r["messages"][:-1]) for r in responses)

    capsys.readouterr()
    assert _sample(assets, tmp_path / "prompts.jsonl", "--keep", "prompts", "--pass-range", "1:2") == 0
    stats = json.loads(capsys.readouterr().out)
    prompts = _rows(tmp_path / "prompts.jsonl")
    # the same seed gives the same samples: the kept prompts are exactly those with 1..2 passing responses
    want = {k: n for k, n in passes.items() if 1 <= n <= 2}
    got = {json.dumps(r["messages"][:-1]): r["pass_count"] for r in prompts}  # rows end with their reference answer
    assert got == want and all(r["num_samples"] == 4 for r in prompts)
    hist = stats["pass_count_histogram"]
    assert sum(hist) == stats["prompts"] == 64 and hist[1] + hist[2] == len(prompts) == stats["kept"]
    assert sum(k * n for k, n in enumerate(hist)) == len(responses)


def test_rows_without_a_reference_are_named(assets, tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "copy: 1"}], "solution": "1"}\n'
                    '{"messages": [{"role": "user", "content": "copy: 2"}]}\n')
    code = main(["sample", str(assets["model"]), str(data), "--out", str(tmp_path / "o.jsonl"), "--num-samples", "2",
                 "--max-new-tokens", "2"])  # the default reward, accuracy, needs a reference
    assert code == 2 and f"{data}:2: no solution" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
    assert main(["sample", str(assets["model"]), str(data), "--out", str(tmp_path / "o.jsonl"), "--pass-range", "3:9"]) == 2
