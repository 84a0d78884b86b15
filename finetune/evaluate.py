"""``mie evaluate TASK --pred FILE --gold PATH [--split test]``: score any system's predictions.

Gold is read with the corpus readers of :mod:`mie.shards.sources` (the same code that builds the
shards), so an official file is read exactly once, one way. ``--gold`` is the official file of the
split, or the corpus folder (the split's file is then found by its official name). Predictions are
JSONL, one object per gold sentence (gmner, twitter_ner) or instance (mnre), keyed by ``id``:

* gmner: ``{"id": "<IMGID>", "entities": [{"start", "end", "type", "box": [x1,y1,x2,y2] | null}]}``
  (token offsets, ``end`` exclusive; boxes in original-image pixels; a span at most once per line)
* twitter_ner: ``{"id": "<IMGID>", "entities": [{"start", "end", "type"}]}``
* mnre: ``{"id": <0-based line number>, "relation": "<label>"}``
* jmere: ``{"id": <0-based index>, "triples": [{"head": [s, e], "head_type", "tail": [s, e],
  "tail_type", "relation"}], "entities"?: [{"start", "end", "type"}]}`` (entities default to the
  triples' heads and tails)

A malformed line, an unknown or repeated id, or a line without an id is a one-line error naming
the line. Gold ids without a prediction are scored as empty predictions and counted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mie.finetune import metrics
from mie.launch.errors import UserError
from mie.shards.sources import DEFAULT_SPLIT_FILES, Reject, reader

FORMAT_OF_TASK = {"gmner": "gmner", "mnre": "mnre", "jmere": "jmere", "twitter_ner": "twitter"}


class EvaluateError(UserError):
    """A gold or prediction file that cannot be scored, in one line."""


def gold_file(task: str, gold: str | Path, split: str) -> Path:
    """The official file of ``split``: ``gold`` itself, or its split file when it is a corpus folder."""
    path = Path(gold)
    if path.is_dir():
        rel = DEFAULT_SPLIT_FILES[FORMAT_OF_TASK[task]].get(split)
        if rel is None:
            raise EvaluateError(f"--split: {task} has no split {split!r} "
                                f"(one of {', '.join(DEFAULT_SPLIT_FILES[FORMAT_OF_TASK[task]])})")
        path = path / rel
    if not path.is_file():
        raise EvaluateError(f"--gold: {path} not found")
    return path


def read_gold(task: str, gold: str | Path, split: str = "test") -> dict[str, dict[str, Any]]:
    """Original id → labels (with ``tokens``) of every item of the gold file, read by the corpus reader."""
    path = gold_file(task, gold, split)
    out: dict[str, dict[str, Any]] = {}
    for rec in reader(FORMAT_OF_TASK[task])(path, None, {}):
        if isinstance(rec, Reject):
            raise EvaluateError(f"gold {rec.where}: {rec.reason}")
        if rec.id in out:
            raise EvaluateError(f"gold {rec.where}: id {rec.id!r} appears twice")
        out[rec.id] = {**rec.labels, "tokens": rec.tokens}
    return out


def read_predictions(task: str, path: str | Path, gold: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Original id → checked prediction row; raises EvaluateError naming the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise EvaluateError(f"--pred: {path} not found")
    rows: dict[str, dict[str, Any]] = {}
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvaluateError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or "id" not in obj:
                raise EvaluateError(f"{where}: expected a JSON object with an 'id'")
            raw = obj["id"]
            if isinstance(raw, bool) or not isinstance(raw, (str, int)):
                raise EvaluateError(f"{where}: 'id' must be a string or an integer, got {raw!r}")
            sid = str(raw)
            if sid not in gold:
                raise EvaluateError(f"{where}: id {raw!r} is not in the gold file")
            if sid in rows:
                raise EvaluateError(f"{where}: id {raw!r} already predicted on line {first_line[sid]}")
            try:
                rows[sid] = CHECKS[task](obj, len(gold[sid]["tokens"]))
            except (ValueError, TypeError, KeyError) as e:
                raise EvaluateError(f"{where}: {e}") from None
            first_line[sid] = lineno
    return rows


def evaluate(task: str, pred: str | Path, gold: str | Path, split: str = "test") -> dict[str, Any]:
    """Score the prediction file ``pred`` against ``gold``; the result that ``mie evaluate`` prints."""
    if task not in metrics.TASKS:
        raise EvaluateError(f"unknown task {task!r} (one of {', '.join(metrics.TASKS)})")
    gold_path = gold_file(task, gold, split)
    gold_items = read_gold(task, gold_path, split)
    rows = read_predictions(task, pred, gold_items)
    missing = len(gold_items) - len(rows)
    return {"task": task, "gold": str(gold_path), "predictions": str(pred), "items": len(gold_items),
            "missing": missing, **metrics.score(task, gold_items, rows)}


def gold_as_predictions(task: str, gold: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The prediction rows a perfect system writes (first gold box as the region): a scorer check."""
    rows = []
    for sid, labels in gold.items():
        rid: str | int = int(sid) if task in ("mnre", "jmere") else sid
        if task == "mnre":
            rows.append({"id": rid, "relation": labels["relation"]})
        elif task == "jmere":
            rows.append({"id": rid, "triples": labels["relations"],
                         "entities": [{k: e[k] for k in ("start", "end", "type")} for e in labels["entities"]]})
        else:
            ents = []
            for e in labels["entities"]:
                ent = {k: e[k] for k in ("start", "end", "type")}
                if task == "gmner":
                    ent["box"] = e["boxes"][0] if e.get("boxes") else None
                ents.append(ent)
            rows.append({"id": rid, "entities": ents})
    return rows


# ---------------------------------------------------------------------------------------------
# Row checks: each returns the row in canonical form or raises ValueError with the reason.


def _span(s: Any, e: Any, n_tokens: int, what: str) -> tuple[int, int]:
    if isinstance(s, bool) or isinstance(e, bool) or not isinstance(s, int) or not isinstance(e, int):
        raise ValueError(f"{what}: start/end must be integers, got {s!r}, {e!r}")
    if not 0 <= s < e <= n_tokens:
        raise ValueError(f"{what}: span [{s}, {e}) is outside the sentence's {n_tokens} tokens")
    return s, e


def _string(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"{what}: expected a non-empty string, got {v!r}")
    return v


def _list(obj: dict, key: str) -> list:
    v = obj.get(key, [])
    if not isinstance(v, list):
        raise ValueError(f"'{key}' must be a list")
    return v


def _entities(obj: dict, n_tokens: int, with_box: bool) -> list[dict[str, Any]]:
    out, seen = [], set()
    for i, e in enumerate(_list(obj, "entities")):
        what = f"entities[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{what}: expected an object")
        s, end = _span(e.get("start"), e.get("end"), n_tokens, what)
        ent: dict[str, Any] = {"start": s, "end": end, "type": _string(e.get("type"), f"{what}.type")}
        if with_box:
            box = e.get("box")
            if box is not None:
                if (not isinstance(box, list) or len(box) != 4
                        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in box)):
                    raise ValueError(f"{what}.box: expected [x1, y1, x2, y2] numbers or null, got {box!r}")
            ent["box"] = box
            if (s, end) in seen:  # the official scorer keys predictions by span
                raise ValueError(f"{what}: span [{s}, {end}) is predicted twice")
            seen.add((s, end))
        out.append(ent)
    return out


def _check_ner(obj: dict, n_tokens: int) -> dict[str, Any]:
    return {"entities": _entities(obj, n_tokens, with_box=False)}


def _check_gmner(obj: dict, n_tokens: int) -> dict[str, Any]:
    return {"entities": _entities(obj, n_tokens, with_box=True)}


def _check_mnre(obj: dict, n_tokens: int) -> dict[str, Any]:
    if "relation" not in obj:
        raise ValueError("missing 'relation'")
    return {"relation": _string(obj["relation"], "relation")}


def _check_jmere(obj: dict, n_tokens: int) -> dict[str, Any]:
    triples = []
    for i, t in enumerate(_list(obj, "triples")):
        what = f"triples[{i}]"
        if not isinstance(t, dict):
            raise ValueError(f"{what}: expected an object")
        q: dict[str, Any] = {}
        for k in ("head", "tail"):
            span = t.get(k)
            if not isinstance(span, list) or len(span) != 2:
                raise ValueError(f"{what}.{k}: expected [start, end]")
            q[k] = list(_span(span[0], span[1], n_tokens, f"{what}.{k}"))
            q[f"{k}_type"] = _string(t.get(f"{k}_type"), f"{what}.{k}_type")
        q["relation"] = _string(t.get("relation"), f"{what}.relation")
        triples.append(q)
    row: dict[str, Any] = {"triples": triples}
    if "entities" in obj:
        row["entities"] = _entities(obj, n_tokens, with_box=False)
    return row


CHECKS = {"gmner": _check_gmner, "mnre": _check_mnre, "jmere": _check_jmere, "twitter_ner": _check_ner}


def cli(argv: list[str]) -> dict[str, Any]:
    """``mie evaluate``: parse ``argv``, score, print the result as JSON on stdout."""
    parser = argparse.ArgumentParser(prog="mie evaluate", description="Score a prediction file with the "
                                     "official rules of the task (P/R/F1 in percent).")
    parser.add_argument("task", choices=metrics.TASKS, metavar="TASK", help=" | ".join(metrics.TASKS))
    parser.add_argument("--pred", required=True, help="predictions, JSONL (one object per gold item)")
    parser.add_argument("--gold", required=True, help="the official gold file, or the corpus folder")
    parser.add_argument("--split", default="test", help="split to read when --gold is a folder (default test)")
    parser.add_argument("--out", default="", help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    result = evaluate(args.task, args.pred, args.gold, args.split)
    if result["missing"]:
        print(f"mie evaluate: {result['missing']} of {result['items']} gold ids have no prediction "
              "(scored as empty)", file=sys.stderr)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(out)
    return result
