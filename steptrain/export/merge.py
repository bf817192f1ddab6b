"""`steptrain merge`: weighted merging of models into one HF model directory.

Inputs are HF model directories, PEFT adapter directories (applied to their base and merged) or
steptrain checkpoints (rebuilt from their own config; LoRA merged). With weights ``w_i`` and, where
the method needs one, a base model ``θ_base``, every floating-point parameter is merged as:

- ``linear``: ``θ = Σ_i w_i θ_i`` (the weights as given; a sum other than 1 is logged, not corrected).
- ``task_arithmetic`` (Ilharco et al. 2023): ``θ = θ_base + Σ_i w_i (θ_i − θ_base)``.
- ``ties`` (Yadav et al. 2023): task vectors ``τ_i = θ_i − θ_base``, each trimmed per tensor to its
  ``density`` fraction of largest magnitudes (``τ̂_i``); ``v_i = w_i τ̂_i``; elected sign
  ``γ = sign(Σ_i v_i)``; disjoint mean ``m = Σ_{i∈A} v_i / |A|`` over ``A = {i : v_i ≠ 0, sign(v_i) = γ}``
  (``m = 0`` where ``A`` is empty); ``θ = θ_base + m``.

Tensors that are not parameters (buffers) are copied when they are equal in all inputs; integer and
bool tensors must be equal, a differing floating buffer is merged like a parameter. The arithmetic is
done in float64 and the result cast to the first input's dtype. The output is written like
``steptrain export``: a temporary directory renamed at the end.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steptrain.checkpoint.manager import COMPLETE
from steptrain.export.hf import ExportError, _check_no_empty_tensors

log = logging.getLogger(__name__)

METHODS = ("linear", "task_arithmetic", "ties")
NEEDS_BASE = ("task_arithmetic", "ties")
SPEECH_MODEL_TYPE = "steptrain_speech_lm"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# config fields that legitimately differ between models of one architecture
_CONFIG_IGNORED = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache",
                   "_attn_implementation", "_attn_implementation_autoset", "freeze_encoder", "architectures"}


class MergeError(ExportError):
    """The models cannot be merged; the message names the input path (and tensor)."""


# --------------------------------------------------------------------------- tensor math (pure)


def keep_count(numel: int, density: float) -> int:
    """k = ⌈density · n⌉ elements kept by trimming (density · n rounded to 6 decimals first, so 0.1 · 10 is 1)."""
    return min(numel, max(0, math.ceil(round(density * numel, 6))))


def trim_by_magnitude(tau: torch.Tensor, density: float) -> torch.Tensor:
    """``τ`` with all but its k = ⌈density · n⌉ largest-magnitude entries set to zero (TIES "trim").

    Entries of equal magnitude at the threshold are kept in flat (row-major) index order, so exactly
    k entries survive and the result is deterministic.
    """
    n = tau.numel()
    k = keep_count(n, density)
    if k >= n:
        return tau.clone()
    if k == 0:
        return torch.zeros_like(tau)
    a = tau.reshape(-1).abs()
    threshold = torch.kthvalue(a, n - k + 1).values  # the k-th largest magnitude
    keep = a > threshold
    need = k - int(keep.sum())
    if need:
        at = a == threshold
        keep |= at & (torch.cumsum(at, 0) <= need)
    return torch.where(keep.reshape(tau.shape), tau, torch.zeros((), dtype=tau.dtype))


def linear_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """θ = Σ_i w_i θ_i, in float64."""
    return sum(w * t.double() for w, t in zip(weights, tensors, strict=True))


def task_arithmetic_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor) -> torch.Tensor:
    """θ = θ_base + Σ_i w_i (θ_i − θ_base), in float64 (Ilharco et al. 2023, "Editing models with task arithmetic")."""
    b = base.double()
    return b + sum(w * (t.double() - b) for w, t in zip(weights, tensors, strict=True))


def ties_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor,
               density: float) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023), in float64.

    1. task vectors τ_i = θ_i − θ_base, trimmed to their top-``density`` magnitudes: τ̂_i
       (:func:`trim_by_magnitude`, per tensor);
    2. weighted trimmed vectors v_i = w_i τ̂_i; elected sign γ = sign(Σ_i v_i), per element;
    3. disjoint mean m = (1 / |A|) Σ_{i∈A} v_i with A = {i : v_i ≠ 0 and sign(v_i) = γ}; m = 0 where A
       is empty (also where γ = 0);
    4. θ = θ_base + m.

    With all w_i = 1 this is the paper's method with λ = 1; w_i scales model i's contribution and
    counts in the mean as one model, whatever its size (mergekit instead divides by Σ_{i∈A} w_i).
    Agreement is judged on v_i, which for w_i > 0 is the sign of τ̂_i; a model with w_i = 0 is never
    in A, so it changes nothing.
    """
    b = base.double()
    v = torch.stack([w * trim_by_magnitude(t.double() - b, density) for w, t in zip(weights, tensors, strict=True)])
    gamma = torch.sign(v.sum(0))
    agree = (v != 0) & (torch.sign(v) == gamma)
    count = agree.sum(0)
    merged = (v * agree).sum(0) / count.clamp(min=1)
    return b + merged


def merge_tensors(tensors: Sequence[torch.Tensor], weights: Sequence[float], method: str = "linear",
                  base: torch.Tensor | None = None, density: float = 1.0) -> torch.Tensor:
    """Merge one floating-point tensor across models: float64 arithmetic, the first tensor's dtype out.

    ``linear``: θ = Σ w_i θ_i. ``task_arithmetic``: θ = θ_base + Σ w_i (θ_i − θ_base).
    ``ties``: θ = θ_base + disjoint mean of the sign-agreeing w_i · trim(θ_i − θ_base) (see :func:`ties_merge`).
    """
    if len(tensors) != len(weights):
        raise MergeError(f"{len(weights)} weights for {len(tensors)} tensors")
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; valid methods: {', '.join(METHODS)}")
    if method in NEEDS_BASE and base is None:
        raise MergeError(f"method {method} needs a base tensor")
    if method == "linear":
        out = linear_merge(tensors, weights)
    elif method == "task_arithmetic":
        out = task_arithmetic_merge(tensors, weights, base)
    else:
        out = ties_merge(tensors, weights, base, density)
    return out.to(tensors[0].dtype)


# --------------------------------------------------------------------------- inputs


@dataclass
class Loaded:
    path: str
    kind: str  # "hf" | "adapter" | "checkpoint"
    model: Any
    tokenizer: Any = None  # a tokenizer object (checkpoints) ...
    tokenizer_dirs: tuple[Path, ...] = ()  # ... or directories that may hold one, in order


KIND_NAMES = {"hf": "HF model", "adapter": "PEFT adapter", "checkpoint": "steptrain checkpoint"}


def input_kind(path: str | Path) -> str:
    """``checkpoint`` (a COMPLETE marker), ``adapter`` (adapter_config.json) or ``hf`` (config.json)."""
    p = Path(path)
    if not p.is_dir():
        raise MergeError(f"{path}: no such directory")
    if (p / COMPLETE).exists():
        return "checkpoint"
    if (p / "adapter_config.json").exists():
        return "adapter"
    if (p / "config.json").exists():
        return "hf"
    if (p / "config.yaml").exists():
        raise MergeError(f"{path}: not a complete steptrain checkpoint (no {COMPLETE} marker)")
    raise MergeError(f"{path}: not an HF model directory (config.json), a PEFT adapter directory "
                     f"(adapter_config.json) or a steptrain checkpoint ({COMPLETE})")


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / f).exists() for f in _TOKENIZER_FILES)


def _from_pretrained(path: str | Path):
    """AutoModelForCausalLM in the stored dtype; speech models register their classes first."""
    from transformers import AutoModelForCausalLM

    config = Path(path) / "config.json"
    if config.exists() and json.loads(config.read_text()).get("model_type") == SPEECH_MODEL_TYPE:
        import steptrain.models.speech  # noqa: F401 - registers steptrain_speech_lm with the Auto classes
    return AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()


def _merge_lora(model):
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def load_input(path: str | Path, *, adapter_base: str | Path | None = None) -> Loaded:
    """Load one input as a plain (LoRA-merged) model; ``adapter_base`` overrides an adapter's base model."""
    kind = input_kind(path)
    p = Path(path)
    try:
        if kind == "checkpoint":
            from steptrain.export.hf import rebuild_from_checkpoint

            model, tokenizer, _ = rebuild_from_checkpoint(p)
            return Loaded(str(path), kind, _merge_lora(model).eval(), tokenizer=tokenizer)
        if kind == "hf":
            return Loaded(str(path), kind, _from_pretrained(p), tokenizer_dirs=(p,))
        from peft import PeftModel

        adapter_cfg = json.loads((p / "adapter_config.json").read_text())
        base = adapter_base or adapter_cfg.get("base_model_name_or_path")
        if not base:
            raise MergeError(f"{path}: adapter_config.json names no base_model_name_or_path; pass --base")
        model = _from_pretrained(base)
        if _has_tokenizer(p):  # an adapter trained with added tokens: the base's embeddings grow to match
            from transformers import AutoTokenizer

            n = len(AutoTokenizer.from_pretrained(p))
            if n > model.get_input_embeddings().weight.shape[0]:
                log.info("%s: resizing the base embeddings to the adapter's %d tokens", path, n)
                model.resize_token_embeddings(n)
        merged = PeftModel.from_pretrained(model, p).merge_and_unload().eval()
        return Loaded(str(path), kind, merged, tokenizer_dirs=(p, Path(base)))
    except MergeError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MergeError(f"{path}: cannot load as {KIND_NAMES[kind]}: {first}") from exc


# --------------------------------------------------------------------------- checks


def _architecture(model) -> str:
    return f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')})"


def _config_diff(a, b) -> list[str]:
    da, db = a.config.to_dict(), b.config.to_dict()
    return sorted(k for k in (da.keys() | db.keys()) - _CONFIG_IGNORED if da.get(k) != db.get(k))


def check_compatible(ref: Loaded, other: Loaded, ref_state: dict, other_state: dict) -> None:
    """Same architecture, parameter names and shapes as ``ref``, else MergeError naming ``other`` and the tensor."""
    if _architecture(other.model) != _architecture(ref.model):
        raise MergeError(f"{other.path}: architecture {_architecture(other.model)} differs from "
                         f"{_architecture(ref.model)} of {ref.path}")
    missing = sorted(ref_state.keys() - other_state.keys())
    extra = sorted(other_state.keys() - ref_state.keys())
    if missing or extra:
        parts = ([f"lacks {missing[:3]}" + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")] if missing else [])
        parts += [f"has extra {extra[:3]}" + (f" (+{len(extra) - 3} more)" if len(extra) > 3 else "")] if extra else []
        raise MergeError(f"{other.path}: parameter names differ from {ref.path}: {'; '.join(parts)}")
    for name, t in ref_state.items():
        if other_state[name].shape != t.shape:
            raise MergeError(f"{other.path}: tensor {name} has shape {tuple(other_state[name].shape)}, "
                             f"{ref.path} has {tuple(t.shape)}")
    diff = _config_diff(ref.model, other.model)
    if diff:
        log.warning("%s: config fields %s differ from %s; the output keeps %s's", other.path, diff, ref.path, ref.path)


def validate(inputs: Sequence[str | Path], weights: Sequence[float], method: str, base, density,
             out_dir: str | Path | None = None) -> float:
    """Check the arguments before anything is loaded; return the TIES density to use."""
    if not inputs:
        raise MergeError("no models to merge")
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; valid methods: {', '.join(METHODS)}")
    if len(weights) != len(inputs):
        raise MergeError(f"{len(weights)} weights for {len(inputs)} inputs ({', '.join(map(str, inputs))}); "
                         f"give one weight per input")
    if method in NEEDS_BASE and base is None:
        raise MergeError(f"method {method} needs --base (the model the task vectors θ_i − θ_base start from)")
    if density is not None and method != "ties":
        log.warning("--density only applies to ties; ignored for %s", method)
    density = 1.0 if density is None else float(density)
    if method == "ties" and not 0.0 < density <= 1.0:
        raise MergeError(f"--density must be in (0, 1], got {density}")
    if method == "linear" and not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
        log.warning("linear merge weights sum to %g, not 1: the merged parameters are scaled by that sum "
                    "(not renormalised)", sum(weights))
    for path in [*inputs, *([base] if base is not None else [])]:
        input_kind(path)
    if out_dir is not None:
        out = Path(out_dir).resolve()
        for path in [*inputs, *([base] if base is not None else [])]:
            if Path(path).resolve() == out:
                raise MergeError(f"{out_dir}: the output directory is also an input; choose another")
    return density


# --------------------------------------------------------------------------- merge + write


def _merge_state(loaded: list[Loaded], states: list[dict], weights, method, base: Loaded | None,
                 base_state: dict | None, density: float) -> dict:
    ref = loaded[0]
    params = {name for name, _ in ref.model.named_parameters(remove_duplicate=False)}
    others = [item.path for item in loaded[1:]] + ([base.path] if base is not None else [])
    merged = {}
    for name, t0 in states[0].items():
        ts = [s[name] for s in states]
        b = base_state[name] if base_state is not None else None
        everyone = ts + ([b] if b is not None else [])
        if not t0.is_floating_point():
            for path, t in zip(others, everyone[1:], strict=True):
                if not torch.equal(t, t0):
                    raise MergeError(f"{path}: integer tensor {name} differs from {ref.path}'s; it cannot be merged")
            merged[name] = t0.clone()
        elif name not in params and all(torch.equal(t.to(t0.dtype), t0) for t in everyone[1:]):
            merged[name] = t0.clone()  # an identical buffer (e.g. a positional table) is copied, not scaled
        else:
            merged[name] = merge_tensors(ts, weights, method, base=b, density=density)
    return merged


def _tokenizer(loaded: list[Loaded]):
    from transformers import AutoTokenizer

    for item in loaded:
        if item.tokenizer is not None:
            return item.tokenizer, item.path
        for d in item.tokenizer_dirs:
            if d.is_dir() and _has_tokenizer(d):
                return AutoTokenizer.from_pretrained(d), str(d)
    return None, None


def merge_card(items: list[tuple[str, str, float | None]], *, method: str, base: str | None, density: float) -> str:
    """The README.md model card: inputs, weights, method (with its equation) and base."""
    header = {"library_name": "transformers", "tags": ["steptrain", "merge", method],
              "base_model": [path for path, _, _ in items], "base_model_relation": "merge"}
    equation = {
        "linear": "θ = Σ_i w_i θ_i",
        "task_arithmetic": "θ = θ_base + Σ_i w_i (θ_i − θ_base)  (Ilharco et al. 2023)",
        "ties": (f"θ = θ_base + disjoint mean over sign-agreeing i of w_i · trim_{density:g}(θ_i − θ_base), "
                 "sign elected as sign(Σ_i w_i · trim(θ_i − θ_base))  (Yadav et al. 2023)"),
    }[method]
    lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in header.items()), "---", "",
             "# Model merged with steptrain", "",
             f"Method `{method}`" + (f", density {density:g}" if method == "ties" else "") + ":", "",
             f"    {equation}", "",
             "| # | input | kind | weight |", "|---|---|---|---|"]
    lines += [f"| {i} | `{path}` | {kind} | {w:g} |" for i, (path, kind, w) in enumerate(items, 1)]
    if base:
        lines += ["", f"Base (θ_base): `{base}`."]
    lines += ["", "Floating-point parameters are merged in float64 and stored in the first input's dtype; "
              "integer buffers and buffers equal in all inputs are copied.", ""]
    return "\n".join(lines)


def merge_models(inputs: Sequence[str | Path], out_dir: str | Path, *, weights: Sequence[float],
                 method: str = "linear", base: str | Path | None = None, density: float | None = None) -> Path:
    """Merge ``inputs`` with ``weights`` by ``method`` into the HF directory ``out_dir`` (atomically).

    ``base`` is θ_base for task_arithmetic / ties and the model PEFT adapter inputs are applied to
    (default: each adapter's ``base_model_name_or_path``). The output's config, generation config and
    architecture are the first input's; its tokenizer is the first one found among the inputs (then the base).
    """
    weights = [float(w) for w in weights]
    density = validate(inputs, weights, method, base, density, out_dir)
    loaded = [load_input(p, adapter_base=base) for p in inputs]
    base_loaded = load_input(base) if base is not None else None
    states = [item.model.state_dict() for item in loaded]
    base_state = base_loaded.model.state_dict() if base_loaded is not None else None
    for item, state in zip(loaded[1:], states[1:], strict=True):
        check_compatible(loaded[0], item, states[0], state)
    if base_loaded is not None:
        check_compatible(loaded[0], base_loaded, states[0], base_state)
    dtypes = {str(t.dtype) for s in states for t in s.values() if t.is_floating_point()}
    if len(dtypes) > 1:
        log.info("inputs hold %s tensors; the output keeps %s's dtypes", sorted(dtypes), loaded[0].path)

    merged = _merge_state(loaded, states, weights, method, base_loaded, base_state, density)
    model = loaded[0].model
    model.load_state_dict(merged, strict=True)
    tokenizer, tok_src = _tokenizer(loaded + ([base_loaded] if base_loaded is not None else []))

    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            log.info("tokenizer from %s", tok_src)
        else:
            log.warning("no input holds a tokenizer; %s has none", out)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            if gen.eos_token_id is None and tokenizer is not None:
                gen.eos_token_id = tokenizer.eos_token_id
            gen.save_pretrained(tmp)
        items = [(item.path, KIND_NAMES[item.kind], w) for item, w in zip(loaded, weights, strict=True)]
        (tmp / "README.md").write_text(merge_card(items, method=method, base=str(base) if base else None,
                                                  density=density))
        _check_no_empty_tensors(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


__all__ = ["METHODS", "MergeError", "merge_models", "merge_tensors", "ties_merge", "task_arithmetic_merge",
           "linear_merge", "trim_by_magnitude"]
