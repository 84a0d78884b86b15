"""``mie shards pseudolabel``: YOLO boxes, spaCy entity candidates and open_clip soft labels (PROMU).

Reads a shard set whose samples carry ``jpg``, ``gen.jpg``, both or neither, and writes a new set with
the same keys, every field kept and ``det.json``, ``ents.json`` and ``soft.npz`` added, plus the set's
``vocab.json``. The fields are specified in :mod:`mie.shards.schema`. In order:

1. check every model file; a missing one is a one-line error naming its config key;
2. the vocabulary pass (:func:`mie.shards.entities.vocab_pass`): the top-M candidates of the whole
   input set, entity prompts from templates, relation prompts from the relations file;
3. :func:`mie.shards.stage.map_shard_set` with a :class:`Labeller`: per batch of samples, detect
   objects in every configured view, crop them, encode crops, whole images and the post text with
   open_clip, and score them against the prompt features (encoded once per vocabulary).

Each output shard is committed whole, so a kill loses at most the shard in flight. The output set's
config digest covers the resolved config and the sha256 of every model file and of the vocabulary, so
another model or config into the same directory is refused; batch sizes are left out (they do not
change what is computed). Trained models drop in through the config: ``detect.model`` names any
ultralytics detector checkpoint, ``clip.model``/``clip.checkpoint`` (and ``clip.model_config`` for an
architecture open_clip does not ship) any open_clip model.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from mie.launch import config as config_lib
from mie.launch.cli import packaged_config
from mie.launch.dist import DistEnv
from mie.launch.log import RunLogger
from mie.shards.detect import DetectConfig, Detections, Detector, ModelFileError, crop, model_fingerprint
from mie.shards.entities import (Candidate, CandidateExtractor, EntityConfig, RelationConfig, post_tokens,
                                 read_relations, vocab_pass)
from mie.shards.images import ImageError
from mie.shards.schema import read_index
from mie.shards.stage import map_shard_set
from mie.shards.writer import sha256_file

View = Literal["jpg", "gen.jpg"]
PREFIX = {"jpg": "jpg", "gen.jpg": "gen"}  # soft.npz array name prefix of each view


@dataclass
class ClipConfig:
    model: str = "ViT-B-32"  # an open_clip model name (built in, or the file stem of model_config)
    checkpoint: str = ""  # local open_clip checkpoint file (a state dict); required, nothing is downloaded
    model_config: str = ""  # JSON model config (embed_dim, vision_cfg, text_cfg) registered under its file stem
    device: str = "cpu"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    batch_size: int = 256  # crops, images or prompts per forward pass

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size: must be >= 1")


@dataclass
class SoftConfig:
    temperature: float = 0.01  # softmax(cosine / temperature); CLIP's trained logit scale is 100
    threshold: float = 0.2  # rows whose top probability is below this are masked (PROMU: 0.2)
    over: Literal["post", "vocab"] = "post"  # object→entity over the post's own candidates, or all M
    relation_top_k: int = 3  # ents.json relation_prompt_ids per post

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature: must be > 0")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError("threshold: must be in [0, 1]")
        if self.relation_top_k < 0:
            raise ValueError("relation_top_k: must be >= 0")


@dataclass
class PseudolabelConfig:
    input: str  # a complete shard set (build or backtranslate output)
    output: str  # the pseudo-labelled shard set
    views: list[View] = field(default_factory=lambda: ["jpg", "gen.jpg"])  # images to label, where present
    batch_size: int = 64  # samples per batch
    threads: int = 0  # torch CPU threads; 0 = $OMP_NUM_THREADS, else every core this process may use
    detect: DetectConfig = field(default_factory=DetectConfig)
    entities: EntityConfig = field(default_factory=EntityConfig)
    relations: RelationConfig = field(default_factory=RelationConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    soft: SoftConfig = field(default_factory=SoftConfig)

    def validate(self) -> None:
        if not self.views or len(set(self.views)) != len(self.views):
            raise ValueError("views: give each of jpg|gen.jpg at most once, at least one")
        if self.batch_size < 1 or self.threads < 0:
            raise ValueError("batch_size: must be >= 1; threads: must be >= 0")
        if Path(self.input).resolve() == Path(self.output).resolve():
            raise ValueError("output: must differ from input")


def main(cfg: PseudolabelConfig, env: DistEnv) -> dict[str, Any] | None:
    """Pseudo-label the shard set ``cfg.input`` into ``cfg.output``; the output index when this call
    completed the set, else None (other ranks still working)."""
    import torch

    log = RunLogger(env)
    # Explicit, because importing ultralytics sets OMP_NUM_THREADS=1 where it is unset (for libraries
    # that read it later) and its device setup resets torch's thread count (see Detector._predict).
    threads = cfg.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    in_dir, out_dir = Path(cfg.input), Path(cfg.output)
    read_index(in_dir)  # a missing or incomplete input set is a one-line error, before any model loads
    fingerprints = {"detect.model": model_fingerprint(cfg.detect), **clip_fingerprints(cfg.clip)}
    relations = read_relations(packaged_config(cfg.relations.file))
    extractor = CandidateExtractor(cfg.entities)
    fingerprints["entities.pipeline"] = extractor.fingerprint
    # Models load before anything is written, so that a model file that does not load is refused cleanly.
    clip, detector = ClipScorer(cfg.clip), Detector(cfg.detect)

    vocab = vocab_pass(in_dir, out_dir, cfg.entities, relations, cfg.relations.templates, extractor, env, log)
    fingerprints["vocab.json"] = hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest()
    labeller = Labeller(cfg, vocab, extractor, clip, detector)
    log.info(f"vocabulary: {len(vocab['entities'])} entities, {len(vocab['relations'])} relations; "
             "prompt features encoded")

    config = config_lib.to_dict(cfg)
    for table in (config, config["detect"], config["entities"], config["clip"]):
        table.pop("batch_size")
    config.pop("threads")
    config["detect"].pop("decode_workers")
    config["fingerprints"] = fingerprints
    return map_shard_set(in_dir, out_dir, "pseudolabel", config, env, labeller, cfg.batch_size, log,
                         counters=labeller.counters)


def clip_fingerprints(cfg: ClipConfig) -> dict[str, str]:
    """sha256 of the open_clip checkpoint (and model config); ModelFileError naming the key if missing."""
    check_clip_files(cfg)
    out = {"clip.checkpoint": "sha256:" + sha256_file(Path(cfg.checkpoint))}
    if cfg.model_config:
        out["clip.model_config"] = "sha256:" + sha256_file(Path(cfg.model_config))
    else:
        import open_clip

        out["clip.model"] = f"open_clip {open_clip.__version__} {cfg.model}"
    return out


def check_clip_files(cfg: ClipConfig) -> None:
    """ModelFileError naming the config key unless the checkpoint (and model config) are usable files."""
    if not cfg.checkpoint:
        raise ModelFileError("clip.checkpoint: not set; name a local open_clip checkpoint file")
    if not Path(cfg.checkpoint).is_file():
        # open_clip would take a missing path for a pretrained tag and try to download it.
        raise ModelFileError(f"clip.checkpoint: open_clip checkpoint {cfg.checkpoint} not found")
    if cfg.model_config:
        path = Path(cfg.model_config)
        if not path.is_file():
            raise ModelFileError(f"clip.model_config: open_clip model config {path} not found")
        if path.stem != cfg.model:
            raise ModelFileError(f"clip.model_config: {path} registers model {path.stem!r} (its file name), "
                                 f"but clip.model is {cfg.model!r}")
        try:
            arch = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFileError(f"clip.model_config: {path}: not valid JSON ({e})") from None
        if not isinstance(arch, dict) or not all(k in arch for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ModelFileError(f"clip.model_config: {path}: an open_clip model config needs embed_dim, "
                                 "vision_cfg and text_cfg")


class ClipScorer:
    """An open_clip model loaded from a local checkpoint: L2-normalised image and text features, as
    float64 arrays, so that the similarities and softmaxes computed from them add no float32 rounding
    of their own before the probabilities are stored as float32."""

    def __init__(self, cfg: ClipConfig):
        import open_clip
        import torch

        self.cfg, self.torch = cfg, torch
        check_clip_files(cfg)
        if cfg.model_config:
            open_clip.add_model_config(cfg.model_config)
        if cfg.model not in open_clip.list_models():
            raise ModelFileError(f"clip.model: open_clip has no model {cfg.model!r}; name a built-in one or "
                                 "give its JSON config as clip.model_config")
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(
                cfg.model, pretrained=cfg.checkpoint, device=cfg.device, precision=cfg.precision)
        except Exception as e:  # a checkpoint of another architecture, or not a checkpoint at all
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ModelFileError(f"clip.checkpoint: cannot load {cfg.checkpoint} as {cfg.model}: "
                                 f"{type(e).__name__}: {msg[:300]}") from None
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(cfg.model)
        self.dim = int(open_clip.get_model_config(cfg.model)["embed_dim"])
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.precision]
        self._prompt_cache: dict[str, np.ndarray] = {}

    def images(self, images: list[Image.Image]) -> np.ndarray:
        """``(N, D)`` features of RGB images (crops or whole images)."""
        out = [np.zeros((0, self.dim))]
        for i in range(0, len(images), self.cfg.batch_size):
            x = self.torch.stack([self.preprocess(im) for im in images[i:i + self.cfg.batch_size]])
            with self.torch.inference_mode():
                f = self.model.encode_image(x.to(self.cfg.device, self.dtype), normalize=True)
            out.append(f.double().cpu().numpy())
        return np.concatenate(out)

    def texts(self, texts: list[str]) -> np.ndarray:
        """``(N, D)`` features of texts (cut to the model's context length by its tokenizer)."""
        out = [np.zeros((0, self.dim))]
        for i in range(0, len(texts), self.cfg.batch_size):
            tokens = self.tokenizer(texts[i:i + self.cfg.batch_size]).to(self.cfg.device)
            with self.torch.inference_mode():
                f = self.model.encode_text(tokens, normalize=True)
            out.append(f.double().cpu().numpy())
        return np.concatenate(out)

    def prompts(self, prompt_lists: list[list[str]]) -> np.ndarray:
        """``(N, D)`` features of N items with T prompts each: the normalised mean of the T prompt features
        (CLIP's prompt ensembling). Computed once per distinct prompt list, then cached."""
        key = hashlib.sha256(json.dumps(prompt_lists).encode()).hexdigest()
        if key not in self._prompt_cache:
            t = len(prompt_lists[0]) if prompt_lists else 1
            f = self.texts([p for ps in prompt_lists for p in ps]).reshape(len(prompt_lists), t, self.dim).mean(1)
            self._prompt_cache[key] = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        return self._prompt_cache[key]


@dataclass
class _Post:
    index: int  # position in the batch
    tokens: list[str]
    text: str
    images: dict[str, Image.Image]  # view → decoded image, for the configured views present


class Labeller:
    """The stage's batch function: raw samples → ``det.json``, ``ents.json``, ``soft.npz``, or a reject
    reason."""

    def __init__(self, cfg: PseudolabelConfig, vocab: dict[str, Any], extractor: CandidateExtractor,
                 clip: ClipScorer, detector: Detector):
        self.cfg, self.vocab, self.extractor, self.clip, self.detector = cfg, vocab, extractor, clip, detector
        self.vocab_id = {k: i for i, k in enumerate(vocab["entities"])}
        self.entity_features = clip.prompts(vocab["entity_prompts"])
        self.relation_features = clip.prompts(vocab["relation_prompts"])
        # Totals per shard in the index's stats: how much of the signal survives the threshold.
        self.counters = {"images": 0, "boxes": 0, "boxes_kept": 0, "relations_kept": 0, "posts_without_candidates": 0}

    def __call__(self, samples: list[dict[str, Any]]) -> list[dict[str, bytes] | str]:
        results: list[dict[str, bytes] | str] = [""] * len(samples)
        posts: list[_Post] = []
        shown_views = [(i, v) for i, s in enumerate(samples) for v in self.cfg.views if v in s]
        decoded = dict(zip(shown_views, self.detector.decode([samples[i][v] for i, v in shown_views])))
        for i, sample in enumerate(samples):
            post = self._parse(i, sample, decoded)
            if isinstance(post, str):
                results[i] = post
            else:
                posts.append(post)
        candidates = self.extractor([p.tokens for p in posts])

        # One detector pass and one open_clip pass per kind over the whole batch.
        shown = [(p, view, im) for p in posts for view, im in p.images.items()]
        detections = self.detector([im for _, _, im in shown])
        crops = [crop(im, box) for (_, _, im), det in zip(shown, detections) for box in det.boxes]
        crop_features = self.clip.images(crops)
        image_features = self.clip.images([im for _, _, im in shown])
        with_image = [p for p in posts if p.images]
        text_features = dict(zip((p.index for p in with_image), self.clip.texts([p.text for p in with_image])))

        per_view: dict[tuple[int, str], tuple[Detections, np.ndarray, np.ndarray]] = {}
        k = 0
        for j, ((post, view, _), det) in enumerate(zip(shown, detections)):
            per_view[post.index, view] = (det, crop_features[k:k + len(det.boxes)], image_features[j])
            k += len(det.boxes)
        for post, cands in zip(posts, candidates):
            views = {v: per_view.get((post.index, v)) for v in self.cfg.views}
            results[post.index] = self._fields(cands, views, text_features.get(post.index))
        return results

    def _parse(self, i: int, sample: dict[str, Any], decoded: dict[tuple[int, str], Image.Image | ImageError]
               ) -> _Post | str:
        """The post's tokens, text and decoded images (``decoded``: by sample index and view), or the
        reason it cannot be used."""
        try:
            tokens = post_tokens(sample)
        except ValueError as e:
            return str(e)
        text = sample["txt"].decode("utf-8") if "txt" in sample else " ".join(tokens)
        images = {}
        for view in self.cfg.views:
            if view not in sample:
                continue
            if isinstance(decoded[i, view], ImageError):
                return f"undecodable {view}: {decoded[i, view]}"
            images[view] = decoded[i, view]
        return _Post(i, tokens, text, images)

    def _fields(self, cands: list[Candidate], views: dict[str, Any],
                text_feature: np.ndarray | None) -> dict[str, bytes]:
        """The three new fields of one post; ``views`` maps each configured view to
        ``(detections, crop features, image feature)`` or None when the sample lacks it."""
        soft, M, R = self.cfg.soft, len(self.vocab["entities"]), len(self.vocab["relations"])
        ids = [self.vocab_id.get(c.key, -1) for c in cands]
        columns = np.arange(M) if soft.over == "vocab" else np.array(sorted({i for i in ids if i >= 0}), dtype=int)
        det_json: dict[str, Any] = {}
        arrays: dict[str, np.ndarray] = {}
        kept_rel = []
        for view, got in views.items():
            p = PREFIX[view]
            if got is None:
                det_json[view] = Detections([], [], []).to_json()
                arrays.update({f"{p}_obj_ent": np.zeros((0, M), np.float32), f"{p}_obj_mask": np.zeros(0, bool),
                               f"{p}_rel": np.zeros(R, np.float32), f"{p}_rel_mask": np.array(False),
                               f"{p}_itm": np.array(0.0, np.float32)})
                continue
            det, crops, image = got
            det_json[view] = det.to_json()
            obj = np.zeros((len(crops), M), np.float32)
            if len(crops) and len(columns):
                obj[:, columns] = softmax(crops @ self.entity_features[columns].T, soft.temperature)
            rel = softmax(image[None] @ self.relation_features.T, soft.temperature)[0]
            rel_mask = bool(rel.max() >= soft.threshold)
            if rel_mask:
                kept_rel.append(rel)
            kept = (obj.max(1) >= soft.threshold) & (len(columns) > 0) if M else np.zeros(len(crops), bool)
            self.counters["images"] += 1
            self.counters["boxes"] += len(crops)
            self.counters["boxes_kept"] += int(kept.sum())
            self.counters["relations_kept"] += rel_mask
            arrays.update({
                f"{p}_obj_ent": obj,
                f"{p}_obj_mask": kept,
                f"{p}_rel": rel, f"{p}_rel_mask": np.array(rel_mask),
                f"{p}_itm": np.array(float(image @ text_feature), np.float32),
            })
        self.counters["posts_without_candidates"] += all(i < 0 for i in ids)  # none in the vocabulary
        rel_ids: list[int] = []
        if kept_rel:
            rel_ids = [int(r) for r in np.argsort(-np.mean(kept_rel, 0), kind="stable")[:soft.relation_top_k]]
        ents = {"candidates": [{"text": c.text, "start": c.start, "end": c.end, "kind": c.kind, "vocab_id": v}
                               for c, v in zip(cands, ids)],
                "relation_prompt_ids": rel_ids}
        return {"det.json": _json(det_json), "ents.json": _json(ents), "soft.npz": npz_bytes(arrays)}


def softmax(similarity: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax of ``similarity / temperature`` (in float64, returned as float32)."""
    z = similarity.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A compressed ``.npz`` (``numpy.load`` reads it) whose bytes depend only on the arrays: numpy's
    own ``savez`` stamps each member with the current time."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(arrays[name]), allow_pickle=False)
    return buf.getvalue()


def read_npz(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of a ``soft.npz`` field."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")


def init_clip_checkpoint(model_config: str | Path, path: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised open_clip checkpoint for the architecture in ``model_config`` (a
    JSON file registered under its stem), atomically. For tests and the toy world until a fitted
    prompter replaces it; loading goes through :class:`ClipScorer` like any real checkpoint."""
    import open_clip
    import torch

    from mie.shards.writer import atomic_write_bytes

    open_clip.add_model_config(str(model_config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(Path(model_config).stem)
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict()}, buf)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path
