"""Rows on disk -> encoded SFT examples, with counts of everything that was cut or left out."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from steptrain.data.audio_spans import AudioSpec, ReplyAudioSpec, audio_in_last_turn_only, audio_spans_for
from steptrain.data.encode import IGNORE_INDEX, Encoded, fit_length, tokenize_with_audio
from steptrain.data.errors import DataError
from steptrain.data.reader import read_rows, row_messages
from steptrain.data.run_inputs import RunInputs
from steptrain.data.templates import NOT_PREFIX_STABLE


@dataclass
class SFTData:
    examples: list[Encoded]
    # rows (valid rows read), skipped (by reason, reader and template), truncated (kept, cut to max_length),
    # dropped_too_long (truncation=drop), dropped_no_labels, tokens and label_tokens (of the kept examples)
    stats: dict = field(default_factory=dict)


def encode_row(
    row: dict, template, tokenizer, data_cfg, audio: AudioSpec | None = None, reply: ReplyAudioSpec | None = None,
    loss_on: str | None = None,
) -> tuple[Encoded | None, bool]:
    """(the encoded row or None when it is dropped, whether it was longer than data.max_length).

    Raises DataError (without location) for a row that cannot be rendered or whose audio is bad.
    """
    source = row.get("_source", "row")
    messages = row_messages(row)
    if data_cfg.audio_last_turn_only:
        row, messages = audio_in_last_turn_only(row, messages)
    segments = template.segments(messages, loss_on=loss_on or data_cfg.loss_on)
    clips = audio_spans_for(row, messages, source, audio, reply)
    input_ids, labels, clip_list, spans = tokenize_with_audio(segments, tokenizer, clips, reply)
    example = fit_length(
        input_ids, labels, max_length=data_cfg.max_length, truncation=data_cfg.truncation, source=source,
        clips=clip_list, spans=spans,
    )
    return example, len(input_ids) > data_cfg.max_length


def load_sft_data(files: list[str] | list[dict], tokenizer, data_cfg, inputs: RunInputs) -> SFTData:
    """Read, render (``inputs.template``) and tokenize `files` as configured by `data_cfg` (a DataConfig);
    logs nothing.

    With ``inputs.audio`` (speech models), ``<audio>`` tags become placeholder spans and the clips are kept
    on each example for ``collate``; without it, a row with audio input is a bad row. With ``inputs.reply``,
    ``<audio>`` in assistant turns becomes trained discrete audio tokens (TTS, spoken replies).

    `files` may instead hold rows already returned by `read_rows` (e.g. what is left after holding out
    an eval split); their reader-stage skips are then the caller's to count.

    A row the chat template cannot render is a bad row like any other (fatal, or skipped and counted
    under ``on_error=skip``), except a template that is not prefix-stable: that is a configuration
    problem, so it always stops.
    """
    if files and isinstance(files[0], dict):
        rows, skipped = list(files), Counter()
    else:
        rows, read_skipped = read_rows(list(files), on_error=data_cfg.on_error)
        skipped = Counter(read_skipped)
    examples: list[Encoded] = []
    stats = Counter()
    for n, row in enumerate(rows, 1):
        if "_source" not in row:
            row = {**row, "_source": f"row {n}"}
        try:
            example, too_long = encode_row(row, inputs.template, tokenizer, data_cfg, inputs.audio, inputs.reply)
        except DataError as e:
            if data_cfg.on_error == "error" or e.reason == NOT_PREFIX_STABLE:
                raise e.at(row["_source"]) from None
            skipped[e.reason] += 1
            continue
        if example is None:
            stats[
                "dropped_too_long" if too_long and data_cfg.truncation == "drop" else "dropped_no_labels"
            ] += 1
            continue
        stats["truncated"] += too_long
        stats["tokens"] += len(example.input_ids)
        stats["label_tokens"] += sum(label != IGNORE_INDEX for label in example.labels)
        examples.append(example)
    stats["audio_clips"] = sum(len(e.audio) for e in examples)
    keys = ("audio_clips", "truncated", "dropped_too_long", "dropped_no_labels", "tokens", "label_tokens")
    return SFTData(examples, {"rows": len(rows), "skipped": dict(skipped), **{k: stats[k] for k in keys}})

