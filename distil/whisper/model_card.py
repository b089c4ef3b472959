"""The model card (`README.md`) every exported student carries, as the Hugging Face Hub reads it.

The metadata is built with huggingface_hub's `ModelCardData` / `EvalResult`, so it is validated as the Hub's
own client validates it (offline: `ModelCard.validate` would ask the Hub); the body is plain markdown.

    facts = card_facts(out_dir / "best", run_dir=out_dir)      # what the run's records say (no model loads)
    write_card(out_dir / "best", facts)                        # README.md, written atomically

`card_facts` reads a training run's records (`run_config.json`, `train_summary.json`, `run_info.json`), the
student's `distil_student.json` and `config.json`, and an evaluation summary (`distil_evaluation.json`, written
by the pipeline beside the card: `evaluation_summary`); `build_card` turns those facts into a `ModelCard` and
is pure. A record that is missing leaves its part of the card out (or says it is unknown), never invents it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distil.utils.hub import is_repo_id
from distil.utils.io import read_json, write_atomic, write_json_atomic
from distil.whisper.dimensions import PACKAGED, WHISPER_DIMENSIONS, from_config

CARD_FILE = "README.md"
EVALUATION_FILE = "distil_evaluation.json"  # the pipeline's results for this export, for later cards
TASK = "automatic-speech-recognition"
# The licence of the openai/whisper-* checkpoints on the Hub (their model cards' `license:`).
WHISPER_LICENSE = "apache-2.0"
RUN_CONFIG, TRAIN_SUMMARY, RUN_INFO = "run_config.json", "train_summary.json", "run_info.json"


def is_hub_id(value: Any) -> bool:
    """Whether `value` reads as a Hub repository id (`owner/name` or a legacy `name`), not a local path."""
    if not isinstance(value, str) or not value or value.startswith(("/", ".", "~")):
        return False
    return not Path(value).expanduser().exists() and is_repo_id(value, owner_required=False)


def _json(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def teacher_facts(settings: dict) -> dict[str, Any]:
    """The teacher as its training record names it: a Hub id (and the Whisper licence) where one is known."""
    path, checkpoint = settings.get("teacher.path"), settings.get("teacher.checkpoint")
    hub_id = path if is_hub_id(path) else PACKAGED.get(str(checkpoint)) if checkpoint else None
    return {
        "name": settings.get("teacher.name") or hub_id or path,
        "hub_id": hub_id,
        "license": WHISPER_LICENSE if hub_id in WHISPER_DIMENSIONS else None,
    }


def dataset_facts(settings: dict) -> list[dict[str, Any]]:
    """The training datasets (`data.datasets.<i>.*` of run_config.json), each with its Hub id if it has one."""
    out, i = [], 0
    while f"data.datasets.{i}.name" in settings or f"data.datasets.{i}.path" in settings:
        path = settings.get(f"data.datasets.{i}.path")
        out.append(
            {
                "name": settings.get(f"data.datasets.{i}.name") or path,
                "path": path,
                "config": settings.get(f"data.datasets.{i}.config"),
                "splits": settings.get(f"data.datasets.{i}.splits"),
                "language": settings.get(f"data.datasets.{i}.language"),
                "hub_id": path if is_hub_id(path) else None,
            }
        )
        i += 1
    return out


def student_facts(hf_dir: Path) -> dict[str, Any]:
    """Layers kept (distil_student.json) and parameter count (config.json: distil.whisper.dimensions)."""
    out: dict[str, Any] = {}
    config = _json(hf_dir / "config.json")
    if config and config.get("model_type") == "whisper":
        dims = from_config(config)
        out.update(
            encoder_layers=dims.encoder_layers,
            decoder_layers=dims.decoder_layers,
            parameters=dims.encoder_parameters() + dims.decoder_parameters(),
        )
    info = _json(hf_dir / "distil_student.json") or {}
    for key in ("teacher_encoder_layers", "teacher_decoder_layers", "encoder_layer_map", "decoder_layer_map"):
        if key in info:
            out[key] = info[key]
    return out


def evaluation_summary(evals: dict[str, dict], set_paths: dict[str, Any] | None = None) -> dict[str, Any]:
    """The evaluation results a card shows, from each role's metrics.json (`distil.evaluate`): per set the
    short-form error rate and the long-form WER of each algorithm, the RTFx and the parameter count."""
    set_paths = set_paths or {}
    roles: dict[str, Any] = {}
    for role, metrics in evals.items():
        short = {}
        for name, entry in ((metrics.get("short_form") or {}).get("sets") or {}).items():
            metric = entry.get("metric", "wer")
            if entry.get("status") == "ok" and isinstance(entry.get(metric), int | float):
                short[name] = {"metric": metric, "value": entry[metric], "samples": entry.get("samples")}
        long = {}
        for name, entry in ((metrics.get("long_form") or {}).get("sets") or {}).items():
            algos = {
                a: r["wer"]
                for a, r in entry.items()
                if isinstance(r, dict) and isinstance(r.get("wer"), float)
            }
            if entry.get("status") == "ok" and algos:
                long[name] = algos
        rtfx = ((metrics.get("latency") or {}).get("headline") or {}).get("rtfx", {}).get("value")
        roles[role] = {
            "short_form": short,
            "long_form": long,
            "rtfx": rtfx,
            "parameters": (metrics.get("model") or {}).get("parameters"),
        }
    hub_sets = {name: str(p) for name, p in set_paths.items() if is_hub_id(p)}
    return {"roles": roles, "set_hub_ids": hub_sets}


# What a card says of an export for a runtime (distil-export format=...): its name's suffix, its Hub tags and
# what it is; a format not listed here is named by itself.
EXPORT_CARDS = {
    "ctranslate2": (
        "ct2",
        ["ctranslate2", "faster-whisper"],
        "a CTranslate2 model ({q} weights) for faster-whisper",
    ),
    "onnx": (
        "onnx",
        ["onnx", "transformers.js"],
        "ONNX graphs ({q} weights) for ONNX Runtime and transformers.js",
    ),
}
TRANSFORMERS_JS_DTYPES = {"float32": "fp32", "float16": "fp16", "int8": "int8"}  # its `dtype` option


def _export_card(facts: dict) -> tuple[str, list[str], str]:
    fmt = facts["format"]
    suffix, tags, what = EXPORT_CARDS.get(fmt, (fmt, [fmt], f"a {fmt} export ({{q}} weights)"))
    return suffix, tags, what.format(q=facts["quantization"])


def card_facts(
    model_dir: str | Path,
    *,
    run_dir: str | Path | None = None,
    source_dir: str | Path | None = None,
    quantization: str | None = None,
    export_format: str = "ctranslate2",
    evaluation: dict | None = None,
    command: str | None = None,
    runtimes: list[str] | None = None,
    export_command: str | None = None,
) -> dict[str, Any]:
    """Everything the card of `model_dir` says, from the records on disk (nothing loads a model).

    `source_dir`: the Hugging Face directory an export (`quantization` set, of `export_format`) was made from
    (default: `model_dir`); `run_dir`: the training run that made it (default: the source's parent, if it is a run);
    `evaluation`: an `evaluation_summary` (default: the source's distil_evaluation.json); `command`: the
    command that made it (default: the one train_summary.json records); `runtimes`: the other exports made
    of it (e.g. `best-ct2-int8`), for the card's loading section; `export_command`: the `distil-export`
    command line, for an export made after training."""
    model_dir = Path(model_dir)
    source = Path(source_dir) if source_dir else model_dir
    if run_dir is None and (source.parent / TRAIN_SUMMARY).is_file():
        run_dir = source.parent
    run = Path(run_dir) if run_dir else None
    settings = (_json(run / RUN_CONFIG) if run else None) or {}
    summary = (_json(run / TRAIN_SUMMARY) if run else None) or {}
    if evaluation is None:
        evaluation = _json(source / EVALUATION_FILE)
    datasets = dataset_facts(settings)
    languages = sorted({d["language"] for d in datasets if d.get("language")})
    if not languages and settings.get("teacher.language"):
        languages = [settings["teacher.language"]]
    return {
        "export": source.name,
        "format": export_format if quantization else "transformers",
        "quantization": quantization,
        "teacher": teacher_facts(settings) if settings else _recorded_teacher(source),
        "student": student_facts(source),
        "student_name": settings.get("student.name"),
        "languages": languages,
        "datasets": datasets,
        "settings": settings,
        "training": {
            k: summary.get(k)
            for k in (
                "global_step",
                "train_seconds",
                "effective_batch_size",
                "processes",
                "best_val_wer_weighted",
            )
        }
        if summary
        else None,
        "data_filter": summary.get("data_filter"),
        "command": command or summary.get("command"),
        "git_revision": ((_json(run / RUN_INFO) if run else None) or {}).get("git_revision"),
        "evaluation": evaluation,
        "runtimes": list(runtimes or []),
        "export_command": export_command,
    }


def _recorded_teacher(student_dir: Path) -> dict[str, Any]:
    """Without the run's records: the teacher directory distil_student.json names (no Hub id is guessed)."""
    teacher = (_json(student_dir / "distil_student.json") or {}).get("teacher")
    return {"name": Path(teacher).name if teacher else None, "hub_id": None, "license": None}


def _model_name(facts: dict) -> str:
    teacher = facts["teacher"]["name"] or "whisper"
    layers = facts["student"].get("decoder_layers")
    name = f"distil-{Path(str(teacher)).name}" + (f"-{layers}dec" if layers else "")
    return name + (f"-{_export_card(facts)[0]}-{facts['quantization']}" if facts["quantization"] else "")


def _role(facts: dict) -> str:
    """The evaluation role of this export: the float student, or the student as its runtime runs it."""
    return f"student-{_export_card(facts)[0]}-{facts['quantization']}" if facts["quantization"] else "student"


def eval_results(facts: dict) -> list:
    """The model-index entries: this export's short-form error rate and long-form WER per evaluation set."""
    from huggingface_hub import EvalResult

    evaluation = facts.get("evaluation") or {}
    results = (evaluation.get("roles") or {}).get(_role(facts)) or {}
    hub_ids = evaluation.get("set_hub_ids") or {}
    out = []
    for name, r in sorted(results.get("short_form", {}).items()):
        out.append(
            EvalResult(
                task_type=TASK,
                dataset_type=hub_ids.get(name, name),
                dataset_name=f"{name} (short-form)",
                metric_type=r["metric"],
                metric_value=round(float(r["value"]), 2),
                metric_name=f"short-form {r['metric'].upper()} %",
            )
        )
    for name, algos in sorted(results.get("long_form", {}).items()):
        for algorithm, wer in sorted(algos.items()):
            out.append(
                EvalResult(
                    task_type=TASK,
                    dataset_type=hub_ids.get(name, name),
                    dataset_name=f"{name} (long-form)",  # one dataset entry, a metric per algorithm
                    metric_type="wer",
                    metric_value=round(float(wer), 2),
                    metric_name=f"long-form WER % ({algorithm})",
                )
            )
    return out


def build_card(facts: dict[str, Any]):
    """The `huggingface_hub.ModelCard` of an export, from `card_facts` (pure: reads and writes nothing)."""
    from huggingface_hub import ModelCard, ModelCardData

    teacher = facts["teacher"]
    hub_datasets = [d["hub_id"] for d in facts["datasets"] if d["hub_id"]]
    results = eval_results(facts)
    data = ModelCardData(
        model_name=_model_name(facts),
        base_model=teacher["hub_id"],
        language=facts["languages"] or None,
        license=teacher["license"],
        library_name=facts["format"],
        pipeline_tag=TASK,
        datasets=hub_datasets or None,
        tags=["distil-whisper", "whisper", "knowledge-distillation", "distil"]
        + ([*_export_card(facts)[1], facts["quantization"]] if facts["quantization"] else []),
        metrics=["wer"] if results else None,
        eval_results=results or None,
    )
    body = "\n".join(_body(facts, data.model_name))
    # ModelCard parses the YAML header back into ModelCardData: a model-index it cannot read raises here.
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def write_card(model_dir: str | Path, facts: dict[str, Any]) -> Path:
    """`<model_dir>/README.md` from `facts` (atomically; an older card is replaced), and the evaluation
    summary beside it so later exports of this directory carry the results."""
    model_dir = Path(model_dir)
    card = build_card(facts)
    write_atomic(model_dir / CARD_FILE, str(card))
    if facts.get("evaluation") and not facts["quantization"]:
        write_json_atomic(model_dir / EVALUATION_FILE, facts["evaluation"])
    return model_dir / CARD_FILE


# ---------------------------------------------------------------------------------------------- the body


def _millions(n: Any) -> str:
    return f"{n / 1e6:.1f} M" if isinstance(n, int | float) else "unknown"


def _layers(n: int) -> str:
    return f"{n} layer" + ("" if n == 1 else "s")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _num(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, int | float) else "-"


def _body(facts: dict, name: str) -> list[str]:
    teacher = facts["teacher"]
    teacher_ref = (
        f"[{teacher['hub_id']}](https://huggingface.co/{teacher['hub_id']})"
        if teacher["hub_id"]
        else (f"`{teacher['name']}` (a local model)")
    )
    fmt = (
        _export_card(facts)[2] if facts["quantization"] else "a Hugging Face transformers model (safetensors)"
    )
    lines = [
        f"# {name}",
        "",
        f"A Whisper student distilled from {teacher_ref} with "
        "distil (knowledge distillation: the teacher labels the audio, the student "
        f"keeps the teacher's encoder and a few of its decoder layers). This export is {fmt}.",
        "",
        "## Model",
        "",
        *_model_lines(facts),
        "",
        "## Evaluation",
        "",
        *_evaluation_lines(facts),
        "",
        "## Training",
        "",
        *_training_lines(facts),
        "",
        "## Limits",
        "",
        *_limit_lines(facts),
        "",
        "## How to use",
        "",
        *_usage_lines(facts),
    ]
    if teacher["license"] is None:
        lines += ["", "## Licence", "", "The teacher's licence applies; distil does not know it: check it."]
    return lines


def _model_lines(facts: dict) -> list[str]:
    s = facts["student"]
    lines = []
    if "encoder_layers" in s:
        enc_of = f" of the teacher's {s['teacher_encoder_layers']}" if "teacher_encoder_layers" in s else ""
        dec_of = f" of the teacher's {s['teacher_decoder_layers']}" if "teacher_decoder_layers" in s else ""
        maps = s.get("decoder_layer_map")
        lines += [
            f"- encoder: {_layers(s['encoder_layers'])}{enc_of}",
            f"- decoder: {_layers(s['decoder_layers'])}{dec_of}"
            + (f" (initialised from teacher layers {maps})" if maps else ""),
            f"- parameters: {_millions(s.get('parameters'))}",
        ]
    roles = (facts.get("evaluation") or {}).get("roles") or {}
    own, teacher = roles.get(_role(facts)) or {}, roles.get("teacher") or {}
    if own.get("rtfx") and teacher.get("rtfx"):
        lines.append(
            f"- speed: {own['rtfx'] / teacher['rtfx']:.2f}x the teacher's throughput (RTFx {own['rtfx']:.1f} "
            f"against {teacher['rtfx']:.1f}, measured by the run's evaluation on the same machine)"
        )
    else:
        lines.append("- speed-up over the teacher: not measured for this export")
    return lines or ["- (the student's records were not found)"]


def _evaluation_lines(facts: dict) -> list[str]:
    roles = (facts.get("evaluation") or {}).get("roles") or {}
    own, teacher = roles.get(_role(facts)), roles.get("teacher") or {}
    if not own:
        return ["Not evaluated: distil's pipeline writes the results here once it has evaluated this export."]
    rows = ["| set | metric | this model | teacher |", "| --- | --- | --- | --- |"]
    for name, r in sorted(own["short_form"].items()):
        t = teacher.get("short_form", {}).get(name, {}).get("value")
        rows.append(f"| {name} | short-form {r['metric'].upper()} % | {_num(r['value'])} | {_num(t)} |")
    for name, algos in sorted(own["long_form"].items()):
        for algorithm, wer in sorted(algos.items()):
            t = teacher.get("long_form", {}).get(name, {}).get(algorithm)
            rows.append(f"| {name} | long-form WER % ({algorithm}) | {_num(wer)} | {_num(t)} |")
    return [
        "Error rates in percent (lower is better), the teacher evaluated alike beside the student:",
        "",
        *rows,
    ]


def _training_lines(facts: dict) -> list[str]:
    settings, training = facts["settings"], facts["training"]
    lines = [] if settings or training else ["The training run's records were not found beside this export."]
    if settings:
        loss = {k[5:]: v for k, v in settings.items() if k.startswith("loss.") and "." not in k[5:]}
        weights = ", ".join(f"{k} {v}" for k, v in sorted(loss.items()) if k not in ("name", "labels"))
        optimizer = str(settings.get("module.optimizer._target_", "AdamW")).rsplit(".", 1)[-1]
        lines.append(
            f"- recipe: loss `{loss.get('name')}` on {loss.get('labels')} labels ({weights}); {optimizer} "
            f"lr {settings.get('optim.lr')}, {settings.get('optim.schedule', 'constant')} schedule after "
            f"{settings.get('optim.warmup_steps')} warm-up steps; seed {settings.get('seed')}"
        )
    if training:
        seconds, best = training.get("train_seconds"), training.get("best_val_wer_weighted")
        line = f"- {training.get('global_step')} optimiser steps, effective batch {training.get('effective_batch_size')}"
        if isinstance(seconds, int | float):
            line += f", {_duration(seconds)} of training in its last invocation"
        if isinstance(best, int | float):
            line += f"; best validation WER {best:.2f} %"
        lines.append(line)
    for d in facts["datasets"]:
        where = (
            f"[{d['hub_id']}](https://huggingface.co/datasets/{d['hub_id']})"
            if d["hub_id"]
            else "a local corpus"
        )
        lines.append(
            f"- data: `{d['name']}` ({where}, splits {d.get('splits')}, language {d.get('language')})"
        )
    for source, f in sorted((facts.get("data_filter") or {}).items()):
        dropped = ", ".join(f"{k} {v}" for k, v in sorted((f.get("dropped") or {}).items())) or "none dropped"
        lines.append(
            f"- kept after the filters: {source} {f.get('kept')} of {f.get('total')} samples ({dropped})"
        )
    if facts.get("command"):
        lines += ["", "Trained by:", "", "```bash", facts["command"], "```"]
    if facts.get("export_command"):
        lines += ["", "Exported by:", "", "```bash", facts["export_command"], "```"]
    if facts.get("git_revision"):
        lines += ["", f"distil revision `{facts['git_revision']}`."]
    if settings:
        lines += [
            "",
            "<details><summary>Every training setting (run_config.json)</summary>",
            "",
            "```json",
            json.dumps(settings, indent=1, sort_keys=True),
            "```",
            "",
            "</details>",
        ]
    return lines


def _limit_lines(facts: dict) -> list[str]:
    roles = (facts.get("evaluation") or {}).get("roles") or {}
    own = roles.get(_role(facts))
    languages = ", ".join(facts["languages"]) or "unknown"
    lines = [
        f"- trained on {len(facts['datasets'])} dataset(s), language(s) {languages}: other languages, "
        "domains and recording conditions were not trained on"
    ]
    if own:
        sets = sorted(own["short_form"]) + [f"{s} (long-form)" for s in sorted(own["long_form"])]
        lines.append(
            f"- evaluated only on: {', '.join(sets) or 'no set with references'}; nothing else was measured"
        )
    else:
        lines.append("- this export was not evaluated")
    if facts["quantization"]:
        lines.append(
            f"- {facts['quantization']} weights: results of the float model do not carry over exactly"
        )
    lines.append("- no evaluation of bias, fairness or safety was made")
    return lines


def _usage_lines(facts: dict) -> list[str]:
    if facts["format"] == "onnx":
        return [
            "With [optimum](https://github.com/huggingface/optimum-onnx) (ONNX Runtime):",
            "",
            "```python",
            "from optimum.onnxruntime import ORTModelForSpeechSeq2Seq",
            "from transformers import WhisperProcessor",
            "",
            'processor = WhisperProcessor.from_pretrained("<this directory or repo id>")',
            'model = ORTModelForSpeechSeq2Seq.from_pretrained("<this directory or repo id>")',
            "# audio: 16 kHz mono float samples",
            'features = processor(audio, sampling_rate=16000, return_tensors="pt").input_features',
            "print(processor.batch_decode(model.generate(features), skip_special_tokens=True)[0])",
            "```",
            "",
            "With [transformers.js](https://github.com/huggingface/transformers.js):",
            "",
            "```js",
            'import { pipeline } from "@huggingface/transformers";',
            "",
            'const asr = await pipeline("automatic-speech-recognition", "<repo id>", '
            f'{{ dtype: "{TRANSFORMERS_JS_DTYPES.get(facts["quantization"], facts["quantization"])}" }});',
            'console.log((await asr("audio.wav")).text);',
            "```",
        ]
    if facts["format"] == "ctranslate2" and facts["quantization"]:
        return [
            "With [faster-whisper](https://github.com/SYSTRAN/faster-whisper) (CTranslate2):",
            "",
            "```python",
            "from faster_whisper import WhisperModel",
            "",
            f'model = WhisperModel("<this directory or repo id>", compute_type="{facts["quantization"]}")',
            'segments, info = model.transcribe("audio.wav")',
            'print(" ".join(s.text for s in segments))',
            "```",
        ]
    lines = [
        "With transformers:",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        'asr = pipeline("automatic-speech-recognition", model="<this directory or repo id>")',
        'print(asr("audio.wav")["text"])',
        "```",
    ]
    ct2 = [r for r in facts["runtimes"] if "ct2" in r]
    lines += [
        "",
        "For faster-whisper, "
        + (f"this run also exported {', '.join(f'`{r}`' for r in ct2)} (CTranslate2); or " if ct2 else "")
        + "export it with `distil-export model=path model.path=<this directory> quantization=int8`.",
    ]
    return lines


def write_run_cards(
    run_dir: str | Path,
    exports: dict[str, str],
    command: str | None = None,
    evaluation: dict | None = None,
    evaluated: str | None = None,
) -> list[Path]:
    """The card of each of a training run's exports (`train_summary.json` "exports": `best`, `last`,
    `best-ct2-int8`, ...); `evaluation` (an `evaluation_summary`) goes on the cards of the `evaluated` export and
    of its CTranslate2 exports only: the other exports' weights were not evaluated."""
    cards = []
    for name, path in exports.items():
        base, _, quantization = name.partition("-ct2-")
        source = Path(run_dir) / base if quantization else Path(path)
        facts = card_facts(
            path,
            run_dir=run_dir,
            source_dir=source,
            quantization=quantization or None,
            evaluation=evaluation if base == evaluated else {},  # {}: none (not an older file's)
            command=command,
            runtimes=[other for other in exports if other.startswith(f"{name}-ct2-")],
        )
        cards.append(write_card(path, facts))
    return cards
