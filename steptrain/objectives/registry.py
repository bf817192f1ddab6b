"""The names and properties of the objectives a config can choose: one entry per preference loss and per
advantage estimator.

This module is plain data (no torch): ``steptrain.config`` derives its choices from it and validation
reads the properties, without importing the tensor code. The implementations in ``preference.py`` and
``rl.py`` are keyed by the same names and refuse to import when the two disagree, so a new loss is one
entry here plus its function there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PreferenceLoss:
    """What the recipe and validation need to know about a preference loss (``objective.loss``)."""

    summary: str
    # Scores the policy alone: no reference log-probs are computed, cached or passed.
    reference_free: bool = False
    # Divides every log-prob by its counted tokens itself (needs the token counts); the others take
    # summed log-probs, or per-token means when ``objective.length_normalize`` is set.
    length_normalized: bool = False
    # Takes ``objective.label_smoothing`` (ε, the assumed rate of flipped labels) in [0, max_label_smoothing],
    # the upper end excluded when ``label_smoothing_open`` (robust DPO divides by 1 - 2ε).
    uses_label_smoothing: bool = False
    max_label_smoothing: float = 0.0
    label_smoothing_open: bool = False

    def accepts_label_smoothing(self, eps: float) -> bool:
        if not self.uses_label_smoothing:
            return eps == 0.0
        upper = eps < self.max_label_smoothing if self.label_smoothing_open else eps <= self.max_label_smoothing
        return 0.0 <= eps and upper

    @property
    def label_smoothing_range(self) -> str:
        return f"[0, {self.max_label_smoothing}{')' if self.label_smoothing_open else ']'}"


# The order is the order of the choices in error messages and of parametrised tests.
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": PreferenceLoss("DPO (Rafailov et al. 2023)"),
    "ipo": PreferenceLoss("IPO (Azar et al. 2023), squared loss on per-token log-probs", length_normalized=True),
    "cdpo": PreferenceLoss("conservative DPO, target smoothed to 1 - ε", uses_label_smoothing=True,
                           max_label_smoothing=0.5),
    "robust": PreferenceLoss("rDPO (Chowdhury et al. 2024), unbiased under label noise ε",
                             uses_label_smoothing=True, max_label_smoothing=0.5, label_smoothing_open=True),
    "simpo": PreferenceLoss("SimPO (Meng et al. 2024)", reference_free=True, length_normalized=True),
    "orpo": PreferenceLoss("ORPO (Hong et al. 2024), SFT plus an odds-ratio penalty", reference_free=True,
                           length_normalized=True),
}


@dataclass(frozen=True)
class Advantage:
    """A group-relative advantage estimator (``objective.advantage``, recipe=grpo)."""

    summary: str


ADVANTAGES: dict[str, Advantage] = {
    "group": Advantage("GRPO (Shao et al. 2024): (R - mean) / (std + eps) within the prompt's group"),
    "mean": Advantage("Dr. GRPO (Liu et al. 2025): R - mean, no division by the std"),
    "rloo": Advantage("RLOO (Ahmadian et al. 2024): R minus the mean of the other samples"),
}


def names_with(registry: dict, prop: str) -> tuple[str, ...]:
    """The names whose entry has ``prop`` set, in registry order (for messages: ``"|".join(...)``)."""
    return tuple(name for name, entry in registry.items() if getattr(entry, prop))
