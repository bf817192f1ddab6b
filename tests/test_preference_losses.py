"""Preference losses against hand-computed references (Python's math on fixed numbers), plus gradient checks."""

from __future__ import annotations

import math

import pytest
import torch

from steptrain.objectives import LOSSES, audio_token_mask, preference_loss, reward_model_loss, sequence_logps

# Two pairs: policy and reference summed log-probs, and counted tokens of chosen / rejected.
PI_C, PI_R = [-3.0, -7.25], [-5.5, -6.0]
REF_C, REF_R = [-3.5, -7.0], [-5.0, -6.5]
N_C, N_R = [4, 5], [6, 3]
BETA = 0.1


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def log_sigmoid(x: float) -> float:
    return math.log(sigmoid(x))


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def run(loss: str, beta: float = BETA, **kw) -> dict[str, torch.Tensor]:
    counts = {"chosen_tokens": torch.tensor(N_C), "rejected_tokens": torch.tensor(N_R)}
    return preference_loss(t(PI_C), t(PI_R), t(REF_C), t(REF_R), loss=loss, beta=beta, **(counts | kw))


def assert_close(actual: torch.Tensor, expected: list[float]) -> None:
    assert actual.shape == (len(expected),)
    for a, e in zip(actual.tolist(), expected, strict=True):
        assert a == pytest.approx(e, abs=1e-6), (actual.tolist(), expected)


def h(i: int) -> float:
    return (PI_C[i] - PI_R[i]) - (REF_C[i] - REF_R[i])


# ---------------------------------------------------------------- loss values


def test_sigmoid_dpo():
    out = run("sigmoid")
    assert_close(out["loss"], [-log_sigmoid(BETA * h(i)) for i in range(2)])
    assert_close(out["chosen_rewards"], [BETA * (PI_C[i] - REF_C[i]) for i in range(2)])
    assert_close(out["rejected_rewards"], [BETA * (PI_R[i] - REF_R[i]) for i in range(2)])
    # h = 0 (policy == reference) is the DPO starting point: loss log 2.
    same = preference_loss(t([-2.0]), t([-4.0]), t([-2.0]), t([-4.0]), loss="sigmoid", beta=0.5)
    assert_close(same["loss"], [math.log(2.0)])


def test_sigmoid_literal_numbers():
    # Pair 0: h = (-3 + 5.5) - (-3.5 + 5) = 1.0;  -log σ(0.1) = log(1 + e^-0.1).
    assert h(0) == 1.0
    assert_close(run("sigmoid")["loss"][:1], [math.log(1.0 + math.exp(-0.1))])


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.5])
def test_cdpo(eps):
    out = run("cdpo", label_smoothing=eps)
    expected = [-(1 - eps) * log_sigmoid(BETA * h(i)) - eps * log_sigmoid(-BETA * h(i)) for i in range(2)]
    assert_close(out["loss"], expected)
    assert_close(out["chosen_rewards"], [BETA * (PI_C[i] - REF_C[i]) for i in range(2)])


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.45])
def test_robust(eps):
    out = run("robust", label_smoothing=eps)
    expected = [
        (-(1 - eps) * log_sigmoid(BETA * h(i)) + eps * log_sigmoid(-BETA * h(i))) / (1 - 2 * eps)
        for i in range(2)
    ]
    assert_close(out["loss"], expected)
    assert_close(out["rejected_rewards"], [BETA * (PI_R[i] - REF_R[i]) for i in range(2)])


def test_cdpo_and_robust_reduce_to_dpo_without_noise():
    dpo = run("sigmoid")["loss"]
    assert torch.allclose(run("cdpo", label_smoothing=0.0)["loss"], dpo, rtol=0, atol=1e-12)
    assert torch.allclose(run("robust", label_smoothing=0.0)["loss"], dpo, rtol=0, atol=1e-12)


def test_ipo():
    out = run("ipo")
    expected, rc, rr = [], [], []
    for i in range(2):
        hn = (PI_C[i] / N_C[i] - PI_R[i] / N_R[i]) - (REF_C[i] / N_C[i] - REF_R[i] / N_R[i])
        expected.append((hn - 1 / (2 * BETA)) ** 2)
        rc.append(BETA * (PI_C[i] - REF_C[i]) / N_C[i])
        rr.append(BETA * (PI_R[i] - REF_R[i]) / N_R[i])
    assert_close(out["loss"], expected)
    assert_close(out["chosen_rewards"], rc)
    assert_close(out["rejected_rewards"], rr)
    # Pair 0 literally: h' = (-0.75 + 5.5/6) - (-0.875 + 5/6) = 1/6 + 1/24 = 5/24;  (5/24 - 5)^2.
    assert out["loss"][0].item() == pytest.approx((5 / 24 - 5) ** 2, abs=1e-9)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.4])
def test_simpo(gamma):
    beta = 2.0
    out = preference_loss(
        t(PI_C),
        t(PI_R),
        None,
        None,
        loss="simpo",
        beta=beta,
        simpo_gamma=gamma,
        chosen_tokens=torch.tensor(N_C),
        rejected_tokens=torch.tensor(N_R),
    )
    expected = [-log_sigmoid(beta * (PI_C[i] / N_C[i] - PI_R[i] / N_R[i]) - gamma) for i in range(2)]
    assert_close(out["loss"], expected)
    assert_close(out["chosen_rewards"], [beta * PI_C[i] / N_C[i] for i in range(2)])
    assert_close(out["rejected_rewards"], [beta * PI_R[i] / N_R[i] for i in range(2)])
    # Reference log-probs, when given, are ignored.
    with_ref = run("simpo", beta=beta, simpo_gamma=gamma)
    assert torch.equal(with_ref["loss"], out["loss"])


def test_simpo_default_gamma_is_half():
    kw = {"chosen_tokens": torch.tensor(N_C), "rejected_tokens": torch.tensor(N_R)}
    out = preference_loss(t(PI_C), t(PI_R), None, None, loss="simpo", beta=BETA, **kw)
    assert_close(
        out["loss"], [-log_sigmoid(BETA * (PI_C[i] / N_C[i] - PI_R[i] / N_R[i]) - 0.5) for i in range(2)]
    )


def test_orpo():
    beta = 0.25
    out = preference_loss(
        t(PI_C),
        t(PI_R),
        None,
        None,
        loss="orpo",
        beta=beta,
        chosen_tokens=torch.tensor(N_C),
        rejected_tokens=torch.tensor(N_R),
    )
    expected, rc, rr = [], [], []
    for i in range(2):
        a_c, a_r = PI_C[i] / N_C[i], PI_R[i] / N_R[i]
        p_c, p_r = math.exp(a_c), math.exp(a_r)  # geometric-mean token probabilities
        log_or = math.log(p_c / (1 - p_c)) - math.log(p_r / (1 - p_r))
        expected.append(-a_c + beta * -log_sigmoid(log_or))
        rc.append(beta * a_c)
        rr.append(beta * a_r)
    assert_close(out["loss"], expected)
    assert_close(out["chosen_rewards"], rc)
    assert_close(out["rejected_rewards"], rr)


def test_orpo_log_odds_near_zero_and_saturated():
    # a = -1e-5: 1 - exp(a) loses digits when formed directly in float32; the expm1 form does not.
    a_c, a_r = -1e-5, -2.0
    out = preference_loss(
        torch.tensor([a_c]),
        torch.tensor([a_r]),
        None,
        None,
        loss="orpo",
        beta=1.0,
        chosen_tokens=torch.tensor([1]),
        rejected_tokens=torch.tensor([1]),
    )
    log_or = (a_c - math.log(-math.expm1(a_c))) - (a_r - math.log(-math.expm1(a_r)))
    assert out["loss"].item() == pytest.approx(-a_c - log_sigmoid(log_or), rel=1e-5)
    # A saturated chosen response (log-prob exactly 0) keeps a finite loss and gradient.
    c = torch.zeros(1, requires_grad=True)
    out = preference_loss(
        c,
        torch.tensor([-3.0]),
        None,
        None,
        loss="orpo",
        beta=1.0,
        chosen_tokens=torch.tensor([3]),
        rejected_tokens=torch.tensor([3]),
    )
    out["loss"].sum().backward()
    assert torch.isfinite(out["loss"]).all() and torch.isfinite(c.grad).all()


def test_zero_token_sequence_averages_to_zero():
    out = preference_loss(
        t([0.0]),
        t([-2.0]),
        None,
        None,
        loss="simpo",
        beta=1.0,
        simpo_gamma=0.0,
        chosen_tokens=torch.tensor([0]),
        rejected_tokens=torch.tensor([2]),
    )
    assert_close(out["loss"], [-log_sigmoid(0.0 - (-1.0))])


def test_rewards_detached_loss_not():
    args = [t(v).requires_grad_() for v in (PI_C, PI_R, REF_C, REF_R)]
    counts = {"chosen_tokens": torch.tensor(N_C), "rejected_tokens": torch.tensor(N_R)}
    for loss in LOSSES:
        out = preference_loss(*args, loss=loss, beta=BETA, **counts)
        assert out["loss"].requires_grad
        assert not out["chosen_rewards"].requires_grad and not out["rejected_rewards"].requires_grad


# ---------------------------------------------------------------- gradients


def test_dpo_gradient_matches_closed_form():
    # dL/dpi_c = -β σ(-β h),  dL/dpi_r = +β σ(-β h)  (and the opposite signs for the reference).
    pi_c, pi_r = t(PI_C).requires_grad_(), t(PI_R).requires_grad_()
    preference_loss(pi_c, pi_r, t(REF_C), t(REF_R), loss="sigmoid", beta=BETA)["loss"].sum().backward()
    for i in range(2):
        g = BETA * sigmoid(-BETA * h(i))
        assert pi_c.grad[i].item() == pytest.approx(-g, abs=1e-9)
        assert pi_r.grad[i].item() == pytest.approx(g, abs=1e-9)


def test_ipo_gradient_matches_closed_form():
    # dL/dpi_c = 2 (h' - 1/(2β)) / |c|.
    pi_c = t(PI_C).requires_grad_()
    out = preference_loss(
        pi_c,
        t(PI_R),
        t(REF_C),
        t(REF_R),
        loss="ipo",
        beta=BETA,
        chosen_tokens=torch.tensor(N_C),
        rejected_tokens=torch.tensor(N_R),
    )
    out["loss"].sum().backward()
    for i in range(2):
        hn = (PI_C[i] / N_C[i] - PI_R[i] / N_R[i]) - (REF_C[i] / N_C[i] - REF_R[i] / N_R[i])
        assert pi_c.grad[i].item() == pytest.approx(2 * (hn - 1 / (2 * BETA)) / N_C[i], abs=1e-9)


@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck(loss):
    smoothing = 0.2 if loss in ("cdpo", "robust") else 0.0
    inputs = tuple(t(v).requires_grad_() for v in (PI_C, PI_R, REF_C, REF_R))
    counts = {"chosen_tokens": torch.tensor(N_C), "rejected_tokens": torch.tensor(N_R)}

    def fn(*xs):
        return preference_loss(*xs, loss=loss, beta=0.7, label_smoothing=smoothing, **counts)["loss"]

    assert torch.autograd.gradcheck(fn, inputs)


def test_reward_model_loss_gradcheck():
    c, r = t([1.2, -0.3]).requires_grad_(), t([0.4, 0.9]).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: reward_model_loss(a, b, margin=t([0.5, 0.0])), (c, r))


# ---------------------------------------------------------------- sequence log-probs and audio masking

# B=2, T=4, V=5; hand-picked logits.
LOGITS = [
    [
        [0.5, -1.0, 2.0, 0.0, 0.3],
        [1.5, 0.2, -0.7, 0.9, 0.0],
        [-0.2, 0.4, 0.1, 1.1, -1.3],
        [0.0, 0.0, 3.0, 0.0, 0.0],
    ],
    [
        [2.0, 1.0, 0.0, -1.0, -2.0],
        [0.3, 0.3, 0.3, 0.3, 0.3],
        [1.0, -0.5, 0.25, 2.5, 0.0],
        [0.7, 0.1, -0.4, 0.0, 1.2],
    ],
]
LABELS = [[-100, 2, 3, 4], [-100, -100, 0, 1]]


def manual_logp(row: list[float], y: int) -> float:
    return row[y] - math.log(sum(math.exp(v) for v in row))


def test_sequence_logps_matches_manual_log_softmax():
    logps, counts = sequence_logps(torch.tensor(LOGITS), torch.tensor(LABELS))
    # logits at t predict labels at t+1; -100 targets do not count.
    row0 = manual_logp(LOGITS[0][0], 2) + manual_logp(LOGITS[0][1], 3) + manual_logp(LOGITS[0][2], 4)
    row1 = manual_logp(LOGITS[1][1], 0) + manual_logp(LOGITS[1][2], 1)
    assert_close(logps, [row0, row1])
    assert counts.tolist() == [3, 2] and counts.dtype == torch.int64
    assert logps.dtype == torch.float32


def test_sequence_logps_bf16_logits_computed_in_float32():
    logits = torch.tensor(LOGITS).bfloat16()
    logps, _ = sequence_logps(logits, torch.tensor(LABELS))
    ref, _ = sequence_logps(logits.float(), torch.tensor(LABELS))
    assert logps.dtype == torch.float32 and torch.equal(logps, ref)


def test_sequence_logps_token_mask():
    mask = torch.tensor([[True, True, False, True], [True, True, True, True]])
    logps, counts = sequence_logps(torch.tensor(LOGITS), torch.tensor(LABELS), token_mask=mask)
    row0 = manual_logp(LOGITS[0][0], 2) + manual_logp(LOGITS[0][2], 4)
    row1 = manual_logp(LOGITS[1][1], 0) + manual_logp(LOGITS[1][2], 1)
    assert_close(logps, [row0, row1])
    assert counts.tolist() == [2, 2]


def test_audio_token_mask():
    labels = torch.tensor([[-100, 1, 5, 7, 8, 6]])
    assert audio_token_mask(labels, None) is None
    mask = audio_token_mask(labels, (5, 7))
    assert mask.tolist() == [[True, True, False, False, True, False]]


AUDIO = (5, 7)  # ids 5..7 of V=9 are audio tokens
V = 9
# chosen (rows 0, 1) then rejected (rows 2, 3); text ids 0..4 and 8.
PAIR_LABELS = [
    [-100, 1, 6, 2, 7, 8],
    [-100, -100, 5, 3, 4, -100],
    [-100, 0, 2, 5, 5, 1],
    [-100, 6, 8, 7, 4, 3],
]


def _dpo_through_logits(logits: torch.Tensor) -> torch.Tensor:
    labels = torch.tensor(PAIR_LABELS)
    logps, _ = sequence_logps(logits, labels, token_mask=audio_token_mask(labels, AUDIO))
    out = preference_loss(
        logps[:2],
        logps[2:],
        torch.tensor([-9.0, -6.0]),
        torch.tensor([-10.0, -7.5]),
        loss="sigmoid",
        beta=0.3,
    )
    return out["loss"].mean()


def test_audio_positions_get_exactly_zero_gradient():
    torch.manual_seed(0)
    logits = torch.randn(4, len(PAIR_LABELS[0]), V, requires_grad=True)
    _dpo_through_logits(logits).backward()

    labels = torch.tensor(PAIR_LABELS)
    target = labels[:, 1:]  # the label that logits[:, t] predicts
    predicts_audio = (target >= AUDIO[0]) & (target <= AUDIO[1])
    predicts_text = (target != -100) & ~predicts_audio
    assert predicts_audio.sum() == 7 and predicts_text.sum() == 11
    grad = logits.grad[:, :-1]
    assert torch.equal(grad[predicts_audio], torch.zeros_like(grad[predicts_audio]))
    assert (grad[predicts_text].abs().sum(-1) > 0).all()
    # Positions predicting -100 and the last position (predicts nothing) get no gradient either.
    assert torch.equal(grad[target == -100], torch.zeros_like(grad[target == -100]))
    assert torch.equal(logits.grad[:, -1], torch.zeros_like(logits.grad[:, -1]))


def test_audio_logits_do_not_change_the_loss():
    torch.manual_seed(1)
    logits = torch.randn(4, len(PAIR_LABELS[0]), V)
    target = torch.tensor(PAIR_LABELS)[:, 1:]
    predicts_audio = (target >= AUDIO[0]) & (target <= AUDIO[1])
    changed = logits.clone()
    changed[:, :-1][predicts_audio] = 50.0 * torch.randn(int(predicts_audio.sum()), V)
    assert not torch.equal(changed, logits)
    assert torch.equal(_dpo_through_logits(changed), _dpo_through_logits(logits))
    # Without the mask the same change does move the loss (the test would catch a mask that does nothing).
    labels = torch.tensor(PAIR_LABELS)
    assert not torch.equal(sequence_logps(changed, labels)[0], sequence_logps(logits, labels)[0])


# ---------------------------------------------------------------- reward model


def test_reward_model_loss():
    c, r = [1.2, -0.3], [0.4, 0.9]
    assert_close(reward_model_loss(t(c), t(r)), [-log_sigmoid(c[i] - r[i]) for i in range(2)])
    m = [0.5, 0.0]
    assert_close(
        reward_model_loss(t(c), t(r), margin=t(m)), [-log_sigmoid(c[i] - r[i] - m[i]) for i in range(2)]
    )
    assert_close(
        reward_model_loss(t(c), t(r), margin=0.25), [-log_sigmoid(c[i] - r[i] - 0.25) for i in range(2)]
    )
    # Literal: equal scores give log 2.
    assert_close(reward_model_loss(t([0.7]), t([0.7])), [math.log(2.0)])


# ---------------------------------------------------------------- argument errors


def test_unknown_loss():
    with pytest.raises(ValueError, match="loss='hinge'"):
        run("hinge")


@pytest.mark.parametrize("loss", ["ipo", "simpo", "orpo"])
@pytest.mark.parametrize("missing", ["chosen_tokens", "rejected_tokens"])
def test_missing_token_counts(loss, missing):
    with pytest.raises(ValueError, match=missing):
        run(loss, **{missing: None})


@pytest.mark.parametrize(
    ("loss", "eps"), [("robust", 0.5), ("robust", 0.7), ("robust", -0.1), ("cdpo", 0.6), ("cdpo", -0.1)]
)
def test_label_smoothing_out_of_range(loss, eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        run(loss, label_smoothing=eps)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo", "orpo"])
def test_label_smoothing_rejected_where_unused(loss):
    with pytest.raises(ValueError, match="label_smoothing"):
        run(loss, label_smoothing=0.1)


@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_beta_must_be_positive(beta):
    with pytest.raises(ValueError, match="beta"):
        run("sigmoid", beta=beta)


@pytest.mark.parametrize("missing", ["ref_chosen_logps", "ref_rejected_logps"])
def test_missing_reference(missing):
    ref = {"ref_chosen_logps": t(REF_C), "ref_rejected_logps": t(REF_R)} | {missing: None}
    with pytest.raises(ValueError, match=missing):
        preference_loss(
            t(PI_C), t(PI_R), ref["ref_chosen_logps"], ref["ref_rejected_logps"], loss="cdpo", beta=BETA
        )


def test_sequence_logps_shape_errors():
    with pytest.raises(ValueError, match="labels"):
        sequence_logps(torch.zeros(2, 4, 5), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="token_mask"):
        sequence_logps(
            torch.zeros(2, 4, 5),
            torch.zeros(2, 4, dtype=torch.long),
            token_mask=torch.ones(2, 3, dtype=torch.bool),
        )
