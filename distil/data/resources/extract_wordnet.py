"""Write `wordnet_examples.txt`: the usage examples of WordNet 3.0 as spoken sentences.

WordNet's glosses carry about 48,000 usage examples in double quotes, written by its lexicographers or
quoted from many authors: natural, varied, present-day English across every domain WordNet covers (with
names, numbers and abbreviations). They are the bulk of the synthetic corpora's sentence bank; the
normaliser-exercising bank (`sentences.txt`) is the rest. Licence: the WordNet 3.0 licence (permissive:
use, copy, modify and distribute with its notice), in `wordnet_LICENSE.txt` beside this file.

Source: Debian's `wordnet-base` package (`apt-get install wordnet-base`), files /usr/share/wordnet/data.*.
Deterministic: `python distil/data/resources/extract_wordnet.py [/usr/share/wordnet]` rewrites the same
file byte for byte.

Kept: examples of 5-30 words made only of letters, digits and plain punctuation. Left out: fragments
shorter than 5 words (mostly noun phrases), elisions ("...") and parentheses (not spoken), and "$", "&",
"/" (TTS engines read them in ways the text does not say). A kept example gets a capital first letter and a
final full stop when it has no final punctuation, as a transcript would.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPEAKABLE = re.compile(r"[A-Za-z0-9 ,.;:'?!\-%]+")


def examples(wordnet_dir: Path) -> list[str]:
    found: list[str] = []
    for name in ("data.adj", "data.adv", "data.noun", "data.verb"):
        for line in (wordnet_dir / name).read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:  # the licence header, or no gloss
                continue
            found += re.findall(r'"([^"]+)"', line.split("|", 1)[1])
    return found


def as_sentence(example: str) -> str | None:
    text = " ".join(example.replace("--", ", ").split()).strip(" ,;:")
    if not SPEAKABLE.fullmatch(text) or "..." in text or not 5 <= len(text.split()) <= 30:
        return None
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".?!" else text + "."


def main(wordnet_dir: str = "/usr/share/wordnet") -> None:
    sentences = (as_sentence(e) for e in examples(Path(wordnet_dir)))
    unique = dict.fromkeys(s for s in sentences if s)  # first occurrence wins, file order kept
    out = HERE / "wordnet_examples.txt"
    out.write_text("".join(s + "\n" for s in unique), encoding="utf-8")
    print(f"wrote {len(unique)} sentences to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
