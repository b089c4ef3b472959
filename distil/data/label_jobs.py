"""What labelling jobs do on the pseudo-label store (distil.data.label_store) beyond writing shards: claim
shards and the finalise lock (owner files: pid, host), finalise a split (prompts, unique ids, skipped list,
metadata, summary, `_SUCCESS` last), merge what the jobs of an array wrote (`merge=true`), and say where a
split stands (a dry run, a job that ends before the split is complete).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig

from distil.data.entries import DatasetEntry, dataset_entries
from distil.data.label_plan import job_owns
from distil.data.label_store import (
    LABEL_COLUMNS,
    LABELS_METADATA,
    PROGRESS,
    SUCCESS,
    LabellingStateError,
    build_prompt,
    complete_shards,
    normalizer_for,
    shard_manifest,
    shard_name,
    shard_problems,
    source_record,
    split_dir,
    total_shards,
)
from distil.data.text import corpus_wer, identity
from distil.utils.errors import InputError
from distil.utils.io import atomic_file, live_owner, read_json, take_lock, write_atomic, write_json_atomic

FINALISE_LOCK = "finalise.lock"


def finalise_owner(out_dir: Path) -> dict | None:
    """The live process finalising `out_dir`, or None."""
    return live_owner(out_dir / PROGRESS / FINALISE_LOCK)


def claim_shard(progress_dir: Path, k: int) -> bool:
    """Claim shard `k` for this process, so concurrent runs on one output split the pending shards instead of
    labelling each one twice. False when it is complete or a live process holds it."""
    manifest = progress_dir / f"{shard_name(k)}.json"
    if manifest.exists():
        return False
    claim = progress_dir / f"{shard_name(k)}.claim"
    if not take_lock(claim):
        return False
    if manifest.exists():  # finished by another run between the two checks
        claim.unlink(missing_ok=True)
        return False
    return True


def live_claims(out_dir: Path) -> list[int]:
    """Shards a live process (another run) is labelling now."""
    return sorted(
        int(c.stem.split("-")[1])
        for c in (out_dir / PROGRESS).glob("part-*.claim")
        if live_owner(c) is not None
    )


def shard_files(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("part-*.parquet"))


def fill_prompts(out_dir: Path) -> None:
    """Packing: each unit that continues its predecessor gets `<|startofprev|>` + the predecessor's label. A unit
    planned to continue one that has no row (all its clips failed to decode) continues nothing: its
    `pl_continues` is cleared, so the stored flag always means "the previous row is this one's past"."""
    previous: tuple[int, str] | None = None  # (pl_index, pseudo_label) of the last row seen
    for path in shard_files(out_dir):
        table = pq.read_table(path)
        metadata = table.schema.metadata
        idx = table.column("pl_index").to_pylist()
        labels = table.column("pseudo_label").to_pylist()
        planned = table.column("pl_continues").to_pylist()
        prompts, continues = [], []
        for i, label, cont in zip(idx, labels, planned, strict=True):
            ok = cont and previous is not None and previous[0] == i - 1
            prompts.append(build_prompt(previous[1]) if ok else None)
            continues.append(bool(ok))
            previous = (i, label)
        for name, values, kind in (("prompt", prompts, pa.string()), ("pl_continues", continues, pa.bool_())):
            table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, kind))
        with atomic_file(path) as tmp:
            pq.write_table(table.replace_schema_metadata(metadata), tmp)


def summarise(out_dir: Path, entry: DatasetEntry, language: str | None) -> dict:
    """Split summary from the finished files: WER over every labelled sample, counts, audio hours."""
    manifests = [read_json(p) for p in sorted((out_dir / PROGRESS).glob("part-*.json"))]
    extent = read_json(out_dir / PROGRESS / "extent.json")
    skipped = extent["planning_skipped"] + [s for m in manifests for s in m["skipped"]]
    refs, hyps = [], []
    for path in shard_files(out_dir):
        cols = ["pseudo_label"] + ([entry.text_column] if entry.text_column else [])
        cols += ["language"] if "language" in pq.read_schema(path).names else []
        table = pq.read_table(path, columns=cols).to_pydict()
        langs = table.get("language") or [None] * len(table["pseudo_label"])
        if entry.text_column:
            for ref, hyp, lang in zip(table[entry.text_column], table["pseudo_label"], langs, strict=True):
                if ref is None:
                    continue
                norm = normalizer_for(lang or language)
                refs.append(norm(ref))
                hyps.append(norm(hyp or ""))
    wer = corpus_wer(refs, hyps, identity) if refs else None
    reasons: dict[str, int] = {}
    for s in skipped:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    audio_seconds = sum(m["audio_seconds"] for m in manifests)
    return {
        "samples": sum(m["labelled"] for m in manifests),
        "clips": sum(m["clips"] for m in manifests),
        "skipped": len(skipped),
        "skipped_by_reason": reasons,
        "truncated_at_max_new_tokens": sum(m["truncated"] for m in manifests),
        "audio_hours": audio_seconds / 3600,
        "wer": None if wer is None else wer.wer,
        "wer_detail": None if wer is None else wer.to_dict(),
    }


def check_unique_ids(out_dir: Path, entry: DatasetEntry) -> None:
    """Every clip labelled once: a split with a duplicated id is never marked complete."""
    seen: set = set()
    duplicates: list = []
    for path in shard_files(out_dir):
        names = pq.read_schema(path).names
        column = entry.id_column or ("pl_id" if "pl_id" in names else "id")  # see id_output_column
        for value in pq.read_table(path, columns=[column]).column(0).to_pylist():
            if value in seen:
                duplicates.append(value)
            seen.add(value)
    if duplicates:
        raise LabellingStateError(
            f"{out_dir}: {len(duplicates)} ids are labelled twice (e.g. {duplicates[:3]}), so the shards do not "
            "come from one version of the input; it is not marked complete. Delete the directory to relabel."
        )


class NothingLabelledError(InputError):
    """Every clip of a split was skipped: an empty split is never marked complete."""


def check_shards_written(out_dir: Path, manifests: list[dict]) -> None:
    """The shard files on disk are the ones the shard manifests in `_progress` say were written, with their
    rows: a shard file lost (or added) after it was written is not finalised into a complete-looking split."""
    expected = {m["file"]: {"rows": m["labelled"]} for m in manifests if m["file"]}
    if problems := shard_problems(out_dir, expected):
        raise LabellingStateError(
            f"{out_dir}: the shard files differ from what labelling wrote ({'; '.join(problems)}), so it is not "
            "marked complete; delete the directory and rerun `python -m distil.pseudo_label` to relabel"
        )


def check_not_empty(out_dir: Path, entry: DatasetEntry, manifests: list[dict], skipped: list[dict]) -> None:
    """A split with 0 labelled rows would train on nothing while looking complete: refuse it."""
    if sum(m["labelled"] for m in manifests) > 0:
        return
    reasons = sorted({s["reason"] for s in skipped})
    raise NothingLabelledError(
        f"{entry.name}/{out_dir.name}: no clip was labelled ({len(skipped)} skipped"
        f"{': ' + ', '.join(reasons) if reasons else ''}; each listed with its reason in "
        f"{out_dir / 'skipped.jsonl'}), so the split is not marked complete; fix or replace its audio (or "
        f"leave the split out of {entry.key}.splits) and rerun"
    )


def finalise(
    out_dir: Path, entry: DatasetEntry, language: str | None, packing: bool, labels_meta: dict
) -> dict:
    """Turn complete shards into the finished dataset; `_SUCCESS` is written last. Refused (nothing marked
    complete) when ids repeat, shard files differ from the manifests, or no clip was labelled."""
    check_unique_ids(out_dir, entry)
    extent = read_json(out_dir / PROGRESS / "extent.json")
    manifests = [read_json(p) for p in sorted((out_dir / PROGRESS).glob("part-*.json"))]
    check_shards_written(out_dir, manifests)
    skipped = extent["planning_skipped"] + [s for m in manifests for s in m["skipped"]]
    skipped.sort(key=lambda s: s["indices"][0])
    write_atomic(out_dir / "skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skipped))
    check_not_empty(out_dir, entry, manifests, skipped)
    if packing:
        fill_prompts(out_dir)
    summary = summarise(out_dir, entry, language)
    # The shard manifest and the source's files: training refuses labels whose shards or source differ.
    labels_meta = {
        **labels_meta,
        "shards": shard_manifest(shard_files(out_dir)),
        "source": source_record(str(entry.path), out_dir.name),
    }
    write_json_atomic(out_dir / LABELS_METADATA, {**labels_meta, "summary": summary})
    write_json_atomic(out_dir / "summary.json", summary)
    write_atomic(out_dir / SUCCESS, "")  # like every other file: a kill leaves it absent or whole
    return summary


def try_finalise(out_dir: Path, entry, language, packing, labels_meta) -> dict | None:
    """Finalise if every shard is complete and no live process is doing it; None otherwise.

    The lock records its owner (pid, host); a lock left by a killed run is taken over at once."""
    n = total_shards(out_dir)
    if n is None or complete_shards(out_dir) < set(range(n)):
        return None
    lock = out_dir / PROGRESS / FINALISE_LOCK
    if not take_lock(lock):
        return None
    try:
        return finalise(out_dir, entry, language, packing, labels_meta)
    finally:
        lock.unlink(missing_ok=True)


class LabellingIncompleteError(InputError):
    """`merge=true` on splits whose shards are not all labelled yet."""


def merge(cfg: DictConfig) -> dict:
    """`merge=true`: finalise every split whose shards are all written (e.g. by the jobs of a SLURM array whose
    last job died before merging), without loading the teacher or the audio; the settings are the ones the
    jobs recorded in `_progress/plan.json`. Splits that are already complete are left as they are. Raises
    `LabellingIncompleteError` naming the missing shards of every split that is not ready."""
    results: dict[str, dict] = {}
    not_ready: list[str] = []
    for entry in dataset_entries(cfg.data.datasets):
        for split in entry.splits:
            name, out_dir = entry.source(split), split_dir(cfg.out_dir, entry.name, split)
            plan_path = out_dir / PROGRESS / "plan.json"
            if (out_dir / SUCCESS).exists():
                results[name] = {**read_json(out_dir / "summary.json"), "status": "complete", "merged": False}
                continue
            if not plan_path.exists():
                not_ready.append(f"{name}: nothing labelled yet in {out_dir}")
                continue
            n = total_shards(out_dir)
            if n is None:
                not_ready.append(
                    f"{name}: the number of shards is not known yet (no job reached the end of the stream)"
                )
                continue
            missing = sorted(set(range(n)) - complete_shards(out_dir))
            if missing:
                shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
                claimed = live_claims(out_dir)
                busy = f"; being labelled now: {claimed}" if claimed else ""
                not_ready.append(f"{name}: {len(missing)} of {n} shards missing ({shown}){busy}")
                continue
            plan = read_json(plan_path)
            labels_meta = {**plan, "columns_added": list(LABEL_COLUMNS)}
            language = entry.language or cfg.generation.language
            summary = try_finalise(out_dir, entry, language, plan.get("packing") is not None, labels_meta)
            if summary is None:  # another process holds the finalise lock
                owner = finalise_owner(out_dir) or {}
                not_ready.append(f"{name}: being merged by pid {owner.get('pid')} on {owner.get('host')}")
                continue
            print(f"{name}: merged {n} shards, {summary['samples']} samples into {out_dir}")
            results[name] = {**summary, "status": "complete", "merged": True}
    if not_ready:
        raise LabellingIncompleteError(
            "cannot merge: "
            + "; ".join(not_ready)
            + ". Shard k belongs to the job with shard.index = k mod shard.count: rerun those jobs (or this "
            "command without shard.* and merge, which labels what is missing and merges)"
        )
    return {"splits": results}


def split_states(cfg: DictConfig) -> dict:
    """Where each configured split stands on disk and this job's share of its shards (for a dry run)."""
    index, count = int(cfg.shard.index), int(cfg.shard.count)
    splits = {}
    for entry in dataset_entries(cfg.data.datasets):
        for split in entry.splits:
            out_dir = split_dir(cfg.out_dir, entry.name, split)
            n, done = total_shards(out_dir), complete_shards(out_dir)
            if (out_dir / SUCCESS).exists():
                state = "complete"
            elif n is None:
                state = f"{len(done)} shards done, total not known until the data is read"
            else:
                mine = [k for k in range(n) if job_owns(k, index, count) and k not in done]
                state = f"{len(done)} of {n} shards done; this job labels {len(mine)}: {mine[:20]}"
            splits[entry.source(split)] = {
                "input": str(entry.path),
                "output": str(out_dir),
                "state": state,
            }
    return splits


def incomplete_state(out_dir: Path) -> tuple[list[int] | None, str]:
    """(missing shards, why) of a split this job left incomplete: another process finalising it, other live
    runs labelling its shards, or shards that other jobs own."""
    n = total_shards(out_dir)
    missing = None if n is None else sorted(set(range(n)) - complete_shards(out_dir))
    owner = finalise_owner(out_dir)
    if owner is not None:
        return missing, (
            f"another process (pid {owner.get('pid')} on {owner.get('host')}) has been finalising "
            f"{out_dir} for {owner['age_s']:.0f} s (lock {owner['lock']}); it writes {SUCCESS} when done"
        )
    if claimed := live_claims(out_dir):
        return missing, (
            f"shards {claimed} are being labelled by another live run on this output; it (or the last "
            "run to finish) merges them"
        )
    return missing, (
        f"{'some' if missing is None else len(missing)} shards still missing {missing or ''}: other "
        f"jobs (shard.index/shard.count) own them; run those jobs, or this command without "
        "shard.* overrides, to label them and merge"
    )
