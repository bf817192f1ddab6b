"""Epoch plans and collation: determinism, coverage, padding, exact tensors, packed == unpacked loss."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_helpers import tiny_tokenizer

from steptrain.data import Encoded, collate, encode_segments, plan_epoch, resolve_template

M = -100


def plan(lengths, **kw):
    args = dict(
        batch_size=4, max_length=512, packing=False, group_by_length=False, shuffle=True, seed=7, epoch=0
    )
    return plan_epoch(lengths, **{**args, **kw})


def flat(batches):
    return [i for batch in batches for row in batch for i in row]


def padding_fraction(batches, lengths):
    padded = sum(len(batch) * max(lengths[row[0]] for row in batch) for batch in batches)
    return 1 - sum(lengths) / padded


LENGTHS = np.random.default_rng(0).integers(1, 400, size=1000).tolist()
MODES = [
    dict(),
    dict(group_by_length=True),
    dict(packing=True),
    dict(packing=True, group_by_length=True),
    dict(shuffle=False),
    dict(shuffle=False, packing=True),
]


@pytest.mark.parametrize("mode", MODES)
def test_every_example_exactly_once_and_deterministic(mode):
    batches = plan(LENGTHS, **mode)
    assert sorted(flat(batches)) == list(range(len(LENGTHS)))
    assert all(len(b) == 4 for b in batches[:-1]) and 1 <= len(batches[-1]) <= 4
    np.random.seed(1)
    torch.manual_seed(1)
    state = np.random.get_state()[1].copy()
    assert plan(LENGTHS, **mode) == batches  # a pure function of its arguments...
    assert (np.random.get_state()[1] == state).all()  # ...that leaves the global RNG alone
    if mode.get("shuffle", True):
        assert flat(plan(LENGTHS, **mode, epoch=1)) != flat(batches)
        assert flat(plan(LENGTHS, **mode, seed=8)) != flat(batches)
    if mode.get("packing"):
        assert all(sum(LENGTHS[i] for i in row) <= 512 for b in batches for row in b)
    else:
        assert all(len(row) == 1 for b in batches for row in b)


def test_no_shuffle_keeps_dataset_order():
    assert plan([5, 6, 7, 8, 9], batch_size=2, shuffle=False, group_by_length=True) == [
        [[0], [1]],
        [[2], [3]],
        [[4]],
    ]
    packed = plan([300, 200, 100, 400, 50, 60], batch_size=2, shuffle=False, packing=True)
    assert packed == [[[0, 1], [2, 3]], [[4, 5]]]


def test_group_by_length_reduces_padding():
    random = padding_fraction(plan(LENGTHS), LENGTHS)
    grouped_batches = plan(LENGTHS, group_by_length=True)
    grouped = padding_fraction(grouped_batches, LENGTHS)
    assert random > 0.3 and grouped < 0.1 * random
    # the batch holding the longest example comes first, so out-of-memory shows up at step 1
    assert int(np.argmax(LENGTHS)) in flat(grouped_batches[:1])


def test_packing_is_dense():
    batches = plan(LENGTHS, packing=True)
    rows = [row for b in batches for row in b]
    fill = sum(LENGTHS) / (len(rows) * 512)
    assert fill > 0.95


def test_packing_rejects_too_long_examples():
    with pytest.raises(ValueError, match="example 1 has 600 tokens > max_length 512"):
        plan([10, 600], packing=True)


EXAMPLES = [
    Encoded([1, 2, 3], [M, 2, 3], "a"),
    Encoded([4, 5], [M, 5], "b"),
    Encoded([6, 7, 8, 9], [M, M, 8, 9], "c"),
]


def test_collate_unpacked_exact():
    out = collate([[0], [1], [2]], EXAMPLES, pad_id=0, packing=False)
    assert out["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]]
    assert out["labels"].tolist() == [[M, 2, 3, M], [M, 5, M, M], [M, M, 8, 9]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 0], [0, 1, 2, 3]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert all(t.dtype == torch.long for t in out.values())
    with pytest.raises(ValueError, match="exactly one example"):
        collate([[0, 1]], EXAMPLES, pad_id=0, packing=False)


def test_collate_packed_exact():
    from transformers.masking_utils import find_packed_sequence_indices

    out = collate([[0, 1, 2], [1]], EXAMPLES, pad_id=0, packing=True)
    assert out["attention_mask"] is None
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9], [4, 5, 0, 0, 0, 0, 0, 0, 0]]
    assert out["labels"].tolist() == [[M, 2, 3, M, 5, M, M, 8, 9], [M, 5, M, M, M, M, M, M, M]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4, 5, 6]]
    # what transformers derives from them: one block per example, and one for the padding tail
    blocks = find_packed_sequence_indices(out["position_ids"]).tolist()
    assert blocks == [[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1, 1, 1]]


# --- packed and unpacked batches give the same loss ------------------------------------------------

CONVERSATIONS = [
    [("user", "hi"), ("assistant", "hello!")],
    [("system", "you are a helpful bot."), ("user", "how is the weather?"), ("assistant", "sunny today.")],
    [("user", "hi"), ("assistant", "hello, how are you?"), ("user", "good"), ("assistant", "thanks!")],
    [("user", "call tool"), ("assistant", "ok"), ("tool", "result"), ("assistant", "good.")],
    [("user", "thanks"), ("assistant", "you are welcome!")],
]


def summed_loss(model, batch):
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    ).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=M, reduction="sum")
    return loss.item(), int((labels != M).sum())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked(attn):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tiny_tokenizer()
    template = resolve_template("step", tok)
    examples = [
        encode_segments(
            template.segments([{"role": r, "content": c} for r, c in conv]),
            tok,
            max_length=64,
            truncation="right",
        )
        for conv in CONVERSATIONS
    ]
    lengths = [len(e.input_ids) for e in examples]
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation=attn,
        initializer_range=0.5,  # sharper attention than the default 0.02, so the control below is clear
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).float().eval()

    unpacked, n_unpacked = summed_loss(
        model, collate([[i] for i in range(5)], examples, pad_id=0, packing=False)
    )
    [packed_rows] = plan_epoch(
        lengths, batch_size=2, max_length=sum(lengths) // 2 + 12, packing=True, group_by_length=False,
        shuffle=True, seed=0, epoch=0,
    )  # fmt: skip
    assert len(packed_rows) == 2 and sorted(i for row in packed_rows for i in row) == [0, 1, 2, 3, 4]
    packed_batch = collate(packed_rows, examples, pad_id=0, packing=True)
    packed, n_packed = summed_loss(model, packed_batch)
    assert n_packed == n_unpacked == sum(sum(label != M for label in e.labels) for e in examples)
    assert packed == pytest.approx(unpacked, rel=1e-4)

    # control: without the position restarts the rows attend across examples and the loss changes
    leaky = {**packed_batch, "position_ids": torch.arange(packed_batch["input_ids"].shape[1]).expand(2, -1)}
    assert abs(summed_loss(model, leaky)[0] - unpacked) > 0.01 * unpacked
