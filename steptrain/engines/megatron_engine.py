"""megatron-core tensor, pipeline and virtual-pipeline parallelism behind the engine interface.

- The recipe builds its HF model (optionally peft-LoRA-wrapped) as on every engine; ``prepare`` turns it
  into this rank's GPTModel chunks (and frees the HF copy of the LLM) (``steptrain/models/megatron_bridge.py``: fused QKV per KV group,
  [gate; up], tied embeddings, vocabulary padded to the TP size) and moves peft's LoRA weights onto
  Megatron's parallel linears (``megatron_lora.py``), so every engine starts from the same numbers.
- Ranks: world = data x pipeline x tensor. Data is sharded over ``data_rank``/``data_world``; the TP and
  PP ranks of one replica see the same micro-batches.
- A step's micro-batches go through megatron's schedule (no pipelining, 1F1B or interleaved), with
  variable sequence lengths; the task's ``score`` runs on the last stage. The recipe's loss is already
  divided by the step's global count, so Megatron's own per-micro-batch and data-parallel averaging is
  off (``calculate_per_token_loss`` with one "token" per micro-batch, and grads summed over replicas).
- Megatron's DDP (grad buffers, all-reduce at the end of the step, embedding-grad sync between first and
  last stage) and optimizer (fp32 master weights under bf16, grad clipping over the TP/PP groups) do
  the update; steptrain's warmup/decay schedule and per-group lr multipliers / weight-decay exclusions
  drive its parameter groups, so settings mean the same as on the other engines.
- RoPE uses each token's ``position_ids`` (packed rows and shared-prompt DPO rows restart or skip
  positions); attention takes an explicit mask (block-causal from ``position_ids``, or the batch's 4-D one).
- Checkpoints: megatron dist_checkpointing (``<ckpt>/megatron/``: model and optimizer, resharded on load
  to any TP/PP layout); with ``engine.consolidate_on_save`` also ``model.safetensors`` in HF (or peft)
  names, which ``steptrain export`` reads like any other engine's.
- A speech LLM (Step-Audio 2 layout) keeps its audio encoder and adapter on the first pipeline stage:
  the clips' adapter outputs replace the ``<audio_patch>`` token embeddings there, and the LLM is split
  across stages like any other.
- On a machine without CUDA it runs only with ``engine.megatron_cpu=true`` (``megatron_cpu_shim.py``).
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from steptrain.config import ConfigError
from steptrain.engines import megatron_cpu_shim as shim
from steptrain.engines.base import Engine
from steptrain.engines.optim import build_scheduler, named_param_groups
from steptrain.engines.process_group import OPS, ProcessGroupCollectives, one_process_env
from steptrain.engines.single import resolve_device
from steptrain.engines.torch_engine import SCHEDULER, WEIGHTS
from steptrain.models import megatron_bridge as bridge
from steptrain.models.forward import eval_mode, lm_logits
from steptrain.models.megatron_lora import hf_targets, peft_name, wrap_layer

log = logging.getLogger(__name__)

TAG = "megatron"  # sub-directory of a steptrain checkpoint holding megatron's dist checkpoint
AUDIO = ("audio_encoder.", "audio_adapter.")  # a speech LLM's modules on the first stage (HF names)


class PositionRotary(torch.nn.Module):
    """GPTModel's rotary embedding, taken at each token's position id instead of 0..s-1."""

    def __init__(self, rotary):
        super().__init__()
        self.rotary = rotary
        self.positions: torch.Tensor | None = None  # [b, s], set before each forward

    def forward(self, max_seq_len, *args, **kwargs):
        table = self.rotary(int(self.positions.max()) + 1, *args, **kwargs)  # [p, 1, 1, d]
        return table[self.positions.t()].squeeze(2)  # [s, b, 1, d]

    def get_rotary_seq_len(self, *args, **kwargs):
        return self.rotary.get_rotary_seq_len(*args, **kwargs)


def megatron_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Megatron's boolean attention mask [b, 1, s, s], True where attention is NOT allowed."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 4:
        return ~mask.bool()
    pos = batch["position_ids"]
    segment = torch.cumsum(pos == 0, dim=1)  # a packed row restarts positions per sequence
    s = pos.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=pos.device).tril()
    allowed = causal & (segment[:, :, None] == segment[:, None, :])
    return ~allowed[:, None]


class MegatronEngine(ProcessGroupCollectives, Engine):
    name = "megatron"
    lockstep = True  # TP/PP ranks run every forward together

    def __init__(self, engine_cfg, trainer_cfg, optim_cfg):
        super().__init__(engine_cfg, trainer_cfg)
        one_process_env()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self._device = resolve_device(engine_cfg.device, self.local_rank)
        on_gpu = self._device.type == "cuda"
        if not on_gpu and not engine_cfg.megatron_cpu:
            raise ConfigError(
                "engine=megatron needs CUDA; on a machine without it set engine.megatron_cpu=true "
                "(runs megatron-core on CPU/gloo for tests and debugging)"
            )
        if not on_gpu and self.precision() == "bf16":
            raise ConfigError("engine=megatron trains bf16 on GPUs only (megatron's mixed-precision optimizer keeps "
                              "CUDA master weights); on CPU use trainer.precision=fp32")
        if on_gpu:
            torch.cuda.set_device(self._device)
        backend = engine_cfg.backend if engine_cfg.backend != "auto" else ("nccl" if on_gpu else "gloo")
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.tp, self.pp = int(engine_cfg.tensor_parallel), int(engine_cfg.pipeline_parallel)
        self.vpp = int(engine_cfg.virtual_pipeline) if engine_cfg.virtual_pipeline > 1 else None
        if self.world_size % (self.tp * self.pp):
            raise ConfigError(
                f"world size {self.world_size} is not a multiple of engine.tensor_parallel x engine.pipeline_parallel "
                f"= {self.tp * self.pp}"
            )
        from megatron.core import parallel_state as ps

        self.ps = ps
        ps.initialize_model_parallel(self.tp, self.pp, virtual_pipeline_model_parallel_size=self.vpp)
        if on_gpu:
            from megatron.core import tensor_parallel

            tensor_parallel.model_parallel_cuda_manual_seed(int(trainer_cfg.seed))
        else:
            shim.install(int(trainer_cfg.seed))
        self._optim_cfg = optim_cfg

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def data_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    @property
    def data_world(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def data_all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        dist.all_reduce(tensor, op=OPS[op], group=self.ps.get_data_parallel_group())
        return tensor

    def autocast(self):
        return torch.autocast(self.device.type, enabled=False)  # Megatron keeps its own precision

    def close(self) -> None:
        if self.ps.model_parallel_is_initialized():
            self.ps.destroy_model_parallel()
        super().close()

    # --- model ------------------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        p = self.precision()
        if p == "fp16":
            raise ConfigError("engine=megatron trains in fp32 or bf16 (trainer.precision)")
        return torch.bfloat16 if p == "bf16" else torch.float32

    def _build_chunks(self, hf_cfg):
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        self.config = bridge.transformer_config(
            hf_cfg, tp=self.tp, pp=self.pp, vpp=self.vpp, dtype=self._dtype(), on_cpu=self.device.type == "cpu",
            calculate_per_token_loss=True, variable_seq_lengths=self.pp > 1,
            moe_token_dispatcher_type="alltoall",  # dense models; megatron refuses the default with variable lengths
            # interleaved p2p on gloo is only right with separate (overlapped) sends/receives
            overlap_p2p_comm=self.vpp is not None, batch_p2p_comm=self.vpp is None,
        )
        self.vocab = bridge.padded_vocab(hf_cfg, self.tp)
        chunks = []
        for vp in range(self.vpp or 1):
            vp_stage = vp if self.vpp else None
            chunk = GPTModel(
                config=self.config,
                transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                vocab_size=self.vocab,
                max_sequence_length=hf_cfg.max_position_embeddings,
                pre_process=self.ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=self.ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                parallel_output=False,  # the task scores full-vocabulary logits
                share_embeddings_and_output_weights=bool(hf_cfg.tie_word_embeddings),
                position_embedding_type="rope",
                rotary_base=bridge.rotary_base(hf_cfg),
                vp_stage=vp_stage,
            )
            chunk.rotary_pos_emb = PositionRotary(chunk.rotary_pos_emb)
            chunks.append(chunk)
        return chunks

    def _global_names(self, chunk) -> dict[str, str]:
        """Chunk-local parameter name -> name in the unsplit GPTModel (global layer numbers, no wrappers)."""
        layers = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(chunk.decoder.layers)}
        out = {}
        for name, _ in chunk.named_parameters():
            g = name.replace(".base.", ".").replace("rotary_pos_emb.rotary.", "rotary_pos_emb.")
            m = bridge.LAYER.match(g)
            out[name] = f"decoder.layers.{layers[m.group(1)]}.{m.group(2)}" if m else g
        return out

    def prepare(self, model, param_groups, optim_cfg, total_steps):
        peft_cfg = getattr(model, "peft_config", {}).get("default")
        hf = model.get_base_model() if peft_cfg is not None else model
        speech = getattr(hf, "audio_encoder", None) is not None
        lm = hf.llm if speech else hf
        if not hasattr(lm, "lm_head"):
            raise ConfigError("engine=megatron trains Qwen2/LLaMA causal LMs and speech LLMs (reward models: not yet)")
        if speech and peft_cfg is not None:
            raise ConfigError("engine=megatron trains a speech LLM's LLM and adapter in full (peft=none); LoRA: not yet")
        self.hf_config = lm.config
        self.prefix = "llm." if speech else ""  # where the LLM's weights sit in the recipe's model
        self.audio_patch_id = hf.config.audio_patch_id if speech else None
        with shim.on_cpu():
            chunks = self._build_chunks(lm.config)
        if speech and chunks[0].pre_process:  # the audio encoder and adapter run on the first stage
            chunks[0].audio_encoder, chunks[0].audio_adapter = hf.audio_encoder, hf.audio_adapter
        tp_rank = self.ps.get_tensor_model_parallel_rank()
        base = {k.replace(".base_layer.", "."): v.detach() for k, v in lm.state_dict().items() if ".lora_" not in k}
        full = bridge.to_megatron(base, lm.config, self.vocab)
        if peft_cfg is not None:
            if getattr(peft_cfg, "trainable_token_indices", None) or peft_cfg.modules_to_save:
                raise ConfigError("engine=megatron LoRA trains the linear projections only: set "
                                  "peft.train_new_tokens=false and peft.modules_to_save=[]")
            targets = hf_targets(peft_cfg.target_modules)
            peft_state = {k: v.detach() for k, v in model.state_dict().items() if ".lora_" in k}
            for chunk in chunks:
                for p in chunk.parameters():
                    p.requires_grad_(False)
                for layer in chunk.decoder.layers:
                    wrap_layer(layer, self.config, targets, peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.lora_dropout, self.tp)
        tied = bool(hf.config.tie_word_embeddings)
        named = []
        with torch.no_grad():
            for chunk in chunks:
                names = self._global_names(chunk)
                for name, p in chunk.named_parameters():
                    g = names[name]
                    if g.startswith(AUDIO):
                        named.append((g, p))  # the recipe's own audio modules, weights already in place
                        continue
                    if ".lora_" in g:
                        src = peft_state[peft_name(g)]
                    else:
                        src = full["embedding.word_embeddings.weight" if tied and g == "output_layer.weight" else g]
                    p.copy_(bridge.shard(g, src, tp_rank, self.tp).to(p.dtype))
                    named.append((self._hf_like(g), p))
        for p in lm.parameters():  # the recipe's HF copy of the LLM is spent: free its memory now
            p.data = torch.empty(0, dtype=p.dtype)
        self.model = self._wrap_ddp(chunks)
        self.module = torch.nn.ModuleList(self.model)
        self.optimizer, self.scheduler = self._build_optimizer([(n, p) for n, p in named if p.requires_grad], optim_cfg, total_steps)
        return self.module, self.optimizer, self.scheduler

    @staticmethod
    def _hf_like(name: str) -> str:
        """An HF-style name for lr_mult / weight-decay patterns (``optim.lr_mult`` regexes are HF names)."""
        if ".lora_" in name:
            return peft_name(name)
        if name.startswith(AUDIO):
            return name
        hf = bridge.hf_name(name)
        if hf is not None:
            return hf
        m = bridge.LAYER.match(name)
        if m and "linear_fc1" in name:
            return f"model.layers.{m.group(1)}.mlp.gate_up_proj.weight"
        return f"model.layers.{m.group(1)}.self_attn.qkv_proj.{name.rsplit('.', 1)[1]}"

    def _wrap_ddp(self, chunks):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False,
        )
        with shim.on_cpu():
            wrapped = [
                DistributedDataParallel(config=self.config, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
                for i, c in enumerate(chunks)
            ]

        def finalize(models, num_tokens=None, **kwargs):
            # The loss is already normalised by the step's global count: no division by "tokens".
            finalize_model_grads(models, None, **kwargs)

        self.config.finalize_model_grads_func = finalize
        self.config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
        return wrapped

    def _build_optimizer(self, named, optim_cfg, total_steps):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate

        groups = named_param_groups(named, optim_cfg)
        wd = float(optim_cfg.weight_decay)
        overrides = {}
        for i, g in enumerate(groups):
            ids = frozenset(id(p) for p in g["params"])
            key = ParamKey(predicate=ParamPredicate(name=f"steptrain-group-{i}", fn=lambda p, ids=ids: id(p) in ids))
            overrides[key] = {"lr_mult": g["lr_mult"], "wd_mult": 1.0 if g["weight_decay"] > 0 else 0.0}
        dtype = self._dtype()
        cfg = OptimizerConfig(
            optimizer="adam", lr=float(optim_cfg.lr), min_lr=0.0, weight_decay=wd,
            adam_beta1=float(optim_cfg.betas[0]), adam_beta2=float(optim_cfg.betas[1]), adam_eps=float(optim_cfg.eps),
            clip_grad=float(optim_cfg.max_grad_norm), bf16=dtype == torch.bfloat16, params_dtype=dtype,
            use_distributed_optimizer=False,
        )
        with shim.on_cpu():
            optimizer = get_megatron_optimizer(cfg, [m for m in self.model], config_overrides=overrides)
        inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
        if len(inner) != 1:
            raise RuntimeError(f"expected one underlying optimizer, got {len(inner)}")
        for group in inner[0].param_groups:  # what megatron's own scheduler would set, before ours scales it
            group["lr"] = float(optim_cfg.lr) * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)
        return optimizer, build_scheduler(inner[0], optim_cfg, total_steps)

    # --- running micro-batches --------------------------------------------------------------------
    def _run(self, batches: list[dict], score, *, forward_only: bool) -> list:
        """Run ``batches`` through megatron's schedule; score outputs on the last stage; every rank of the
        pipeline gets the list of score results."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        results: list = []

        def step(data_iterator, model):
            batch = next(data_iterator)
            inner = model.module if hasattr(model, "module") else model
            inner.rotary_pos_emb.positions = batch["position_ids"]
            out = model(batch["input_ids"], batch["position_ids"], megatron_mask(batch),
                        decoder_input=self._speech_embeddings(inner, batch))

            def loss_func(output):
                result = score(output[..., : self.hf_config.vocab_size].float(), batch)  # bf16 logits: fp32 loss
                results.append(result)
                loss = result[0] if isinstance(result, tuple) else output.sum() * 0
                return loss, torch.ones((), dtype=torch.int), {}

            return out, loss_func

        data = [iter(batches) for _ in self.model] if self.vpp else iter(batches)
        with shim.on_cpu():
            get_forward_backward_func()(
                forward_step_func=step, data_iterator=data, model=self.model if self.vpp else self.model[0],
                num_microbatches=len(batches), seq_length=max(b["input_ids"].shape[1] for b in batches),
                micro_batch_size=max(b["input_ids"].shape[0] for b in batches), forward_only=forward_only,
            )
        if self.pp > 1:
            box = [results if self.ps.is_pipeline_last_stage() else None]
            dist.broadcast_object_list(
                box, src=self.ps.get_pipeline_model_parallel_last_rank(), group=self.ps.get_pipeline_model_parallel_group()
            )
            results = box[0]
        return results

    def _speech_embeddings(self, chunk, batch):
        """First stage of a speech LLM: token embeddings with the clips' adapter outputs placed at their
        ``<audio_patch>`` runs ([s, b, h], Megatron's layout); None elsewhere (the chunk embeds by itself)."""
        if getattr(chunk, "audio_encoder", None) is None or batch.get("audio_features") is None:
            return None
        from steptrain.models.speech.modeling import encode_clips, place_audio

        emb = chunk.embedding(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        if batch["audio_features"].shape[0] == 0:
            return emb
        audio, counts = encode_clips(chunk.audio_encoder, chunk.audio_adapter, batch["audio_features"],
                                     batch.get("audio_lengths"))
        merged = place_audio(batch["input_ids"], emb.transpose(0, 1), audio, counts, self.audio_patch_id)
        return merged.transpose(0, 1).contiguous()

    def forward_backward(self, batches, score, scale, forward=lm_logits):
        if forward is not lm_logits:
            raise ConfigError("engine=megatron runs causal-LM tasks (SFT, DPO); this recipe's model is not one")

        def scaled(logits, batch):
            loss_sum, stats = score(logits, batch)
            return loss_sum * scale, stats.detach()

        results = self._run(batches, scaled, forward_only=False)
        return sum(stats for _, stats in results)

    @torch.no_grad()
    def forward_only(self, batches, score, forward=lm_logits):
        if forward is not lm_logits:
            raise ConfigError("engine=megatron runs causal-LM tasks (SFT, DPO); this recipe's model is not one")
        if not batches:
            return []
        with eval_mode(self.module):
            return [
                r.detach() if isinstance(r, torch.Tensor) else tuple(t.detach() for t in r)
                for r in self._run(batches, score, forward_only=True)
            ]

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError("engine=megatron runs backward inside forward_backward (the pipeline schedule)")

    def step(self) -> float:
        with shim.on_cpu():
            _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step()
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        return float(grad_norm) if grad_norm is not None else float("nan")

    # --- state ------------------------------------------------------------------------------------
    def _sharded_state(self, loading: bool) -> dict:
        trainable = {id(p) for m in self.model for p in m.parameters() if p.requires_grad}
        model_state = {}
        for i, m in enumerate(self.model):
            sd = m.module.sharded_state_dict()
            # A LoRA base is frozen: it comes from the pretrained model again, never from the checkpoint.
            model_state[f"model{i}"] = {
                k: v for k, v in sd.items() if not hasattr(v, "data") or not isinstance(v.data, torch.nn.Parameter)
                or id(v.data) in trainable
            }
        return {"model": model_state, "optimizer": self.optimizer.sharded_state_dict(model_state, is_loading=loading)}

    def save(self, ckpt_dir: Path) -> None:
        from megatron.core import dist_checkpointing

        path = Path(ckpt_dir) / TAG
        if self.is_main:
            path.mkdir(parents=True, exist_ok=True)
        self.barrier()
        with shim.on_cpu():
            dist_checkpointing.save(self._sharded_state(loading=False), str(path))
        weights = self.trainable_state_dict() if self.cfg.consolidate_on_save else None
        if self.is_main:
            torch.save(self.scheduler.state_dict(), Path(ckpt_dir) / SCHEDULER)
            if weights is not None:
                save_file(weights, str(Path(ckpt_dir) / WEIGHTS))

    def load(self, ckpt_dir: Path) -> None:
        from megatron.core import dist_checkpointing

        path = Path(ckpt_dir) / TAG
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no Megatron checkpoint to resume from")
        with shim.on_cpu():
            state = dist_checkpointing.load(self._sharded_state(loading=True), str(path))
            for i, m in enumerate(self.model):
                m.module.load_state_dict(state["model"][f"model{i}"], strict=False)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(torch.load(Path(ckpt_dir) / SCHEDULER, weights_only=True, map_location="cpu"))

    def _gathered(self, trainable_only: bool) -> dict[str, torch.Tensor]:
        """Full (TP-gathered) tensors of every stage by global Megatron name, on the main rank."""
        tp_group = self.ps.get_tensor_model_parallel_group()
        mine = {}
        for m in self.model:
            names = self._global_names(m.module)
            for name, p in m.module.named_parameters():
                if trainable_only and not p.requires_grad:
                    continue
                g = names[name]
                t = p.detach()
                if bridge.split_kind(g) is not None and self.tp > 1:
                    pieces = [torch.empty_like(t) for _ in range(self.tp)]
                    dist.all_gather(pieces, t.contiguous(), group=tp_group)
                    t = bridge.unshard(g, pieces)
                if self.ps.get_tensor_model_parallel_rank() == 0 and self.data_rank == 0:
                    mine.setdefault(g, t.float().cpu().clone())  # a tied output copy repeats the embedding
        everything = [None] * self.world_size if self.is_main else None
        dist.gather_object(mine, everything, dst=0)
        return {k: v for part in (everything or []) for k, v in part.items()}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable weights in the names of the recipe's HF (or peft) model, on the main rank (all ranks call)."""
        full = self._gathered(trainable_only=True)
        if not self.is_main:
            return {}
        lora = {peft_name(k): v for k, v in full.items() if ".lora_" in k}
        if lora:
            return lora
        return self._recipe_names(full, drop_tied=True)

    def _recipe_names(self, full: dict, drop_tied: bool) -> dict[str, torch.Tensor]:
        """Full Megatron weights -> the recipe model's names (an HF causal LM, or a speech LLM's parts)."""
        audio = {k: v for k, v in full.items() if k.startswith(AUDIO)}
        state = bridge.to_hf({k: v for k, v in full.items() if k not in audio}, self.hf_config)
        if drop_tied and self.hf_config.tie_word_embeddings:
            state.pop("lm_head.weight")  # an alias of the embedding, not a parameter
        return {**{self.prefix + k: v for k, v in state.items()}, **audio}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The recipe model's weights (HF names; LoRA merged into its projections), on the main rank (all ranks call)."""
        full = self._gathered(trainable_only=False)
        if not self.is_main:
            return {}
        base = {k.replace(".base.", "."): v for k, v in full.items() if ".lora_" not in k}
        return self._recipe_names(merge_lora(base, full, self.hf_config, self.module), drop_tied=False)


def merge_lora(base: dict, full: dict, hf_cfg, module) -> dict:
    """``base`` Megatron weights with every LoRA part's (alpha / r) B A added to its slice of the fused weight."""
    from steptrain.models.megatron_lora import ParallelLoRA

    scaling = next((m.scaling for m in module.modules() if isinstance(m, ParallelLoRA)), None)
    if scaling is None:
        return base
    out = dict(base)
    d, g = bridge.head_dim(hf_cfg), hf_cfg.num_key_value_heads
    sizes = {"q": hf_cfg.num_attention_heads * d, "k": g * d, "v": g * d,
             "gate": hf_cfg.intermediate_size, "up": hf_cfg.intermediate_size}
    for name in [k for k in full if ".lora_A." in k]:
        prefix, part = name.split(".lora_A.")
        delta = scaling * full[f"{prefix}.lora_B.{part}"] @ full[name]
        w = out[f"{prefix}.weight"].clone()
        if prefix.endswith("linear_qkv"):
            q, k, v = bridge.split_qkv(w, hf_cfg)
            parts = {"q": q, "k": k, "v": v}
            parts[part] = parts[part] + delta
            w = bridge.fuse_qkv(parts["q"], parts["k"], parts["v"], g)
        elif prefix.endswith("linear_fc1"):
            gate, up = w.split([sizes["gate"], sizes["up"]])
            w = torch.cat([gate + delta, up] if part == "gate" else [gate, up + delta])
        else:
            w = w + delta
        out[f"{prefix}.weight"] = w
    return out
