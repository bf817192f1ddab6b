"""Pre-train the speech demo's encoder + adapter with CTC on the digit corpus, for the ASR SFT to start from.

Why: trained end to end from random initialisation, the speech demo (configs/experiment/asr_demo.yaml)
learns the reply format and the digit count but not the digits (CER ~0.5). The LLM passes the encoder
no useful gradient until it can align its replies with the tones, and it cannot align them before the
encoder tells the digits apart; meanwhile the encoder drifts towards what the loss does reward (where
the tones are, how many) and even loses the digit identities that its random initialisation still
carries. Freezing the random encoder does not help either. Step-Audio 2 starts from a pre-trained
(Whisper) encoder; the demo does the same in miniature: a linear CTC head over the 10 digits on the
adapter's 12.5 Hz output (the vectors the LLM receives) teaches encoder + adapter per-patch digit
identity in ~200 steps (~20 s on 2 CPU cores, eval CTC CER ~0). The SFT then keeps the encoder frozen,
as Step-Audio 2 does, and mainly has to teach the LLM to read the patches in order.

    python -m data_pipelines.pretrain_audio_encoder demo_out/speech demo_out/encoder \\
        --llm-path demo_out/assets/model [--preset demo-speech] [--steps 200] [--seed 0]

reads ``asr_train.jsonl`` / ``asr_eval.jsonl`` of a corpus written by data_pipelines.speech_corpus and
writes ``audio_encoder.safetensors`` + ``audio_encoder_config.json`` (the format of
``SpeechLMForCausalLM.save_encoder``, which ``model.encoder_path=DIR`` loads next to ``model.llm_path``);
the adapter projects to the hidden size of the LLM at ``--llm-path``. Prints the eval CTC CER.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig

from steptrain.audio.features import log_mel_batch
from steptrain.audio.io import load_audio
from steptrain.eval.asr import error_rates
from steptrain.models.speech import AudioAdapter, AudioEncoderConfig, WhisperStyleEncoder
from steptrain.models.speech.modeling import num_patches_tensor, save_audio_encoder
from steptrain.models.speech.presets import SPEECH_PRESETS

BLANK = 0  # CTC blank; digit d is class d + 1


def read_clips(jsonl: Path, chunk: int = 64) -> tuple[list[torch.Tensor], list[str]]:
    """Log-mel features and digit strings of the ASR rows of ``jsonl``.

    The features equal the SFT front end's per-clip ``log_mel``; batching the STFT is ~4x faster.
    """
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    audios = [load_audio(jsonl.parent / row["audios"][0]) for row in rows]
    feats = []
    for i in range(0, len(audios), chunk):
        batch, lengths = log_mel_batch(audios[i : i + chunk])
        feats += [f[:, :n] for f, n in zip(batch, lengths.tolist(), strict=True)]
    return feats, [row["messages"][-1]["content"].replace(" ", "") for row in rows]


def pad_batch(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad [n_mels, T_i] features to [B, n_mels, T_max]; returns them and the lengths."""
    lengths = torch.tensor([f.shape[-1] for f in feats])
    out = torch.zeros(len(feats), feats[0].shape[0], int(lengths.max()))
    for i, f in enumerate(feats):
        out[i, :, : f.shape[-1]] = f
    return out, lengths


def init_weights(module: nn.Module, std: float) -> None:
    """The speech model's own initialisation (normal(0, std) Linear/Conv1d weights, zero biases)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class CTCFrontEnd(nn.Module):
    """The speech model's encoder + adapter with a linear CTC head (blank + 10 digits) on the
    adapter's 12.5 Hz output, i.e. on exactly the vectors the LLM will receive."""

    def __init__(self, config: AudioEncoderConfig, llm_hidden: int):
        super().__init__()
        self.encoder = WhisperStyleEncoder(config)
        self.adapter = AudioAdapter(config.d_model, config.adapter_hidden, llm_hidden)
        self.head = nn.Linear(llm_hidden, 1 + 10)
        init_weights(self, config.initializer_range)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, enc_lengths = self.encoder(feats, lengths)
        return self.head(self.adapter(hidden, enc_lengths)).log_softmax(-1), num_patches_tensor(lengths)


def ctc_loss(model: CTCFrontEnd, feats: list[torch.Tensor], digits: list[str]) -> torch.Tensor:
    """Mean CTC loss of a batch of clips against their digit strings."""
    log_probs, out_lengths = model(*pad_batch(feats))
    targets = torch.tensor([int(d) + 1 for s in digits for d in s])
    target_lengths = torch.tensor([len(s) for s in digits])
    # zero_infinity: at 12.5 Hz a fast run of repeated digits can leave too few patches to align
    return F.ctc_loss(
        log_probs.transpose(0, 1), targets, out_lengths, target_lengths, blank=BLANK, zero_infinity=True
    )


@torch.no_grad()
def greedy_decode(model: CTCFrontEnd, feats: list[torch.Tensor]) -> list[str]:
    """Best path: argmax per frame, merge repeats, drop blanks."""
    log_probs, out_lengths = model(*pad_batch(feats))
    texts = []
    for path, n in zip(log_probs.argmax(-1), out_lengths, strict=True):
        ids = torch.unique_consecutive(path[:n]).tolist()
        texts.append(" ".join(str(i - 1) for i in ids if i != BLANK))
    return texts


def lr_factor(step: int, steps: int) -> float:
    """Linear warmup over the first 5% of the steps, then cosine decay to 0."""
    warmup = max(1, steps // 20)
    return min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps)))


def train(model: CTCFrontEnd, feats, digits, steps: int, batch_size: int, lr: float, seed: int) -> None:
    """AdamW over ``steps`` batches drawn at random (seeded) from the train clips."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, steps))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(feats), (batch_size,), generator=gen).tolist()
        loss = ctc_loss(model, [feats[i] for i in idx], [digits[i] for i in idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            print(f"step {step}: ctc loss {loss.item():.3f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("corpus", type=Path, help="speech corpus directory (asr_train.jsonl, asr_eval.jsonl)")
    p.add_argument("out", type=Path, help="where to write the encoder (model.encoder_path)")
    p.add_argument("--llm-path", required=True, help="the LLM the adapter will project into")
    p.add_argument("--preset", default="demo-speech", help="speech preset whose encoder sizes to use")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    config = AudioEncoderConfig(**SPEECH_PRESETS[a.preset]["encoder"])
    feats, digits = read_clips(a.corpus / "asr_train.jsonl")
    eval_feats, eval_digits = read_clips(a.corpus / "asr_eval.jsonl")
    print(
        f"features of {len(feats)} + {len(eval_feats)} clips in {time.perf_counter() - t0:.1f}s", flush=True
    )
    llm_hidden = AutoConfig.from_pretrained(a.llm_path).hidden_size
    model = CTCFrontEnd(config, llm_hidden)
    train(model, feats, digits, a.steps, a.batch_size, a.lr, a.seed)
    model.eval()
    cer = error_rates(greedy_decode(model, eval_feats), [" ".join(d) for d in eval_digits])["cer"]
    save_audio_encoder(a.out, model.encoder, model.adapter, llm_hidden)
    print(f"eval CTC CER {cer:.4f}; saved to {a.out} after {time.perf_counter() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
