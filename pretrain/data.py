"""The pretraining loader: shard sets → tokenized, padded, collated batches, resumable to the sample.

Per rank and DataLoader worker ("slot"), the pipeline is a webdataset ``DataPipeline`` of stages:

1. **mix**: one raw-sample stream per shard set, drawn from by a seeded generator with the sets' weights;
2. each set stream **splits by node and worker** itself: epoch ``e`` permutes the set's shards with
   ``(seed, set, e)``, rank ``r`` of ``world`` takes ``perm[r::world]``, slot ``s`` of ``S`` takes every
   ``S``-th of those; a shard is read with ``webdataset.tarfile_samples`` and its samples permuted with
   ``(seed, set, e, shard)``;
3. **decode + features** (``wds.map`` with a :class:`~mie.shards.loader.CountingHandler`: a bad sample is
   logged with its key and shard, counted, and skipped);
4. **batch**: collate ``batch_size`` samples and attach the slot's position after them.

Everything random is a pure function of the seed and the position, except the mixing generator, whose state
is part of the position. A position is ``(epoch, shard, offset)`` per set plus that state, so the loader
state saved in a checkpoint (every slot's position and which slot the DataLoader serves next) restarts the
stream exactly where it stopped: a resumed run sees the samples the uninterrupted run would have.

**The loader state, precisely.** A rank's state (:meth:`StatefulLoader.state_dict`) holds one entry per slot.
A slot's cursor for set ``i`` is ``{epoch, shard, offset, drawn}`` and optionally ``plans``. Its reading order
in an epoch is a list of *pieces* ``[shard, start]``: ``plans[str(epoch)]`` if the cursor has one, else
``[[s, 0] for s in shards_of_epoch(...)]``. Of piece ``p = [shard, start]``, the slot reads the shard's samples
(in their permuted order) from position ``start`` on. ``cursor.shard`` is the index of the piece being read
and ``cursor.offset`` the position after the last sample handed out of it, so the slot has consumed, in its
current epoch, every sample of the pieces before ``cursor.shard`` and positions ``[start, max(start, offset))``
of the current one, nothing after, and nothing of later epochs. A saved state is taken after a whole batch,
so "consumed" is exactly "in a batch that was handed out" (or bad and skipped).

**Another world size or worker count** (:meth:`PretrainData.redistribute`, from every old rank's state): per
set, every epoch from the lowest to the highest one any old slot is in is split into the pieces no old slot
has consumed yet (the rest of an old slot's current piece and its later pieces; the whole order of an old
slot still in an earlier epoch). Those pieces are dealt out, largest first, to the new slots with the fewest
samples so far, and become their ``plans``; each new slot starts at the lowest epoch and, after its plans,
reads the new world's default split. So within an epoch no sample is handed out twice and none is skipped,
over the old and the new ranks together. The mixing generators restart from ``(seed, rank, slot, batches)``.

A batch (all tensors, except ``keys``) holds ``input_ids``/``attention_mask`` (B, L), ``falsified`` (B,),
``set_index`` (B,) and, per image view ``v`` in ``jpg``/``gen``: ``v.images`` uint8 (B, 3, S, S),
``v.present`` (B,), ``v.boxes`` (B, K, 4) as fractions, ``v.box_mask`` (B, K), ``v.obj_ent`` (B, K, P)
over the run's P entity prompts, ``v.obj_mask`` (B, K), ``v.rel`` (B, R), ``v.rel_mask`` (B,).
"""
from __future__ import annotations

import copy
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from mie.launch.dist import DistEnv
from mie.shards.loader import CountingHandler, decode_sample
from mie.shards.schema import ShardSetError, read_index

VOCAB = "vocab.json"


@dataclass
class ShardSource:
    dir: str
    weight: float = 1.0

    def validate(self) -> None:
        if not self.weight > 0:
            raise ValueError("weight: must be > 0")


@dataclass
class DataConfig:
    sets: list[ShardSource] = field(default_factory=list)
    batch_size: int = 32  # samples per rank per micro-batch
    workers: int = 2  # DataLoader worker processes per rank (0 = in the training process)
    shuffle: bool = True  # permute shards per epoch and samples within each shard
    max_bad_samples: int = 100  # per slot; past it the loader stops (a loader that skips most data is worse)
    prefetch: int = 2  # batches each worker keeps ready
    # Debug: a directory; each rank appends one line per batch handed out to keys-rank%05d.jsonl there:
    # {rank, world_size, slot, batch (that slot's count), keys, sets, epochs}.
    record_keys: str = ""

    def validate(self) -> None:
        if not self.sets:
            raise ValueError("sets: list at least one shard set ([[data.sets]] dir = ...)")
        if self.batch_size < 1 or self.workers < 0 or self.prefetch < 1:
            raise ValueError("batch_size/prefetch: must be >= 1, workers >= 0")


@dataclass
class PromptSet:
    """Tokenized prompts of one kind (entity or relation), the union over the run's sets, and which of them
    each set's soft labels range over. A prompt may have several template texts (``vocab.json`` lists them
    per entry, as the pseudo-labeller averages its prompt features over templates): every text is encoded
    and the texts of one prompt are averaged (``owner`` says whose they are)."""

    prompts: list[tuple[str, ...]]  # P prompts, each its template texts
    input_ids: torch.Tensor  # (T, prompt_len), T texts
    attention_mask: torch.Tensor  # (T, prompt_len)
    owner: torch.Tensor  # (T,) the prompt each text belongs to
    allowed: torch.Tensor  # (n_sets, P) bool
    index: list[np.ndarray]  # per set: its vocab position → prompt index


@dataclass
class Prompts:
    entity: PromptSet | None
    relation: PromptSet | None


class PretrainData:
    """The run's shard sets, their prompt vocabularies and the tokenizer; makes loaders.

    Checks up front what would otherwise fail late: every set complete (``index.json``), enough shards to
    give every rank and worker at least one, consistent ``vocab.json`` files."""

    def __init__(self, cfg: DataConfig, tokenizer, max_len: int, prompt_len: int, image_size: int,
                 max_boxes: int, views: list[str], env: DistEnv, seed: int):
        self.cfg, self.tokenizer, self.env, self.seed = cfg, tokenizer, env, seed
        self.max_len, self.image_size, self.max_boxes, self.views = max_len, image_size, max_boxes, list(views)
        self.slots = max(1, cfg.workers)
        self.urls: list[list[str]] = []
        self.counts: list[list[int]] = []  # samples per shard (index.json), aligned with urls
        self.vocabs: list[dict[str, Any] | None] = []
        self.samples = 0
        for i, src in enumerate(cfg.sets):
            index = read_index(src.dir)
            names = [str(Path(src.dir) / s["name"]) for s in index["shards"] if s["samples"] > 0]
            if len(names) < env.world_size * self.slots:
                raise ShardSetError(
                    f"data.sets[{i}].dir: {src.dir} has {len(names)} non-empty shards, fewer than ranks × workers "
                    f"= {env.world_size} × {self.slots}; rebuild it with smaller output.samples_per_shard or "
                    "lower data.workers")
            self.urls.append(names)
            self.counts.append([int(s["samples"]) for s in index["shards"] if s["samples"] > 0])
            self.samples += index["total"]
            self.vocabs.append(_read_vocab(Path(src.dir)))
        self.prompts = Prompts(self._prompt_set("entities", "entity_prompts", prompt_len),
                               self._prompt_set("relations", "relation_prompts", prompt_len))
        weights = np.array([s.weight for s in cfg.sets], dtype=np.float64)
        self.weights = weights / weights.sum()

    def _prompt_set(self, names_key: str, prompts_key: str, prompt_len: int) -> PromptSet | None:
        prompts: list[tuple[str, ...]] = []
        where: dict[tuple[str, ...], int] = {}
        index = []
        for vocab in self.vocabs:
            idx = []
            for entry in (vocab or {}).get(prompts_key, []):
                key = (entry,) if isinstance(entry, str) else tuple(entry)
                if key not in where:
                    where[key] = len(prompts)
                    prompts.append(key)
                idx.append(where[key])
            index.append(np.array(idx, dtype=np.int64))
        if not prompts:
            return None
        allowed = torch.zeros(len(self.vocabs), len(prompts), dtype=torch.bool)
        for s, idx in enumerate(index):
            allowed[s, torch.from_numpy(idx)] = True
        texts = [t for p in prompts for t in p]
        owner = torch.tensor([i for i, p in enumerate(prompts) for _ in p], dtype=torch.long)
        tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=prompt_len, return_tensors="pt")
        return PromptSet(prompts, tok["input_ids"], tok["attention_mask"], owner, allowed, index)

    # -- the pipeline of one slot -----------------------------------------------------------------------------
    def initial_slot_state(self, slot: int) -> dict[str, Any]:
        rng = np.random.Generator(np.random.PCG64([self.seed, self.env.rank, slot]))
        return {"cursors": [{"epoch": 0, "shard": 0, "offset": 0, "drawn": 0} for _ in self.urls],
                "mix": rng.bit_generator.state, "batches": 0, "bad": 0}

    def pipeline(self, slot: int, state: dict[str, Any]) -> wds.DataPipeline:
        """The batches of ``slot`` on this rank from position ``state`` (mutated as the stream advances)."""
        handler = CountingHandler(self.cfg.max_bad_samples)
        base_bad = state["bad"]
        return wds.DataPipeline(
            lambda: self._mix(slot, state, handler),
            wds.map(self._features, handler=handler),
            lambda src: self._batches(src, state, handler, base_bad),
        )

    def _mix(self, slot: int, state: dict[str, Any], handler: CountingHandler) -> Iterator[dict[str, Any]]:
        streams = [self._set_stream(i, slot, state["cursors"][i], handler) for i in range(len(self.urls))]
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = state["mix"]
        while True:
            j = int(rng.choice(len(streams), p=self.weights)) if len(streams) > 1 else 0
            state["mix"] = rng.bit_generator.state
            sample = next(streams[j])
            sample["__set__"] = j
            yield sample

    def _epoch_order(self, set_index: int, epoch: int) -> np.ndarray:
        n = len(self.urls[set_index])
        return (np.random.default_rng([self.seed, set_index, epoch]).permutation(n) if self.cfg.shuffle
                else np.arange(n))

    def shards_of_epoch(self, set_index: int, epoch: int, slot: int, rank: int | None = None,
                        world_size: int | None = None, slots: int | None = None) -> list[int]:
        """The shards of a set that ``slot`` of ``rank`` (default: this rank, world and worker count) reads
        in epoch ``epoch`` when no plan says otherwise, in reading order."""
        rank = self.env.rank if rank is None else rank
        world_size = self.env.world_size if world_size is None else world_size
        slots = self.slots if slots is None else slots
        return [int(i) for i in self._epoch_order(set_index, epoch)[rank::world_size][slot::slots]]

    @staticmethod
    def _planned(cur: dict[str, Any]) -> list[list[int]] | None:
        return cur.get("plans", {}).get(str(cur["epoch"]))

    def _set_stream(self, i: int, slot: int, cur: dict[str, Any], handler: CountingHandler) -> Iterator[dict[str, Any]]:
        """Raw samples of set ``i`` for ``slot`` from cursor ``cur``, epoch after epoch. The cursor always
        points at the next sample to hand out (see the module docstring for pieces and plans)."""
        while True:
            yielded, fresh = 0, cur["shard"] == 0 and cur["offset"] == 0
            planned = self._planned(cur)
            pieces = planned if planned is not None else [[s, 0] for s in self.shards_of_epoch(i, cur["epoch"], slot)]
            while cur["shard"] < len(pieces):
                shard, start = pieces[cur["shard"]]
                url = self.urls[i][shard]
                samples = wds.tarfile_samples([{"url": url}], handler=handler)
                if self.cfg.shuffle:  # a whole shard in memory (raw bytes), permuted by its position
                    samples = list(samples)
                    perm = np.random.default_rng([self.seed, i, cur["epoch"], shard]).permutation(len(samples))
                    samples = [samples[k] for k in perm]
                for k, sample in enumerate(samples):
                    if k < max(start, cur["offset"]):
                        continue
                    cur["offset"] = k + 1
                    cur["drawn"] += 1
                    yielded += 1
                    sample["__epoch__"] = cur["epoch"]
                    yield sample
                cur["shard"] += 1
                cur["offset"] = 0
            # A plan may leave a slot nothing of an epoch; the default split gives every slot shards.
            if yielded == 0 and fresh and planned is None:
                raise RuntimeError(f"data.sets[{i}]: epoch {cur['epoch']} gave slot {slot} no samples "
                                   f"(every sample of {len(pieces)} shards was bad)")
            cur.get("plans", {}).pop(str(cur["epoch"]), None)
            cur["epoch"] += 1
            cur["shard"] = 0
            cur["offset"] = 0

    def redistribute(self, old: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """This rank's slot states continuing ``old``, the loader states of every rank (in rank order) of a
        run with another world size or worker count: the samples no old slot has consumed in its current
        epoch(s) are dealt out over the new ranks and slots (see the module docstring)."""
        first = old[0] if old else {}
        want = {"world_size": len(old), "sets": [s.dir for s in self.cfg.sets], "seed": self.seed}
        for r, state in enumerate(old):
            for k, v in {**want, "slots": first.get("slots")}.items():
                if state.get(k) != v:
                    raise ShardSetError(f"resume: rank {r}'s loader state has {k}={state.get(k)!r}, expected {v!r}; "
                                        "a resume on another world size needs the same data.sets and seed")
        old_world, old_slots = len(old), first["slots"]
        cursors = [st["slot_states"][s] for st in old for s in range(old_slots)]  # old global slot r*S+s
        n = self.env.world_size * self.slots
        batches, bad = sum(c["batches"] for c in cursors), sum(c["bad"] for c in cursors)
        states = [{"cursors": [], "batches": _share(batches, g, n), "bad": _share(bad, g, n),
                   "mix": np.random.Generator(np.random.PCG64([self.seed, g // self.slots, g % self.slots,
                                                                batches])).bit_generator.state}
                  for g in range(n)]
        for i in range(len(self.urls)):
            curs = [c["cursors"][i] for c in cursors]
            # Up to the last epoch any old slot is in or holds a plan for (from an earlier change of world):
            # such a plan covers only what was left of its epoch then.
            lo = min(c["epoch"] for c in curs)
            hi = max([c["epoch"] for c in curs] + [int(e) for c in curs for e in c.get("plans", {})])
            plans: list[dict[str, list[list[int]]]] = [{} for _ in range(n)]
            for epoch in range(lo, hi + 1):
                pieces = [p for g, c in enumerate(curs)
                          for p in self._unread(i, epoch, c, g // old_slots, old_world, g % old_slots, old_slots)]
                for g, dealt in enumerate(self._deal(i, epoch, pieces, n)):
                    plans[g][str(epoch)] = dealt
            drawn = sum(c["drawn"] for c in curs)
            for g in range(n):
                states[g]["cursors"].append({"epoch": lo, "shard": 0, "offset": 0, "drawn": _share(drawn, g, n),
                                             "plans": plans[g]})
        return states[self.env.rank * self.slots:(self.env.rank + 1) * self.slots]

    def _unread(self, i: int, epoch: int, cur: dict[str, Any], rank: int, world_size: int, slot: int,
                slots: int) -> list[list[int]]:
        """The pieces of set ``i``'s epoch ``epoch`` that a slot at cursor ``cur`` (of ``rank`` in an old world)
        would still have read: all of its order for a later epoch than its own, the rest for its own."""
        if cur["epoch"] > epoch:
            return []
        mine = cur.get("plans", {}).get(str(epoch))
        if mine is None:
            mine = [[s, 0] for s in self.shards_of_epoch(i, epoch, slot, rank, world_size, slots)]
        if cur["epoch"] == epoch:  # the rest of the piece in flight, then the pieces after it
            mine = [[shard, max(start, cur["offset"]) if j == cur["shard"] else start]
                    for j, (shard, start) in enumerate(mine) if j >= cur["shard"]]
        return [[shard, start] for shard, start in mine if start < self.counts[i][shard]]

    def _deal(self, i: int, epoch: int, pieces: list[list[int]], n: int) -> list[list[list[int]]]:
        """``pieces`` of set ``i``'s epoch over ``n`` slots: largest first to the slot with the fewest samples
        (ties: the lower slot); each slot's pieces in the epoch's shard order."""
        position = {int(s): k for k, s in enumerate(self._epoch_order(i, epoch))}
        load = [0] * n
        dealt: list[list[list[int]]] = [[] for _ in range(n)]
        for shard, start in sorted(pieces, key=lambda p: (p[1] - self.counts[i][p[0]], position[p[0]])):
            g = min(range(n), key=lambda k: (load[k], k))
            load[g] += self.counts[i][shard] - start
            dealt[g].append([shard, start])
        return [sorted(d, key=lambda p: position[p[0]]) for d in dealt]

    def _features(self, raw: dict[str, Any]) -> dict[str, Any]:
        key, url = raw.get("__key__"), raw.get("__url__")
        try:
            return self._sample_features(raw)
        except Exception as e:  # the handler counts and logs it; the key and shard say which sample
            raise ValueError(f"{key} in {url}: {type(e).__name__}: {e}") from e

    def _sample_features(self, raw: dict[str, Any]) -> dict[str, Any]:
        wanted = {"txt", "json", "det.json", "soft.npz"} | {_VIEW_FIELD[v] for v in self.views}
        sample = decode_sample({k: v for k, v in raw.items() if k in wanted or k == "__key__"})
        if "txt" not in sample:
            raise ValueError("no txt field")
        meta = sample.get("json") or {}
        tok = self.tokenizer(sample["txt"], padding="max_length", truncation=True, max_length=self.max_len)
        s = raw["__set__"]
        out: dict[str, Any] = {
            "__key__": sample["__key__"], "__epoch__": raw["__epoch__"], "set_index": s,
            "falsified": bool(meta.get("falsified", False)),
            "input_ids": np.asarray(tok["input_ids"], dtype=np.int64),
            "attention_mask": np.asarray(tok["attention_mask"], dtype=np.int64),
        }
        det = sample.get("det.json") or {}
        soft = _load_npz(sample["soft.npz"]) if "soft.npz" in sample else {}
        for view in self.views:
            out.update(self._view_features(view, sample.get(_VIEW_FIELD[view]), det.get(_VIEW_FIELD[view]), soft, s))
        return out

    def _view_features(self, view: str, image: Image.Image | None, det: dict | None, soft: dict[str, np.ndarray],
                       s: int) -> dict[str, Any]:
        size, k = self.image_size, self.max_boxes
        ent, rel = self.prompts.entity, self.prompts.relation
        p_ent, p_rel = (len(ent.prompts) if ent else 0), (len(rel.prompts) if rel else 0)
        f = {f"{view}.images": np.zeros((3, size, size), np.uint8), f"{view}.present": image is not None,
             f"{view}.boxes": np.zeros((k, 4), np.float32), f"{view}.box_mask": np.zeros(k, bool),
             f"{view}.obj_ent": np.zeros((k, p_ent), np.float32), f"{view}.obj_mask": np.zeros(k, bool),
             f"{view}.rel": np.zeros(p_rel, np.float32), f"{view}.rel_mask": False}
        if image is None:
            return f
        w, h = image.size
        f[f"{view}.images"] = np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.uint8).transpose(2, 0, 1).copy()
        boxes = np.zeros((0, 4), np.float32)
        if det is not None:
            boxes = np.asarray(det.get("boxes", []), dtype=np.float32).reshape(-1, 4)
            n = min(len(boxes), k)
            norm = np.clip(boxes[:n] / np.array([w, h, w, h], np.float32), 0.0, 1.0)
            f[f"{view}.boxes"][:n] = norm
            f[f"{view}.box_mask"][:n] = (norm[:, 2] > norm[:, 0]) & (norm[:, 3] > norm[:, 1])
        prefix = _SOFT_PREFIX[view]
        vocab = self.vocabs[s]
        if f"{prefix}_obj_ent" in soft and ent is not None and vocab is not None:
            dist = soft[f"{prefix}_obj_ent"]
            m = len(ent.index[s])
            if dist.shape != (len(boxes), m):
                raise ValueError(f"soft.npz {prefix}_obj_ent has shape {dist.shape}, expected ({len(boxes)} boxes, "
                                 f"{m} vocab entities)")
            n = min(len(boxes), k)
            rows = _distributions(dist[:n], f"{prefix}_obj_ent")
            f[f"{view}.obj_ent"][:n, ent.index[s]] = rows
            mask = np.asarray(soft.get(f"{prefix}_obj_mask", np.ones(len(boxes), bool)), bool).reshape(-1)[:n]
            f[f"{view}.obj_mask"][:n] = mask & (rows.sum(1) > 0)
        if f"{prefix}_rel" in soft and rel is not None and vocab is not None:
            dist = soft[f"{prefix}_rel"].reshape(-1)
            if dist.shape != (len(rel.index[s]),):
                raise ValueError(f"soft.npz {prefix}_rel has {dist.shape[0]} values, expected {len(rel.index[s])} "
                                 "vocab relations")
            row = _distributions(dist[None], f"{prefix}_rel")[0]
            f[f"{view}.rel"][rel.index[s]] = row
            f[f"{view}.rel_mask"] = bool(np.asarray(soft.get(f"{prefix}_rel_mask", True)).reshape(-1)[0]) and row.sum() > 0
        return f

    def _batches(self, src: Iterator[dict[str, Any]], state: dict[str, Any], handler: CountingHandler,
                 base_bad: int) -> Iterator[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        for sample in src:
            batch.append(sample)
            if len(batch) == self.cfg.batch_size:
                state["batches"] += 1
                state["bad"] = base_bad + handler.count
                out = collate(batch)
                out["_state"] = copy.deepcopy(state)
                if self.cfg.record_keys:
                    out["_record"] = {"keys": out["keys"], "sets": [s["set_index"] for s in batch],
                                      "epochs": [s["__epoch__"] for s in batch]}
                yield out
                batch = []

    def loader(self, state: dict[str, Any] | list[dict[str, Any]] | None = None) -> "StatefulLoader":
        """An endless batch iterator for this rank, from the start, from a :meth:`StatefulLoader.state_dict`,
        or from every rank's state of a run with another world size (see :class:`StatefulLoader`)."""
        return StatefulLoader(self, state)


_VIEW_FIELD = {"jpg": "jpg", "gen": "gen.jpg"}
_SOFT_PREFIX = {"jpg": "jpg", "gen": "gen"}


def _share(total: int, k: int, n: int) -> int:
    """Part ``k`` of ``total`` split over ``n`` as evenly as integers allow (the parts sum to ``total``)."""
    return total // n + (k < total % n)


def _read_vocab(set_dir: Path) -> dict[str, Any] | None:
    path = set_dir / VOCAB
    if not path.is_file():
        return None
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ShardSetError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    for names, prompts in (("entities", "entity_prompts"), ("relations", "relation_prompts")):
        if len(vocab.get(names, [])) != len(vocab.get(prompts, [])):
            raise ShardSetError(f"{path}: {len(vocab.get(names, []))} {names} but {len(vocab.get(prompts, []))} {prompts}")
        for i, entry in enumerate(vocab.get(prompts, [])):
            ok = isinstance(entry, str) or (isinstance(entry, list) and entry and all(isinstance(t, str) for t in entry))
            if not ok:
                raise ShardSetError(f"{path}: {prompts}[{i}] must be a string or a non-empty list of strings")
    return vocab


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _distributions(rows: np.ndarray, name: str) -> np.ndarray:
    """Rows as probability distributions: finite, non-negative, renormalised (all-zero rows stay zero)."""
    rows = np.asarray(rows, dtype=np.float32)
    if not np.isfinite(rows).all() or (rows < 0).any():
        raise ValueError(f"soft.npz {name}: values must be finite and >= 0")
    total = rows.sum(-1, keepdims=True)
    return np.divide(rows, total, out=np.zeros_like(rows), where=total > 0)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack per-sample arrays into tensors; ``keys`` is the list of sample keys."""
    out: dict[str, Any] = {"keys": [s["__key__"] for s in samples]}
    for name in samples[0]:
        if name.startswith("__"):
            continue
        out[name] = torch.from_numpy(np.stack([np.asarray(s[name]) for s in samples]))
    return out


class _SlotDataset(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs: the pipeline of slot ``(worker + rotation) % slots``."""

    def __init__(self, data: PretrainData, states: list[dict[str, Any]], rotation: int):
        self.data, self.states, self.rotation = data, states, rotation

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        slot = ((info.id if info is not None else 0) + self.rotation) % self.data.slots
        return iter(self.data.pipeline(slot, copy.deepcopy(self.states[slot])))


class StatefulLoader:
    """Endless batches of one rank, with the exact position after the last batch handed out.

    The DataLoader serves its workers round-robin, worker 0 first. After ``n`` batches the next one comes
    from slot ``n % slots``; a resumed loader therefore gives worker ``w`` slot ``(w + next) % slots``, which
    continues the same round-robin sequence.

    ``state`` is None (a fresh start), this rank's :meth:`state_dict` (an exact resume), or the list of
    every rank's state of a run with another world size (:meth:`PretrainData.redistribute`)."""

    def __init__(self, data: PretrainData, state: dict[str, Any] | list[dict[str, Any]] | None = None):
        self.data = data
        if state is None:
            self.states = [data.initial_slot_state(s) for s in range(data.slots)]
            self.next_slot = 0
        elif isinstance(state, list):
            self.states = data.redistribute(state)
            self.next_slot = 0
        else:
            check = {"world_size": data.env.world_size, "slots": data.slots, "batch_size": data.cfg.batch_size,
                     "sets": [s.dir for s in data.cfg.sets], "seed": data.seed}
            for k, v in check.items():
                if state.get(k) != v:
                    raise ShardSetError(f"resume: the checkpoint's loader had {k}={state.get(k)!r}, this run has {v!r}; "
                                        "an exact resume needs the same world size, data.workers, data.batch_size, "
                                        "data.sets and seed")
            self.states = copy.deepcopy(state["slot_states"])
            self.next_slot = state["next_slot"]
        dataset = _SlotDataset(data, self.states, self.next_slot)
        workers = data.cfg.workers
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
            prefetch_factor=data.cfg.prefetch if workers else None, persistent_workers=False,
            multiprocessing_context="fork" if workers else None)
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers each tokenize alone
            self._it = iter(self.loader)
        batch = next(self._it)
        state = batch.pop("_state")
        slot = self.next_slot
        self.states[slot] = state
        record = batch.pop("_record", None)
        if record is not None:
            self._record(slot, state["batches"], record)
        self.next_slot = (slot + 1) % self.data.slots
        return batch

    def _record(self, slot: int, batches: int, record: dict[str, Any]) -> None:
        env = self.data.env
        path = Path(self.data.cfg.record_keys) / f"keys-rank{env.rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        line = {"rank": env.rank, "world_size": env.world_size, "slot": slot, "batch": batches, **record}
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def start(self) -> None:
        """Start the workers now. The DataLoader draws its base seed from the torch generator here, so the
        training loop restores RNG states only after this."""
        if self._it is None:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            self._it = iter(self.loader)

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch returned (plain JSON data)."""
        return {"world_size": self.data.env.world_size, "slots": self.data.slots, "batch_size": self.data.cfg.batch_size,
                "sets": [s.dir for s in self.data.cfg.sets], "seed": self.data.seed,
                "next_slot": self.next_slot, "slot_states": copy.deepcopy(self.states)}

    def stats(self) -> dict[str, Any]:
        """Samples drawn per set, epochs reached and bad samples, summed over this rank's slots."""
        sets = []
        for i, src in enumerate(self.data.cfg.sets):
            cursors = [s["cursors"][i] for s in self.states]
            sets.append({"dir": src.dir, "drawn": sum(c["drawn"] for c in cursors),
                         "epoch": max(c["epoch"] for c in cursors)})
        return {"batches": sum(s["batches"] for s in self.states), "bad_samples": sum(s["bad"] for s in self.states),
                "sets": sets}

    def close(self) -> None:
        self._it = None  # the DataLoader iterator shuts its workers down when collected
