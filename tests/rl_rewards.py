"""A user-defined reward for tests/test_grpo.py (loaded through objective.reward_functions)."""


def digit_share(completions: list[str], rows: list[dict]) -> list[float]:
    """The fraction of a completion's non-space characters that are digits: dense, so a tiny random
    policy gets a signal from its first samples."""
    out = []
    for text in completions:
        chars = [c for c in text if not c.isspace()]
        out.append(sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0)
    return out
