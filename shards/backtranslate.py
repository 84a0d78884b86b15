"""``mie shards backtranslate``: add ``gen.jpg``, an image regenerated from each post's text.

TMR (ICMR-24) back-translates every post with Stable Diffusion (50 steps with classifier-free
guidance: 100 UNet evaluations per image). Here a diffusers text-to-image pipeline (a Stable
Diffusion / SD-Turbo directory, loaded with ``from_pretrained``) does it in a few steps and in
batches; ``mie shards tiny-diffusion`` builds a tiny one for tests and the quickstart.

For each sample the prompt is ``prompt.template`` filled with the cleaned ``txt`` (URLs, ``RT @user:``
and emoji stripped, mentions and hashtags turned into words, cut to the text encoder's 77 tokens),
and the starting noise comes from a CPU generator seeded with a hash of (``__key__``, ``seed``).

Determinism. Every pipeline call runs on exactly ``batch_size`` rows: a short batch (the end of a
shard, or a batch with rejected samples) is padded with copies of its last prompt and key, whose
images are dropped. So a sample's image never depends on which samples share its batch, shards are
the unit of work (so the world size does not matter either), and shapes stay static for
``torch.compile``. Across two *different* batch sizes the images are byte-identical only where the
device's kernels give the same per-row results at both sizes: on the CPU (MKL / oneDNN) that holds
for multiples of 4 (small-M GEMMs of the time embedding take another code path at 1-3 rows); on an
H100 in fp16 it does not (cuBLAS picks kernels by shape: pixels then differ by at most 1 of 255).
``bench/backtranslate.py`` reports it for the device it runs on. ``batch_size`` is left out of the
config digest all the same: resuming with another batch size is allowed, at the cost of such
last-bit differences between the shards written before and after.

The index's ``stats`` hold ``images`` and ``unet_evaluations`` (UNet rows run for real samples,
counted by a hook on the UNet: steps × 2 with guidance), so evaluations per image is their ratio.
"""
from __future__ import annotations

import hashlib
import html
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from mie.launch import config as config_lib
from mie.launch.dist import DistEnv
from mie.launch.errors import UserError
from mie.launch.log import RunLogger
from mie.shards.schema import read_index
from mie.shards.stage import map_shard_set

Compile = Literal["auto", "none", "default", "reduce-overhead", "max-autotune"]


@dataclass
class ModelConfig:
    path: str  # a diffusers text-to-image pipeline directory (model_index.json): SD, SD-Turbo
    variant: str = ""  # weight file variant, e.g. "fp16" for *.fp16.safetensors
    scheduler: str = ""  # a diffusers scheduler class name, e.g. "EulerDiscreteScheduler"; "" = the model's own
    timestep_spacing: str = ""  # scheduler override, e.g. "trailing" (1-step sampling starts at t = 999)
    steps: int = 1  # denoising steps
    guidance_scale: float = 0.0  # > 1 turns classifier-free guidance on (2 UNet evaluations per step)
    negative_prompt: str = ""  # used with guidance only
    height: int = 512
    width: int = 512
    tiny_vae: str = ""  # an AutoencoderTiny directory (e.g. TAESD) that replaces the VAE decoder; "" = the model's
    device: str = "auto"  # auto (cuda if present) | cpu | cuda
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: float16 on cuda, float32 on cpu
    channels_last: bool = False  # GPU only; measured slower for the SD UNet on an H100 (bench/backtranslate.py)
    # torch.compile mode of the UNet and VAE decoder (reduce-overhead = CUDA graphs); auto = default on a GPU
    # (1.38× on an H100 after ~70 s of compiling), none on the CPU
    compile: Compile = "auto"

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError("steps: must be >= 1")
        if self.height < 8 or self.width < 8 or self.height % 8 or self.width % 8:
            raise ValueError("height/width: must be multiples of 8, at least 8")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device: expected auto|cpu|cuda, got {self.device!r}")


@dataclass
class PromptConfig:
    template: str = "{text}"  # the prompt, with {text} the cleaned post text
    strip_urls: bool = True
    strip_retweet: bool = True  # "RT @user :" prefixes
    mentions: Literal["keep", "word", "drop"] = "word"  # "@name" → "name" (names help the image), or dropped
    hashtags: Literal["keep", "word", "drop"] = "word"  # "#topic" → "topic"
    strip_emoji: bool = True
    unescape_html: bool = True  # "&amp;" → "&", as tweets store it
    detokenize: bool = True  # "word , word !" → "word, word!" (shard text is tokens joined by spaces)
    max_tokens: int = 0  # prompt tokens without BOS/EOS; 0 = what the text encoder takes (77 - 2)

    def validate(self) -> None:
        try:
            self.template.format(text="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"template: must contain only the field {{text}} ({type(e).__name__}: {e})") from None
        if "{text}" not in self.template:
            raise ValueError("template: must contain {text}")
        if self.max_tokens < 0:
            raise ValueError("max_tokens: must be >= 0")


@dataclass
class OutputConfig:
    dir: str
    jpeg_quality: int = 90

    def validate(self) -> None:
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality: must be in 1..100")


@dataclass
class BacktranslateConfig:
    input: str  # a complete shard set (a directory with index.json)
    model: ModelConfig
    output: OutputConfig
    prompt: PromptConfig = field(default_factory=PromptConfig)
    seed: int = 0  # with each sample's key, seeds its starting noise
    batch_size: int = 8  # prompts per pipeline call

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size: must be >= 1")


class ModelError(UserError):
    """A model directory that is missing or that diffusers cannot load, in one line."""


def main(cfg: BacktranslateConfig, env: DistEnv) -> dict[str, Any] | None:
    """Back-translate the shard set ``cfg.input`` into ``cfg.output.dir``; the index when this call
    completed the set (None while other ranks still work)."""
    log = RunLogger(env)
    model_dir = check_model_dir(cfg.model.path, "model.path")
    if cfg.model.tiny_vae:
        check_model_dir(cfg.model.tiny_vae, "model.tiny_vae", marker="config.json")
    read_index(cfg.input)  # a missing or incomplete input is reported before any model work
    device, dtype = resolve_device(cfg.model, env)
    # What the images depend on (its digest guards the output set): not the batch size (see the module
    # docstring), but the weights themselves and the device, precision and compilation actually used.
    outputs_depend_on = {k: v for k, v in config_lib.to_dict(cfg).items() if k != "batch_size"}
    for resolved_later in ("device", "dtype", "compile"):
        del outputs_depend_on["model"][resolved_later]
    outputs_depend_on["resolved"] = {
        "device": device.type, "dtype": str(dtype).removeprefix("torch."), "compile": compile_mode(cfg.model, device),
        "model": model_fingerprint(model_dir),
        "tiny_vae": model_fingerprint(Path(cfg.model.tiny_vae)) if cfg.model.tiny_vae else ""}

    state: dict[str, Any] = {}
    counters = {"images": 0, "unet_evaluations": 0}

    def batch(samples: list[dict[str, Any]]) -> list[dict[str, bytes] | str]:
        # Loaded on first use: a re-run of a finished set, or a refused one, never pays for the model.
        if "bt" not in state:
            log.info(f"loading {model_dir} on {device} ({str(dtype).removeprefix('torch.')})")
            state["bt"] = Backtranslator(load_pipeline(cfg.model, device, dtype), cfg.model, cfg.prompt, cfg.seed,
                                         cfg.batch_size)
        bt: Backtranslator = state["bt"]
        results: list[dict[str, bytes] | str] = []
        keys, prompts, slots = [], [], []
        for s in samples:
            prompt, reason = bt.prompt_of(s)
            if prompt is None:
                results.append(reason)
                continue
            slots.append(len(results))
            results.append({})
            keys.append(s["__key__"])
            prompts.append(prompt)
        if keys:
            before = bt.unet_evaluations
            images = bt.generate(keys, prompts)
            counters["images"] += len(images)
            counters["unet_evaluations"] += bt.unet_evaluations - before
            for slot, jpg in zip(slots, encode_jpegs(images, cfg.output.jpeg_quality)):
                results[slot] = {"gen.jpg": jpg}
        return results

    index = map_shard_set(cfg.input, cfg.output.dir, "backtranslate", outputs_depend_on, env, batch,
                          cfg.batch_size, log, counters=counters)
    if index is not None and index["stats"].get("images"):
        log.info(f"backtranslate: {index['stats']['unet_evaluations'] / index['stats']['images']:g} "
                 "UNet evaluations per image")
    return index


# ----------------------------------------------------------------------------------------- the model


def check_model_dir(path: str, key: str, marker: str = "model_index.json") -> Path:
    """``path`` as a directory holding ``marker``, or a one-line ModelError naming the config ``key``."""
    p = Path(path)
    if not path:
        raise ModelError(f"{key}: no model directory given")
    if not p.is_dir():
        hint = " (build the tiny one with `mie shards tiny-diffusion`)" if key == "model.path" else ""
        raise ModelError(f"{key}: model directory {p} not found{hint}")
    if not (p / marker).is_file():
        raise ModelError(f"{key}: {p} is not a diffusers model directory (no {marker})")
    return p


def model_fingerprint(model_dir: Path) -> str:
    """A cheap digest of a model directory: every file's path and size, small files' content, and the
    first and last MiB of large ones (so a 5 GB checkpoint is not read in full on every start)."""
    h = hashlib.sha256()
    for p in sorted(x for x in model_dir.rglob("*") if x.is_file()):
        size = p.stat().st_size
        h.update(f"{p.relative_to(model_dir)}\0{size}\0".encode())
        with open(p, "rb") as f:
            if size <= 2 << 20:
                h.update(f.read())
            else:
                h.update(f.read(1 << 20))
                f.seek(-(1 << 20), 2)
                h.update(f.read())
    return h.hexdigest()[:16]


def resolve_device(mcfg: ModelConfig, env: DistEnv) -> tuple[torch.device, torch.dtype]:
    """The device (this rank's GPU under a launcher) and precision the pipeline runs in."""
    if mcfg.device == "auto":
        device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    elif mcfg.device == "cuda":
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device(mcfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise config_lib.ConfigError(f"model.device: {mcfg.device} asked for, but torch sees no GPU")
    if mcfg.dtype == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, mcfg.dtype)


def load_pipeline(mcfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """The pipeline of ``mcfg.path`` via diffusers' ``from_pretrained``, local files only, made ready
    to run on ``device`` (see :func:`prepare`)."""
    from diffusers import AutoencoderTiny, DiffusionPipeline
    from diffusers.utils import is_accelerate_available
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # the stage's own bar is the one to watch
    try:
        pipe = DiffusionPipeline.from_pretrained(mcfg.path, dtype=dtype, variant=mcfg.variant or None,
                                                 safety_checker=None, requires_safety_checker=False,
                                                 low_cpu_mem_usage=is_accelerate_available(), local_files_only=True)
        tiny_vae = (AutoencoderTiny.from_pretrained(mcfg.tiny_vae, dtype=dtype, local_files_only=True)
                    if mcfg.tiny_vae else None)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model.path: diffusers cannot load {mcfg.path}: {first}") from None
    for part in ("unet", "vae", "tokenizer", "text_encoder"):
        if getattr(pipe, part, None) is None:
            raise ModelError(f"model.path: {mcfg.path} is a {type(pipe).__name__} without a {part}; "
                             "back-translation needs a text-to-image UNet pipeline (SD / SD-Turbo layout)")
    return prepare(pipe, mcfg, device, dtype, tiny_vae)


def prepare(pipe, mcfg: ModelConfig, device: torch.device, dtype: torch.dtype, tiny_vae=None):
    """Scheduler, lighter decoder, device and precision, memory layout and compilation, as configured.

    Shared with ``bench/backtranslate.py``, which builds its pipelines from configs instead."""
    import diffusers

    if mcfg.scheduler or mcfg.timestep_spacing:
        cls = type(pipe.scheduler)
        if mcfg.scheduler:
            cls = getattr(diffusers, mcfg.scheduler, None)
            if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
                raise config_lib.ConfigError(f"model.scheduler: {mcfg.scheduler!r} is not a diffusers scheduler class")
        extra = {"timestep_spacing": mcfg.timestep_spacing} if mcfg.timestep_spacing else {}
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    if tiny_vae is not None:
        pipe.vae = tiny_vae
    # from_pretrained already loaded the weights in `dtype`; pipelines built from configs (bench) are cast here.
    pipe.to(device) if pipe.unet.dtype == dtype and pipe.vae.dtype == dtype else pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    if device.type == "cuda" and mcfg.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    mode = compile_mode(mcfg, device)
    if mode != "none":
        # One shape per run (batches are padded), so nothing recompiles after the first batch.
        pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True, dynamic=False)
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, dynamic=False)
    return pipe


def compile_mode(mcfg: ModelConfig, device: torch.device) -> str:
    """The torch.compile mode ``model.compile`` means on ``device`` (auto: default on a GPU, else none)."""
    if mcfg.compile == "auto":
        return "default" if device.type == "cuda" else "none"
    return mcfg.compile


def sample_seed(key: str, seed: int) -> int:
    """The noise seed of one sample: a hash of its key and the config seed (63 bits)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode("utf-8")).digest()[:8], "big") >> 1


class Backtranslator:
    """A prepared pipeline that turns (key, prompt) pairs into images, ``batch_size`` rows per call."""

    def __init__(self, pipe, mcfg: ModelConfig, pcfg: PromptConfig, seed: int, batch_size: int):
        self.pipe, self.mcfg, self.seed, self.batch_size = pipe, mcfg, seed, batch_size
        self.cleaner = PromptCleaner(pcfg, pipe.tokenizer, _text_positions(pipe))
        self.unet_evaluations = 0  # UNet rows run for real (not padding) samples
        self._rows = 0
        pipe.unet.register_forward_pre_hook(self._count_rows, with_kwargs=True)

    def _count_rows(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        self._rows += sample.shape[0]

    def prompt_of(self, sample: dict[str, Any]) -> tuple[str | None, str]:
        """``(prompt, "")`` for a raw sample, or ``(None, why it is rejected)``."""
        raw = sample.get("txt")
        if raw is None:
            return None, "no txt field: nothing to back-translate"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"txt is not UTF-8 ({e})"
        prompt = self.cleaner(text)
        if prompt is None:
            return None, f"empty prompt after cleaning (txt {text[:80]!r})"
        return prompt, ""

    @torch.inference_mode()
    def generate(self, keys: list[str], prompts: list[str]) -> list[Any]:
        """One PIL image per prompt; at most ``batch_size`` prompts (padded to it, see the module docstring)."""
        n = len(prompts)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"generate: {n} prompts for batch_size {self.batch_size}")
        keys = keys + [keys[-1]] * (self.batch_size - n)
        prompts = prompts + [prompts[-1]] * (self.batch_size - n)
        # CPU generators: the starting noise is the same whatever device runs the model.
        generators = [torch.Generator("cpu").manual_seed(sample_seed(k, self.seed)) for k in keys]
        rows = self._rows
        m = self.mcfg
        images = self.pipe(prompt=prompts, negative_prompt=m.negative_prompt or None, num_inference_steps=m.steps,
                           guidance_scale=m.guidance_scale, height=m.height, width=m.width, generator=generators,
                           output_type="pt").images
        self.unet_evaluations += (self._rows - rows) * n // self.batch_size
        # To 8 bits where the images are, as diffusers' PIL output does it (float32 ×255, round half to
        # even), so only bytes cross to the host.
        pixels = (images[:n].float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(p) for p in pixels]


def _text_positions(pipe) -> int:
    """Tokens the text encoder reads (BOS and EOS included): 77 for every SD text encoder."""
    limit = pipe.tokenizer.model_max_length
    max_pos = getattr(pipe.text_encoder.config, "max_position_embeddings", None)
    return min(limit, max_pos) if max_pos else limit


def jpeg_bytes(image, quality: int) -> bytes:
    """A PIL image as JPEG bytes (PIL's encoder is deterministic for identical pixels)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


_JPEG_POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="jpeg")


def encode_jpegs(images: list, quality: int) -> list[bytes]:
    """JPEG bytes of each image, encoded in threads (PIL releases the GIL while it encodes): at
    100 images/s of 512², one core would spend a third of its time on JPEG alone."""
    return list(_JPEG_POOL.map(lambda im: jpeg_bytes(im, quality), images))


# -------------------------------------------------------------------------------------------- prompts

_URL = re.compile(r"(?:\bhttps?://|\bwww\.)\S+", re.IGNORECASE)
# Retweet markers anywhere ("RT @a : RT @b : text"); shard text has tokens joined by spaces, hence \s*.
_RETWEET = re.compile(r"\bRT\s+@\w+\s*:?", re.IGNORECASE)
_MENTION = re.compile(r"(?<![\w@])@(\w+)")
_HASHTAG = re.compile(r"(?<![\w&])#(\w+)")
# Pictographs, dingbats, symbols, flags, and what joins or modifies them (ZWJ, variation selectors,
# keycap, tags); the joiners only go when next to an emoji, so scripts that use ZWJ are left alone.
_EMOJI_CHARS = ("\U0001F000-\U0001FAFF\u2600-\u27BF\u2300-\u23FF\u2B00-\u2BFF\u2190-\u21FF\u3030\u303D\u3297\u3299"
                "\u25A0-\u25FF\u2934\u2935")
_JOINERS = "\u200D\uFE0E\uFE0F\u20E3\U000E0020-\U000E007F"
_EMOJI = re.compile(f"[{_JOINERS}]*[{_EMOJI_CHARS}](?:[{_EMOJI_CHARS}{_JOINERS}])*")
_KEYCAP = re.compile("[\uFE0E\uFE0F\u20E3]")
_SPACE_BEFORE = re.compile(r"\s+([,.!?;:%)\]}])")
_SPACE_AFTER = re.compile(r"([(\[{])\s+")
_SPACES = re.compile(r"\s+")


class PromptCleaner:
    """Post text → diffusion prompt, per :class:`PromptConfig`, cut to the text encoder's length."""

    def __init__(self, cfg: PromptConfig, tokenizer, positions: int):
        self.cfg, self.tokenizer = cfg, tokenizer
        overhead = len(tokenizer(cfg.template.format(text=""), add_special_tokens=False).input_ids)
        room = positions - 2 - overhead  # BOS and EOS take two positions
        self.budget = min(room, cfg.max_tokens) if cfg.max_tokens else room
        if self.budget < 1:
            raise config_lib.ConfigError(f"prompt.template: leaves no room for the text ({overhead} tokens of "
                                         f"{positions - 2})")

    def clean(self, text: str) -> str:
        """The cleaned text, before the template and the token cut."""
        c = self.cfg
        if c.unescape_html:
            text = html.unescape(text)
        if c.strip_urls:
            text = _URL.sub(" ", text)
        if c.strip_retweet:
            text = _RETWEET.sub(" ", text)
        if c.mentions != "keep":
            text = _MENTION.sub(r"\1" if c.mentions == "word" else " ", text)
        if c.hashtags != "keep":
            text = _HASHTAG.sub(r"\1" if c.hashtags == "word" else " ", text)
        if c.strip_emoji:
            text = _KEYCAP.sub("", _EMOJI.sub(" ", text))
        text = _SPACES.sub(" ", text).strip()
        if c.detokenize:
            text = _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", text))
        # What removals leave at the edges ("RT @a : : text", "text via") carries nothing.
        return text.strip(" :;,-|")

    def cut(self, text: str) -> str:
        """``text`` cut after its ``budget``-th token of the pipeline's own tokenizer."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc.input_ids) <= self.budget:
            return text
        return text[: enc.offset_mapping[self.budget - 1][1]].rstrip()

    def __call__(self, text: str) -> str | None:
        """The prompt for ``text``, or None when nothing is left of it."""
        text = self.clean(text)
        if not text:
            return None
        return self.cfg.template.format(text=self.cut(text))
