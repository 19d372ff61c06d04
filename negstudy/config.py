"""Typed config schemas, registered in Hydra's ConfigStore: the schema only.

Hydra type-checks every group against these dataclasses when it composes the config;
:func:`negstudy.checks.validate` then checks meaning before any model is loaded, and
:func:`negstudy.targets.build` makes each group's object from its ``_target_``. A group's ``name``
is a display label (tables, reports, W&B), never a constructor argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from negstudy.critical import HIT_LIFT


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
class EvaluatorConfig:
    _target_: str = "negstudy.evaluators.NoEvaluator"  # a factory taking the node's keys and world=
    name: str = "none"


@dataclass
class JudgeConfig(EvaluatorConfig):
    """A vision-language judge behind any OpenAI-compatible endpoint (negstudy.evaluators.judge)."""

    _target_: str = "negstudy.evaluators.judge.JudgeEvaluator.build"
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

    _target_: str = "negstudy.evaluators.clip.ClipEvaluator.build"
    name: str = "clip"
    path: str = "auto"  # auto = builtin:shapes_clip on the shapes model, openai/clip-vit-large-patch14 otherwise
    batch_size: int = 64
    local_files_only: bool = False
    margin: float = 0.01  # presence on other models: unsure while |cos(named) - cos("a photo")| <= margin


@dataclass
class OwlConfig(EvaluatorConfig):
    """Open-vocabulary detection with OWLv2 (negstudy.evaluators.owl)."""

    _target_: str = "negstudy.evaluators.owl.OwlEvaluator.build"
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
    name: str = "single"  # display label (W&B group, report); single: one generation job
    study: Any = None  # null: one generation job; else {_target_: negstudy.studies.<name>.run, _partial_: true} (negstudy.studies)
    stride: int = 3  # start steps k = 0, stride, 2 stride, ... of the delayed negative
    screen: bool = True  # screen seeds with the reader (negstudy's protocol); false: every seed of `seeds`, drawn or not (the paper's)
    screen_seeds: int = 16  # seeds screened per pair for the concept to appear without the negative
    max_seeds: int = 4  # seeds per pair entering the start-step sweep
    ratio_seeds: Optional[int] = None  # critical_step: seeds per pair in the k = 0 run (the ratio); null: max_seeds
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
    hit_lift: float = HIT_LIFT  # attention reaches the region: mass there >= hit_lift x the region's share (negstudy.critical)
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
    schedule: Any = MISSING  # {_target_: a negstudy.schedules.Schedule, name, its parameters}: checked by negstudy.checks
    guidance: Any = None  # a guider (negstudy.guidance), built by hydra.utils.instantiate from its _target_; null = cfg
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
    cs.store(name="model_schema", node=ModelConfig)
    cs.store(name="dataset_schema", node=DatasetConfig)
    cs.store(name="evaluator_schema", node=EvaluatorConfig)
    cs.store(name="judge_schema", node=JudgeConfig)
    cs.store(name="clip_schema", node=ClipConfig)
    cs.store(name="owl_schema", node=OwlConfig)
    cs.store(name="logger_schema", node=LoggerConfig)
    cs.store(name="sweep_schema", node=SweepConfig)
