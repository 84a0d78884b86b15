"""CoNLL BIO files with ``IMGID:`` headers (Twitter-2015/2017 and GMNER), and BIO → spans."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from mie.shards.sources import Reject

_TAG = re.compile(r"^(O|[BI]-[A-Za-z_]+)$")


def read_conll(path: Path) -> Iterator[tuple[str, str, list[str], list[str]] | Reject]:
    """Yield ``(imgid, where, tokens, tags)`` per tweet, or a Reject for a malformed one.

    A tweet starts at an ``IMGID:`` line and runs to the next blank line or ``IMGID:`` line."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        where = f"{path}:{i + 1}"
        if not line.startswith("IMGID:"):
            # Token lines outside any tweet: one reject for the whole run of them.
            j = i
            while j < len(lines) and lines[j].strip() and not lines[j].startswith("IMGID:"):
                j += 1
            yield Reject(where, f"token lines {i + 1}-{j} are not preceded by an IMGID: line")
            i = j
            continue
        imgid = line[len("IMGID:"):].strip()
        tokens, tags, bad = [], [], None
        i += 1
        while i < len(lines) and lines[i].strip() and not lines[i].startswith("IMGID:"):
            parts = lines[i].split("\t") if "\t" in lines[i] else lines[i].split()
            if bad is None:
                if len(parts) != 2 or not parts[0]:
                    bad = f"line {i + 1}: expected 'token<TAB>tag', got {lines[i]!r}"
                elif not _TAG.match(parts[1].strip()):
                    bad = f"line {i + 1}: bad BIO tag {parts[1].strip()!r}"
                else:
                    tokens.append(parts[0])
                    tags.append(parts[1].strip())
            i += 1
        if not imgid:
            yield Reject(where, "IMGID: line with an empty id")
        elif bad is not None:
            yield Reject(where, bad, imgid)
        elif not tokens:
            yield Reject(where, "empty post: IMGID with no tokens", imgid)
        else:
            yield imgid, where, tokens, tags


def bio_spans(tags: list[str], stray_i_opens: bool = True) -> list[tuple[int, int, str]]:
    """Entity chunks ``(start, end_exclusive, type)``.

    With ``stray_i_opens`` (conlleval / seqeval default mode, the Twitter-2015/2017 scorers) an ``I-X``
    after ``O`` or another type opens a chunk; without it only ``B-X`` does, as the GMNER release counts
    its entities (v1 test: 2542 by B- tags, one stray I- more by seqeval)."""
    spans, start, kind = [], None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, t = tag.partition("-")
        ends = start is not None and (prefix in ("O", "B") or t != kind)
        if ends:
            spans.append((start, i, kind))
            start, kind = None, None
        if prefix == "B" or (prefix == "I" and start is None and stray_i_opens):
            start, kind = i, t
    return spans


def ner_labels(tokens: list[str], tags: list[str], stray_i_opens: bool = True) -> dict:
    """The ``json`` labels of a tagged post: raw BIO ``tags`` and ``entities`` (end exclusive)."""
    return {
        "tags": tags,
        "entities": [{"start": s, "end": e, "type": t, "text": " ".join(tokens[s:e])} for s, e, t in bio_spans(tags, stray_i_opens)],
    }
