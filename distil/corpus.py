"""Synthetic speech corpora: sentences spoken by TTS voices, saved as Hugging Face parquet datasets.

Layout (one directory per corpus, one sub-directory per split, a few parquet shards in each)::

    ${paths.corpora}/
      espeak/            train/ validation/ test/   .distil_corpus.json (completion marker)
      flite/             train/ validation/ test/
      longform/          test/                      (1-5 minute recordings)
      espeak_white_snr10/ test/                     (noisy variants, when `noise.snr_db` is set)

    <split>/<split>-00000-of-00003.parquet ...

Load a corpus the standard way; the split names come from the directory names::

    datasets.load_dataset("parquet", data_dir=f"{corpora}/espeak", split="test", streaming=False)

Columns: `audio` (`Audio(sampling_rate=16000, decode=False)`: {bytes: 16-bit FLAC, path: "<id>.flac"};
decode with `distil.data.audio.decode_audio`), `text` (the reference, cased and punctuated, exactly the
sentence that was spoken), `id` (stable and unique, "<corpus>-<split>-<index>"), `speaker`
("<engine>:<voice>") and `duration` (seconds).

Held-out design. The sentence bank is split once, for all corpora together, into disjoint pools
(`sentence_pools` gives the validation and test fractions; the rest is the train pool), so no test
or validation sentence is ever spoken in any train split. Per corpus:
  - train: train pool x train voices;
  - validation: validation pool x train voices (by default), i.e. new text, known voices: it
    measures over-fitting to the training sentences without a voice shift;
  - test: test pool x test voices, which must not overlap the train voices (checked);
  - longform (corpus kind `longform`, split `test`): each recording is one voice reading test-pool
    sentences joined by short pauses, its duration drawn in [min_duration_s, max_duration_s].

Every build is deterministic for a config (same config -> byte-identical parquet) and idempotent:
the marker records a hash of everything that determines the output; a second run with the same
config does nothing, a changed config rebuilds in a temporary directory that replaces the old one
only when complete.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from distil.config.choices import known_choices
from distil.config.schema import validate
from distil.data.synthetic_build import build_all
from distil.utils.errors import one_line_errors
from distil.utils.io import ensure_writable_directory, writable_home
from distil.utils.paths import CONF_DIR
from distil.utils.runinfo import write_run_info

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Noise


# ----------------------------------------------------------------------------------------------
# Sentences and voices


# ----------------------------------------------------------------------------------------------
# Specs and plans


# ----------------------------------------------------------------------------------------------
# Rendering


# ----------------------------------------------------------------------------------------------
# All corpora from a config


# An absolute path: with "../conf" the `distil-corpus` console script fails (Hydra then looks for a
# `conf` Python module because the caller is not a file next to the configs).
def run_command(cfg: DictConfig) -> dict[str, dict[str, str]]:
    """What `distil-corpus` does with its composed config (also `distil.run("corpus", ...)`):
    {"corpora": {name: directory}}."""
    validate(cfg, "corpus")  # every key's type and range, before any model or data loads
    ensure_writable_directory(cfg.out_dir, "out_dir")
    write_run_info(cfg)
    return {"corpora": {name: str(path) for name, path in build_all(cfg).items()}}


@writable_home
@known_choices  # an unknown option of a config group (model=nope): one line before Hydra composes
@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="corpus")
@one_line_errors
def main(cfg: DictConfig) -> None:
    for name, path in run_command(cfg)["corpora"].items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
