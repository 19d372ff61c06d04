"""Typed config schemas (registered in Hydra's ConfigStore) and the semantic checks.

Hydra type-checks every group against these dataclasses when it composes the config;
:func:`validate` then checks meaning (ranges, names, paths) before any model is loaded, and
raises :class:`ConfigError` whose one-line message names the key, the bad value and what is
allowed. The app prints that line and exits with status 2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from negstudy.datasets import pairs_of
from negstudy.errors import ConfigError
from negstudy.schedules import SCHEDULES, make_schedule

SCHEDULERS = ("default", "pndm", "ddim", "euler", "dpmpp")
DTYPES = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
RECORDABLE = ("eps", "latents")
SWEEPS = ("single", "critical_step", "reverse_activation", "mechanisms", "attention_maps", "removal")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BUILTIN_PREFIX = "builtin:"


@dataclass
class ModelConfig:
    name: str = MISSING
    path: str = MISSING  # hub id ("org/name"), a local diffusers directory, or builtin:<name>
    scheduler: str = "default"  # default = the checkpoint's own scheduler config
    dtype: str = "auto"  # auto = fp16 on CUDA, fp32 elsewhere
    revision: Optional[str] = None
    variant: Optional[str] = None
    local_files_only: bool = False
    allow_pickle: bool = False  # load .bin/.ckpt weights only when the user opts in


@dataclass
class PromptPair:
    prompt: str = MISSING
    negative: str = MISSING
    category: str = "object"  # object (a noun the image may contain) or attribute (a global adjective)


@dataclass
class DatasetConfig:
    name: str = MISSING
    pairs: list[PromptPair] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)  # prompts without a negative (the removal sweep)
    path: Optional[str] = None  # a CSV / JSONL / TXT file of pairs, instead of `pairs`
    format: Optional[str] = None  # null: `path` holds pairs; a caption format (negstudy.captions) for the removal sweep
    limit: Optional[int] = None
    shard: int = 0  # this job takes items shard, shard + shards, ... (after limit): a multirun axis
    shards: int = 1


@dataclass
class ScheduleConfig:
    name: str = MISSING


@dataclass
class FromStepConfig(ScheduleConfig):
    start: Union[int, float] = 0


@dataclass
class FirstKConfig(ScheduleConfig):
    k: Union[int, float] = 0


@dataclass
class WindowConfig(ScheduleConfig):
    start: Union[int, float] = 0
    end: Union[int, float] = 0


@dataclass
class InjectConfig(ScheduleConfig):
    steps: list[Union[int, float]] = field(default_factory=list)
    g: float = 10.0


@dataclass
class EvaluatorConfig:
    name: str = "none"


@dataclass
class JudgeConfig(EvaluatorConfig):
    """A vision-language judge behind any OpenAI-compatible endpoint (negstudy.evaluators.judge)."""

    name: str = "judge"
    base_url: Optional[str] = None  # null = OpenAI's API; e.g. http://localhost:8000/v1 for vLLM / ollama
    model: str = "gpt-4o"  # the paper used gpt-4-vision-preview (retired)
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this environment variable ...
    api_key_file: Optional[str] = None  # ... or from this file; never from the config itself
    labels: str = "coco"  # objects the judge may name: coco, shapes, or a one-label-per-line file
    cache_dir: str = "~/.cache/negstudy/judge"  # answers keyed by endpoint, model, task, prompt version, images
    concurrency: int = 4  # requests in flight
    requests_per_minute: float = 60.0
    max_retries: int = 4  # on 429 / 5xx / timeouts, with exponential backoff
    timeout_s: float = 60.0
    image_detail: str = "low"  # low | high | auto (OpenAI's image detail)
    temperature: Optional[float] = 0.0  # null = the endpoint's default (reasoning models accept no other)
    price_input_per_mtok: float = 2.5  # USD per million tokens, for the cost column
    price_output_per_mtok: float = 10.0


@dataclass
class ClipConfig(EvaluatorConfig):
    """CLIP score with transformers' CLIPModel (negstudy.evaluators.clip)."""

    name: str = "clip"
    path: str = "auto"  # auto = builtin:shapes_clip on the shapes model, openai/clip-vit-large-patch14 otherwise
    batch_size: int = 64
    local_files_only: bool = False


@dataclass
class OwlConfig(EvaluatorConfig):
    """Open-vocabulary detection with OWLv2 (negstudy.evaluators.owl)."""

    name: str = "owl"
    path: str = "google/owlv2-base-patch16-ensemble"
    labels: str = "coco"
    threshold: float = 0.3  # a box counts when its best query's score (sigmoid) is above this
    batch_size: int = 4
    local_files_only: bool = False
    device: str = "auto"  # auto = cuda > mps > cpu


@dataclass
class LoggerConfig:
    name: str = "none"
    project: str = "negstudy"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    tags: list[str] = field(default_factory=list)


@dataclass
class SweepConfig:
    name: str = "single"  # single: one generation job; critical_step: the study of negstudy.studies.critical_step
    stride: int = 3  # start steps k = 0, stride, 2 stride, ... of the delayed negative
    screen_seeds: int = 16  # seeds screened per pair for the concept to appear without the negative
    max_seeds: int = 4  # seeds per pair entering the start-step sweep
    min_seeds: int = 2  # pad with seeds lacking the concept (ratio curves only) up to this many
    layers: str = "down_up"  # cross-attention layers recorded: down_up (the paper's), all
    variant: str = "all_tokens"  # strength-ratio variant of the report: all_tokens (the paper's code), word_tokens


@dataclass
class RemovalConfig:
    """The removal sweep (negstudy.studies.removal, PAPER.md section 6). Step values are UNet-call
    indices of a loop of ``window_of`` calls, scaled as fractions to the model's loop."""

    window: list[int] = field(default_factory=lambda: [5, 15])  # the paper's fixed window, inclusive
    window_of: int = 31  # the loop length the step values above refer to (SD's PNDM, 30 steps)
    fallback_start: int = 6  # adaptive start when attention never reaches the region (the author's code: 6)
    length: int = 5  # steps of the adaptive method's first window
    extend: int = 5  # steps added to its end per regeneration
    max_regenerations: int = 4  # bounded: at most 1 + this many adaptive images per object
    hit_lift: float = 2.0  # attention reaches the region: mass there >= hit_lift x the region's share
    max_objects: int = 3  # objects removed per original image
    protocol: str = "negstudy"  # negstudy | paper (the author's object selection, image order, counting rule, +1-step window)
    drop: list[str] = field(default_factory=lambda: ["person"])  # labels never targeted (the paper drops people)
    labels: Optional[str] = None  # label set objects are found among; null: shapes on the shapes world, else coco


@dataclass
class AttentionConfig:
    """How cross-attention is reduced (negstudy.attention). daam: the author's definitions as well
    (bicubic per head, clamped, every (layer, head) map alike): ratio variants *_daam and a
    mass_in_region_daam column beside negstudy's."""

    maps: str = "negstudy"  # negstudy | daam


@dataclass
class NegstudyConfig:
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    schedule: Any = MISSING
    evaluator: Any = MISSING  # one of the evaluator schemas: EvaluatorConfig, JudgeConfig, ClipConfig, OwlConfig
    logger: LoggerConfig = MISSING
    sweep: SweepConfig = field(default_factory=SweepConfig)
    steps: int = 30
    guidance_scale: float = 7.5
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 8
    height: Optional[int] = None
    width: Optional[int] = None
    device: str = "auto"
    three_branches: bool = False  # compute eps_pos, eps_neg and eps_empty at every step
    fixed_rows: Any = "auto"  # rows per conv/linear call (batch-size-independent bits): auto, 0 = off, or a number
    autocast: Optional[str] = None  # the UNet's compute dtype: null (its own) or bf16 (faster on CPUs with BF16, other images)
    record: list[str] = field(default_factory=list)  # per-step tensors the job keeps: eps, latents
    save_images: bool = True
    resume: bool = True  # skip a job whose complete results exist (same config hash): negstudy.jobs
    job_store: str = "outputs/.jobs"  # where finished jobs register (relative to the launch directory)
    removal: RemovalConfig = field(default_factory=RemovalConfig)
    mechanisms: Any = None  # settings of the mechanisms study (negstudy.studies.mechanisms): thetas, draws, energy, ...
    attention: AttentionConfig = field(default_factory=AttentionConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="negstudy_schema", node=NegstudyConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="dataset", name="dataset_schema", node=DatasetConfig)
    cs.store(group="evaluator", name="evaluator_schema", node=EvaluatorConfig)
    cs.store(group="evaluator", name="judge_schema", node=JudgeConfig)
    cs.store(group="evaluator", name="clip_schema", node=ClipConfig)
    cs.store(group="evaluator", name="owl_schema", node=OwlConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    cs.store(group="sweep", name="sweep_schema", node=SweepConfig)
    for name, node in [
        ("never", ScheduleConfig),
        ("always", ScheduleConfig),
        ("from_step", FromStepConfig),
        ("first_k", FirstKConfig),
        ("window", WindowConfig),
        ("inject", InjectConfig),
    ]:
        cs.store(group="schedule", name=f"{name}_schema", node=node)


def _allowed(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: allowed values are {', '.join(map(str, allowed))}")


def builtin_model_dir(name: str) -> Path:
    """Directory of a model shipped inside the package (``builtin:shapes``)."""
    return Path(__file__).parent / "models" / name


def resolve_model_path(path: str, *, key: str = "model.path", marker: str = "model_index.json",
                       kind: str = "", hint: str = "a local directory written by save_pretrained or a hub id such as "
                                                  "stabilityai/stable-diffusion-2-base") -> tuple[str, bool]:
    """(path or hub id to hand to ``from_pretrained``, whether it is local). ``marker`` is the file
    that makes a directory a model (model_index.json for diffusers, config.json for transformers);
    ``kind`` names the model in messages ("CLIP "); ConfigError names ``key``."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        local = builtin_model_dir(name)
        if not (local / marker).exists():
            shipped = sorted(p.parent.name for p in local.parent.glob(f"*/{marker}")) if local.parent.exists() else []
            raise ConfigError(f"{key}={path!r}: no shipped {kind}model of that name (shipped: {', '.join(shipped) or 'none'})")
        return str(local), True
    expanded = Path(path).expanduser()
    if path.startswith(("/", "./", "../", "~")) or expanded.exists():
        if not (expanded / marker).exists():
            raise ConfigError(f"{key}={path!r}: not a {kind or 'diffusers '}model directory (no {marker} there); give {hint}")
        return str(expanded), True
    if not HUB_ID.match(path):
        raise ConfigError(f"{key}={path!r}: neither an existing local directory nor a hub id of the form org/name")
    return path, False


def validate(cfg: DictConfig) -> None:
    """Semantic checks that need no model; raises ConfigError (one line)."""
    if cfg.steps < 1:
        raise ConfigError(f"steps={cfg.steps}: must be >= 1")
    if not cfg.guidance_scale > 0:
        raise ConfigError(f"guidance_scale={cfg.guidance_scale}: must be > 0")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size}: must be >= 1")
    if not cfg.seeds:
        raise ConfigError("seeds=[]: give at least one seed")
    for key in ("height", "width"):
        v = cfg.get(key)
        if v is not None and (v < 8 or v % 8):
            raise ConfigError(f"{key}={v}: must be a positive multiple of 8")
    _allowed("device", cfg.device, DEVICES)
    if cfg.fixed_rows != "auto" and not (isinstance(cfg.fixed_rows, int) and cfg.fixed_rows >= 0):
        raise ConfigError(f"fixed_rows={cfg.fixed_rows!r}: allowed values are auto, 0 (off) or a positive number of rows")
    if cfg.get("autocast") is not None:
        _allowed("autocast", cfg.autocast, ("bf16",))
    for item in cfg.record:
        _allowed("record", item, RECORDABLE)
    _allowed("model.scheduler", cfg.model.scheduler, SCHEDULERS)
    _allowed("model.dtype", cfg.model.dtype, DTYPES)
    resolve_model_path(cfg.model.path)
    if cfg.dataset.limit is not None and cfg.dataset.limit < 1:
        raise ConfigError(f"dataset.limit={cfg.dataset.limit}: must be >= 1 or null")
    if not 0 <= cfg.dataset.shard < cfg.dataset.shards:
        raise ConfigError(f"dataset.shard={cfg.dataset.shard}: must be in 0..dataset.shards-1 (dataset.shards={cfg.dataset.shards})")
    if not pairs_of(cfg.dataset):
        raise ConfigError(f"dataset.shard={cfg.dataset.shard}: this shard of {cfg.dataset.shards} is empty (dataset {cfg.dataset.name!r} "
                          "has fewer items than shards)")
    _allowed("logger.mode", cfg.logger.mode, ("offline", "online", "disabled"))
    _allowed("logger.name", cfg.logger.name, ("none", "wandb"))
    from negstudy.tracking import check as check_tracking

    check_tracking(cfg)
    _allowed("sweep.name", cfg.sweep.name, SWEEPS)
    _allowed("sweep.layers", cfg.sweep.layers, ("down_up", "all"))
    _allowed("attention.maps", cfg.attention.maps, ("negstudy", "daam"))
    _allowed("sweep.variant", cfg.sweep.variant, ("all_tokens", "word_tokens", "all_tokens_daam", "word_tokens_daam"))
    if cfg.sweep.variant.endswith("_daam") and cfg.attention.maps != "daam":
        raise ConfigError(f"sweep.variant={cfg.sweep.variant!r}: the author's ratio is recorded only with attention.maps=daam "
                          f"(attention.maps={cfg.attention.maps!r})")
    _allowed("mechanisms.energy", OmegaConf.select(cfg, "mechanisms.energy", default="negstudy"), ("negstudy", "paper", "both"))
    for key in ("stride", "screen_seeds", "max_seeds"):
        if cfg.sweep[key] < 1:
            raise ConfigError(f"sweep.{key}={cfg.sweep[key]}: must be >= 1")
    n = _n_calls_for(cfg)
    schedule_from_config(cfg.schedule).plan(n)
    if cfg.sweep.name == "removal":
        _validate_removal(cfg.removal)
    from negstudy.evaluators import check_evaluator

    check_evaluator(cfg.evaluator)


def _validate_removal(r) -> None:
    if len(r.window) != 2 or not 0 <= r.window[0] <= r.window[1] < r.window_of:
        raise ConfigError(f"removal.window={list(r.window)}: give [start, end] with 0 <= start <= end < removal.window_of={r.window_of}")
    if not 0 <= r.fallback_start < r.window_of:
        raise ConfigError(f"removal.fallback_start={r.fallback_start}: must be in 0..{r.window_of - 1}")
    _allowed("removal.protocol", r.protocol, ("negstudy", "paper"))
    for key in ("length", "extend", "max_objects"):
        if r[key] < 1:
            raise ConfigError(f"removal.{key}={r[key]}: must be >= 1")
    if r.max_regenerations < 0:
        raise ConfigError(f"removal.max_regenerations={r.max_regenerations}: must be >= 0")
    if r.labels is not None:
        from negstudy.labels import label_set

        label_set(r.labels, "removal.labels")


def schedule_from_config(node: DictConfig):
    params = OmegaConf.to_container(node, resolve=True)
    name = params.pop("name", None)
    if name not in SCHEDULES:
        raise ConfigError(f"schedule.name={name!r}: allowed values are {', '.join(SCHEDULES)}")
    return make_schedule(name, **params)


def _n_calls_for(cfg: DictConfig) -> int:
    """UNet calls of the loop, from the scheduler config alone (no weights are loaded)."""
    from negstudy.models import load_scheduler
    from negstudy.schedules import n_calls

    try:
        scheduler = load_scheduler(cfg.model)
    except ConfigError:
        raise
    except Exception:  # remote checkpoint not reachable yet: the loader reports it properly later
        return cfg.steps + (1 if cfg.model.scheduler in ("default", "pndm") else 0)
    return n_calls(scheduler, cfg.steps)
