"""Compose a run's config from ``configs/`` with Hydra, and turn every failure into one clear line.

We use Hydra's compose API instead of ``@hydra.main`` so that steptrain owns the output directory and
the process (no working-directory change, no ``.hydra`` folders) and so the same function serves the
CLI, torchrun workers and tests.
"""

from __future__ import annotations

import os
import re
from dataclasses import fields, is_dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from steptrain.config.schema import DEFAULT_RL_REWARDS, TrainConfig
from steptrain.config.validate import ConfigError, validate
from steptrain.recipes import RECIPES

SCHEMA_NAME = "train_schema"


def default_config_dir() -> Path:
    """``$STEPTRAIN_CONFIG_DIR`` if set, else the repository's ``configs/``."""
    env = os.environ.get("STEPTRAIN_CONFIG_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "configs"


def _register_schema() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


def _schema_keys(dotted: str) -> list[str] | None:
    """The valid field names under a dotted config path, or None if the path is not a section."""
    node: object = TrainConfig
    for part in [p for p in dotted.split(".") if p]:
        if not is_dataclass(node):
            return None
        match = {f.name: f for f in fields(node)}.get(part)
        if match is None:
            return None
        node = match.default_factory() if callable(match.default_factory) else match.default
    return sorted(f.name for f in fields(node)) if is_dataclass(node) else None


def _dict_keys(node: object = TrainConfig, prefix: str = "") -> set[str]:
    """Dotted names of free-form dict fields (e.g. optim.lr_mult)."""
    out = set()
    for f in fields(node):
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            out |= _dict_keys(default, f"{prefix}{f.name}.")
        elif isinstance(default, dict):
            out.add(prefix + f.name)
    return out


def _dict_overrides(overrides: list[str]) -> list[str]:
    """``optim.lr_mult={a:1}`` -> ``++optim.lr_mult={a:1}``: a free-form dict takes new keys from the CLI."""
    keys = _dict_keys()
    return [f"++{o}" if o.split("=", 1)[0] in keys else o for o in overrides]


def _explain(exc: Exception) -> str:
    """One readable message from a Hydra/OmegaConf error, with the valid keys where we can name them."""
    text = str(exc).strip()
    cause = exc.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in text:
        text = f"{text}\n{str(cause).strip()}"
    key = re.search(r"full_key: ([\w.]+)", text)
    missing = re.search(r"Key '(\w+)' not in '(\w+)'", text)
    if missing and key:
        parent = key.group(1).rsplit(".", 1)[0] if "." in key.group(1) else ""
        valid = _schema_keys(parent)
        if valid:
            where = parent or "the top level"
            return f"unknown config key '{key.group(1)}'; valid keys in {where}: {', '.join(valid)}"
    group = re.search(r"Could not find '([\w/]+)/(\w+)'", text)
    options = re.search(r"Available options in '[\w/]+':\s*((?:[\w-]+\s+)*?)Config search path", text)
    if group:
        choices = ", ".join(options.group(1).split()) if options else "none"
        return f"unknown choice {group.group(1)}={group.group(2)}; valid choices for {group.group(1)}: {choices}"
    if key:
        detail = next((ln.strip() for ln in text.splitlines() if "could not be converted" in ln or "Value '" in ln), "")
        if detail:
            return f"wrong type for '{key.group(1)}': {detail}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _check_experiment(overrides: list[str], cdir: Path) -> None:
    """``experiment`` is an optional group in train.yaml, so Hydra would silently skip a mistyped one."""
    for o in overrides:
        key, _, name = o.partition("=")
        if key.lstrip("+~") != "experiment" or not name or name == "null":
            continue
        choices = sorted(p.stem for p in (cdir / "experiment").glob("*.yaml"))
        if name not in choices:
            raise ConfigError(f"unknown choice experiment={name}; valid choices for experiment: {', '.join(choices)}")


def apply_recipe_defaults(cfg: DictConfig) -> None:
    """Defaults that depend on the recipe: online RL without ``objective.rewards`` scores completions with
    the verifiable ``accuracy`` reward against each row's ``solution`` (ms-swift's GRPO data)."""
    if RECIPES[cfg.recipe.name].online_rl and not cfg.objective.rewards:
        cfg.objective.rewards = dict(DEFAULT_RL_REWARDS)


def load_config(overrides: list[str], config_dir: str | Path | None = None) -> DictConfig:
    """Compose ``train.yaml`` + ``overrides`` into a validated, resolved, read-only config."""
    _register_schema()
    GlobalHydra.instance().clear()
    cdir = Path(config_dir) if config_dir else default_config_dir()
    _check_experiment(list(overrides), cdir)
    try:
        with initialize_config_dir(config_dir=str(cdir), version_base=None):
            cfg = compose(config_name="train", overrides=_dict_overrides(list(overrides)))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(_explain(exc)) from None
    finally:
        GlobalHydra.instance().clear()
    if cfg.recipe.name in RECIPES:  # an unknown recipe is validate()'s to report
        apply_recipe_defaults(cfg)
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_saved_config(path: str | Path) -> DictConfig:
    """Re-read a ``config.yaml`` written by a run, checked against the current schema."""
    schema = OmegaConf.structured(TrainConfig)
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.load(path))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {_explain(exc)}") from None
    validate(cfg)
    return cfg
