"""Names defined once: every registry (losses, advantages, rewards, engines, recipes) is what the config
offers, every implementation covers exactly its registry, and validation follows the registered properties."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from steptrain.config import ConfigError, TrainConfig, validate
from steptrain.config.schema import BUILTIN_REWARDS, CHOICES
from steptrain.engines import ENGINES
from steptrain.objectives.registry import ADVANTAGES, PREFERENCE_LOSSES, PreferenceLoss
from steptrain.recipes import RECIPES
from steptrain.rollout.registry import REWARDS

ROOT = Path(__file__).resolve().parents[1]
REGISTRIES = {
    "objective.loss": PREFERENCE_LOSSES,
    "objective.advantage": ADVANTAGES,
    "engine.name": ENGINES,
    "recipe.name": RECIPES,
}
REGISTRY_FILES = {"steptrain/objectives/registry.py", "steptrain/rollout/registry.py",
                  "steptrain/engines/__init__.py", "steptrain/recipes/__init__.py"}


# ---------------------------------------------------------------- registries == config choices


@pytest.mark.parametrize("key", sorted(REGISTRIES))
def test_config_choices_are_the_registry_names(key):
    assert CHOICES[key] == tuple(REGISTRIES[key])


def test_builtin_rewards_are_the_reward_registry():
    assert BUILTIN_REWARDS == tuple(REWARDS)


def test_implementations_cover_exactly_their_registry():
    from steptrain.objectives import LOSSES, preference, rl
    from steptrain.rollout import rewards

    assert LOSSES == tuple(PREFERENCE_LOSSES)
    assert preference._LOSS_FNS.keys() == PREFERENCE_LOSSES.keys()
    assert rl._SCALES.keys() == ADVANTAGES.keys()
    model_scored = {n for n, r in REWARDS.items() if r.needs_model}
    assert rewards.RULES.keys() | model_scored == REWARDS.keys() and not rewards.RULES.keys() & model_scored
    assert rewards.NEEDS_REFERENCE == tuple(n for n, r in REWARDS.items() if r.needs_reference)


def _source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, module
    return Path(spec.origin).read_text()


@pytest.mark.parametrize("name", list(ENGINES))
def test_every_engine_target_exists(name):
    module, _, cls = ENGINES[name].target.partition(":")
    assert f"class {cls}(" in _source(module)  # without importing it (deepspeed, megatron-core)


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_module_has_run(name):
    assert "\ndef run(cfg" in _source(RECIPES[name].module)


def test_cli_runs_the_registered_recipes():
    from steptrain import cli

    assert cli.RECIPES is RECIPES


def test_registries_import_without_torch():
    """The config derives its choices from them: importing them, and the config, must stay cheap (no torch)."""
    code = ("import sys\n"
            "import steptrain.objectives.registry, steptrain.rollout.registry, steptrain.engines, steptrain.recipes\n"
            "import steptrain.config, steptrain.data.templates\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'deepspeed', 'megatron') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def _name_literals(path: Path):
    """(line, names) of every tuple / list / set literal of >= 2 strings in a Python file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Tuple | ast.List | ast.Set) and len(node.elts) >= 2:
            if all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                yield node.lineno, {e.value for e in node.elts}


def test_no_list_of_registered_names_outside_the_registries():
    """A hand-written list of losses (or rewards, engines, recipes) elsewhere would go stale silently."""
    kinds = {**{k: set(v) for k, v in REGISTRIES.items()}, "objective.rewards": set(REWARDS)}
    found = []
    for path in sorted((ROOT / "steptrain").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in REGISTRY_FILES:
            continue
        for line, names in _name_literals(path):
            for kind, registered in kinds.items():
                if names <= registered:
                    found.append(f"{rel}:{line}: {sorted(names)} ({kind})")
    assert not found, "name lists outside the registries:\n" + "\n".join(found)


# ---------------------------------------------------------------- validation follows the properties


def _problems(**values) -> str:
    """validate()'s message for the default config with ``values`` (dotted keys) set; files are not needed:
    only the presence or absence of a message is checked."""
    cfg = OmegaConf.structured(TrainConfig)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    try:
        validate(cfg)
    except ConfigError as exc:
        return str(exc)
    return ""


@pytest.mark.parametrize("loss", list(PREFERENCE_LOSSES))
def test_label_smoothing_rule_follows_the_registry(loss):
    msg = _problems(**{"recipe.name": "dpo", "objective.loss": loss, "objective.label_smoothing": 0.1})
    assert ("objective.label_smoothing is used by" in msg) == (not PREFERENCE_LOSSES[loss].uses_label_smoothing)


@pytest.mark.parametrize("loss", list(PREFERENCE_LOSSES))
def test_megatron_reference_rule_follows_the_registry(loss):
    msg = _problems(**{"recipe.name": "dpo", "objective.loss": loss, "objective.reference": "adapter_off",
                       "engine.name": "megatron", "engine.zero_stage": 0})
    assert ("not supported on engine=megatron" in msg) == (not PREFERENCE_LOSSES[loss].reference_free)


def test_a_changed_property_changes_validation_with_no_other_edit(monkeypatch):
    """The rules read the registry, not a copy of its names."""
    args = {"recipe.name": "dpo", "objective.loss": "sigmoid", "objective.label_smoothing": 0.1,
            "objective.reference": "adapter_off", "engine.name": "megatron", "engine.zero_stage": 0}
    before = _problems(**args)
    assert "label_smoothing is used by objective.loss=cdpo|robust" in before
    assert "not supported on engine=megatron" in before
    monkeypatch.setitem(PREFERENCE_LOSSES, "sigmoid", PreferenceLoss("test", reference_free=True,
                                                                     uses_label_smoothing=True,
                                                                     max_label_smoothing=0.5))
    after = _problems(**args)
    assert "label_smoothing is used by" not in after and "not supported on engine=megatron" not in after


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_rules_follow_the_registry(recipe):
    spec = RECIPES[recipe]
    msg = _problems(**{"recipe.name": recipe, "data.packing": True, "rollout.num_generations": 1,
                       "model.path": None})
    assert ("data.packing is not supported by recipe" in msg) == (spec.pairs or spec.online_rl)
    assert ("names no reward with a non-zero weight" in msg) == spec.online_rl
    assert ("rollout.num_generations=1 must be >= 2" in msg) == spec.group_relative
    assert ("needs a critic" in msg) == spec.critic
    megatron = _problems(**{"recipe.name": recipe, "engine.name": "megatron", "engine.zero_stage": 0})
    assert ("engine=megatron runs recipe=" in megatron) == (recipe not in ENGINES["megatron"].recipes)


@pytest.mark.parametrize("reward", list(REWARDS))
def test_reward_rules_follow_the_registry(reward):
    msg = _problems(**{"recipe.name": "grpo", "objective.rewards": {reward: 1.0}})
    assert f"{reward!r} is neither a built-in" not in msg
    assert (f"the {reward} reward needs objective.reward_model_path" in msg) == REWARDS[reward].needs_model


@pytest.mark.parametrize("loss", list(PREFERENCE_LOSSES))
def test_preference_loss_follows_the_registry(loss):
    """What preference_loss demands (reference, token counts, label smoothing) is what the registry says."""
    import torch

    from steptrain.objectives import preference_loss

    spec = PREFERENCE_LOSSES[loss]
    x, n = torch.tensor([-3.0, -4.0]), torch.tensor([3, 4])

    def raises(**kw) -> bool:
        args = {"ref_chosen_logps": x - 0.5, "ref_rejected_logps": x, "chosen_tokens": n, "rejected_tokens": n} | kw
        try:
            preference_loss(x, x - 1, args.pop("ref_chosen_logps"), args.pop("ref_rejected_logps"), loss=loss,
                            beta=0.1, **args)
        except ValueError:
            return True
        return False

    assert not raises()
    assert raises(ref_chosen_logps=None) == (not spec.reference_free)
    assert raises(chosen_tokens=None) == spec.length_normalized
    assert raises(label_smoothing=0.2) == (not spec.uses_label_smoothing)
    if spec.uses_label_smoothing:
        edge = spec.max_label_smoothing
        assert raises(label_smoothing=edge) == spec.label_smoothing_open
