"""negstudy's denoising loop: one trajectory per image, the negative prompt scheduled step by step.

Shapes: B images per call; latents ``(B, C, h, w)`` (C=4, h=H/8 for Stable Diffusion; C=3, h=H for
the pixel-space shapes model); noise predictions have the latents' shape. Step indices are
UNet-call indices (see :mod:`negstudy.schedules`).

At every step the loop makes ONE batched UNet call holding, for each image, the positive
branch and the unconditional-side branch(es) its schedule needs (negative, empty or both);
with ``three_branches=True`` all three are computed at every step so analyses can compare
them on the same trajectory. Batch rows are ordered [negative..., empty..., positive...], which
for ``always`` is exactly diffusers' ``[negative, positive]`` order, so images match
``StableDiffusionPipeline`` to float precision.

Batch-size independence: CPU kernels (oneDNN convolutions, BLAS GEMMs) choose their algorithm,
hence their rounding, from the number of rows of a call, so an image's noise prediction changed
in its last bits with the number of images sharing its batch (PNGs by one grey level). On the CPU
every convolution and linear layer of the UNet therefore runs on blocks of exactly ``fixed_rows``
rows (:class:`FixedRows`) and the VAE decodes one image at a time: an image's bits depend on its
own inputs only, whatever the batch, the lanes or the order.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from negstudy.guidance import CFG, Guidance, GuideInput, Guider
from negstudy.schedules import StepPlan

BRANCHES = ("negative", "empty", "positive")
AUTOCAST = {None: None, "bf16": torch.bfloat16}  # NegativeSampler(autocast=...): the UNet's compute dtype
# A block of UNet rows on the CPU should hold about this much work (latent positions x the first
# block's channels): 8 rows of the shapes model (32 x 32 x 32).
CPU_BLOCK_WORK = 8 * 32 * 32 * 32

log = logging.getLogger("negstudy")
T = TypeVar("T")


@dataclass
class StepState:
    """What hooks see after the UNet call of step ``step`` and before the scheduler update.

    latents: x_t, (B, C, h, w). eps: branch -> (B, C, h, w), NaN in the rows of images for
    which that branch was not computed at this step. guided: the combined prediction the
    scheduler receives. branch: per image, "negative", "empty" or "inject" (see StepPlan.branch).
    uncond / direction: per image, what the guider built ``guided`` from (``guided = uncond + s * direction``,
    :class:`negstudy.guidance.Guidance`): the prediction opposite the prompt and the effective direction.
    snapshot(image): the image's :class:`Snapshot` at this step (x_t and the scheduler's state before
    this step's update), from which ``Batch.resume`` continues it.
    """

    step: int
    timestep: int
    latents: torch.Tensor
    eps: dict[str, torch.Tensor]
    guided: torch.Tensor
    branch: list[str]
    snapshot: Callable[[int], "Snapshot"] | None = None
    uncond: torch.Tensor | None = None
    direction: torch.Tensor | None = None


@dataclass
class Snapshot:
    """One image's trajectory at the start of step ``step``: enough to continue it from there.

    latents: x_t (1, C, h, w). rows: the scheduler's per-sample state for this image (e.g. PNDM's
    past noise predictions ``ets`` and ``cur_sample``), each (1, C, h, w) or a list of them; shared:
    its other attributes (``counter``, timesteps...). prefix: the plan's negative flags and
    injection gains on steps 0..step-1 (what made these latents). generator: the state of the
    image's noise stream (stochastic schedulers). Cloned, so a snapshot costs its tensors' bytes
    (shapes model with PNDM: about 6 x 12 KB).
    """

    step: int
    prompt: str
    negative: str
    seed: int
    prefix: tuple[tuple[bool, ...], tuple[float, ...]]
    latents: torch.Tensor
    rows: dict
    shared: dict
    generator: torch.Tensor | None
    settings: tuple
    guider_state: dict = field(default_factory=dict)


class Hook:
    """Per-step observer of the loop; override what you need. Hooks must not modify tensors."""

    def on_start(self, sampler: "NegativeSampler", batch: "Batch") -> None: ...

    def before_unet(self, step: int, rows: list[tuple[int, str]]) -> None:
        """Called before the UNet call; ``rows[j] = (image index, branch)`` of batch row j."""

    def on_step(self, state: StepState) -> None: ...

    def on_end(self, images: np.ndarray) -> None: ...

    def close(self) -> None:
        """Always called when ``generate`` returns or raises: release what ``on_start`` took."""


class KeepStates(Hook):
    """Keeps each image's :class:`Snapshot` at the given steps: ``states[image][step]``.

    ``drop(images)`` frees those no longer wanted (e.g. screened images without the concept).
    """

    def __init__(self, steps: Sequence[int]):
        self.steps = set(int(k) for k in steps)
        self.states: dict[int, dict[int, Snapshot]] = {}

    def on_step(self, state: StepState) -> None:
        if state.step in self.steps:
            for b in range(state.latents.shape[0]):
                self.states.setdefault(b, {})[state.step] = state.snapshot(b)


@dataclass
class Batch:
    """B images to generate: texts, seeds and one StepPlan per image."""

    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    plans: list[StepPlan]
    meta: list[dict] = field(default_factory=list)
    # continue each image from its Snapshot instead of x_T: steps before it cost nothing; images of later
    # snapshots join the call at their own step (a call with hooks: one step for all)
    resume: list[Snapshot] | None = None

    def __post_init__(self):
        n = len(self.prompts)
        for name in ("negative_prompts", "seeds", "plans") + (("resume",) if self.resume is not None else ()):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Batch.{name} has {len(getattr(self, name))} entries for {n} prompts")

    def __len__(self):
        return len(self.prompts)


class NegativeSampler:
    """Step-scheduled negative-prompt sampling over a diffusers pipeline's components.

    pipe: a loaded Stable Diffusion pipeline (unet, text_encoder, tokenizer, scheduler, vae or None
    for pixel-space models). The sampler does not call the pipeline's ``__call__``.

    fixed_rows: rows of every convolution / linear call of the UNet (:class:`FixedRows`; the VAE
    then decodes image by image), which makes images independent of the batch size; "auto" is
    :func:`cpu_fixed_rows` on the CPU and 0 elsewhere (whole batches, one kernel call per layer:
    fastest on GPUs, where the bits then depend on the batch as in diffusers).

    autocast: None (the UNet in its own dtype) or "bf16": the UNet's matrix products and
    convolutions in bfloat16 (``torch.autocast``), everything else (guidance, scheduler, decoding)
    in float32. Measured on the shapes model on a 2-core AVX-512-BF16 CPU: 1.6-1.9x the rows per
    second; its noise predictions differ from float32's by up to ~3e-2, so images differ slightly
    from the default's (and from diffusers'); with fixed rows they are still byte-identical
    whatever the batch, lanes or branching.

    guider: HOW the negative acts (:mod:`negstudy.guidance`; default :class:`~negstudy.guidance.CFG`,
    the paper's); the plans say WHEN. It declares the branches each lane needs and combines them.
    """

    def __init__(self, pipe, *, steps: int = 30, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, three_branches: bool = False, progress: bool = False,
                 fixed_rows: int | str = "auto", autocast: str | None = None, guider: Guider | None = None):
        self.pipe = pipe
        self.unet, self.scheduler, self.vae = pipe.unet, pipe.scheduler, getattr(pipe, "vae", None)
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.three_branches = three_branches
        self.progress = progress
        scale = pipe.vae_scale_factor if self.vae is not None else 1
        self.height = height or self.unet.config.sample_size * scale
        self.width = width or self.unet.config.sample_size * scale
        self.latent_shape = (self.unet.config.in_channels, self.height // scale, self.width // scale)
        self._embeds: dict[str, torch.Tensor] = {}
        self.scheduler.set_timesteps(steps)
        self.n_calls = len(self.scheduler.timesteps)
        if fixed_rows == "auto":
            fixed_rows = cpu_fixed_rows(self.unet, self.latent_shape) if self.device.type == "cpu" else 0
        if not isinstance(fixed_rows, int) or fixed_rows < 0:
            raise ValueError(f"fixed_rows={fixed_rows!r}: expected 'auto', 0 (off) or a number of rows")
        self.fixed_rows = fixed_rows
        if autocast not in AUTOCAST:
            raise ValueError(f"autocast={autocast!r}: expected one of {list(AUTOCAST)}")
        self.autocast = autocast
        self.guider = guider if guider is not None else CFG()
        self.guider.bind(self)

    @property
    def device(self) -> torch.device:
        # the first parameter's device, not diffusers' ModelMixin.device: that walks every submodule (its
        # group-offload check, ~1 ms on a CPU), and the denoising loop asks several times a step
        return next(self.unet.parameters()).device

    @property
    def xl(self) -> bool:
        """Whether the UNet is SDXL's: conditioned on pooled text embeddings and size/crop time ids too."""
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    def encode(self, text: str | None) -> torch.Tensor:
        """Text embeddings (1, tokens, dim) of one prompt, cached: each text is encoded once.

        None: the empty branch, i.e. what the pipeline uses without a negative prompt: the
        embeddings of "" (SD 1/2; SDXL without ``force_zeros_for_empty_prompt``) or zeros (SDXL's
        default). SDXL: both text encoders' penultimate hidden states, concatenated (dim 2048 for
        SDXL base), as ``StableDiffusionXLPipeline.encode_prompt``.
        """
        return self._encode(text)[0]

    def encode_pooled(self, text: str | None) -> torch.Tensor:
        """SDXL: the second text encoder's pooled, projected embedding (1, projection_dim) of one prompt (None: as :meth:`encode`)."""
        if not self.xl:
            raise ValueError("encode_pooled: only SDXL UNets take pooled text embeddings")
        return self._encode(text)[1]

    def _encode(self, text: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if text is None and not (self.xl and self.pipe.config.force_zeros_for_empty_prompt):
            text = ""
        if text not in self._embeds:
            with torch.no_grad():
                if not self.xl:
                    emb, pooled = self.pipe.encode_prompt(text, self.device, 1, False)[0], None
                elif text is None:  # diffusers' zero_out_negative_prompt
                    emb, pooled = (torch.zeros_like(x) for x in self._encode(""))
                else:
                    emb, _, pooled, _ = self.pipe.encode_prompt(text, device=self.device, num_images_per_prompt=1,
                                                                do_classifier_free_guidance=False)
            self._embeds[text] = (emb, pooled)
        return self._embeds[text]

    def time_ids(self, rows: int) -> torch.Tensor:
        """SDXL's added time ids (rows, 6): original size, crop (0, 0) and target size, all (height, width)."""
        if getattr(self, "_time_ids", None) is None:
            emb, pooled = self._encode("")
            te2 = getattr(self.pipe, "text_encoder_2", None)
            dim = te2.config.projection_dim if te2 is not None else int(pooled.shape[-1])
            size = (self.height, self.width)
            self._time_ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=emb.dtype,
                                                         text_encoder_projection_dim=dim).to(self.device)
        return self._time_ids.repeat(rows, 1)

    def added_cond(self, texts: Sequence[str | None]) -> dict[str, torch.Tensor] | None:
        """The UNet's ``added_cond_kwargs`` for one row per text (None: the empty branch); None for SD 1/2.

        text_embeds: (B, projection_dim) pooled embeddings; time_ids: (B, 6).
        """
        if not self.xl:
            return None
        return {"text_embeds": torch.cat([self.encode_pooled(t) for t in texts]), "time_ids": self.time_ids(len(texts))}

    def initial_latents(self, seeds: Sequence[int], generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """x_T for each seed, drawn from a CPU generator per image (as diffusers does with a list); given
        ``generators`` (one per seed, seeded with it), draws from them, so they go on with the stream."""
        if generators is None:
            generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        latents = randn_tensor((len(seeds), *self.latent_shape), generator=generators, device=self.device,
                               dtype=self.unet.dtype)
        return latents * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def generate(self, batch: Batch, hooks: Sequence[Hook] = ()) -> np.ndarray:
        """Images (B, H, W, 3) float32 in [0, 1].

        Shared prefixes: images with the same prompt, negative prompt and seed whose schedules agree
        on steps 0..i-1 are ONE lane of the UNet batch up to step i; where their schedules diverge the
        lane is split (its latents and the scheduler's per-sample state are copied). A sweep over
        every start step of a delayed negative thus costs about half of running each schedule alone,
        with the same images. Hooks see per-image tensors; ``before_unet`` rows name each lane by
        its first image.
        """
        # 1. check inputs
        for j, plan in enumerate(batch.plans):
            if len(plan.negative) != self.n_calls:
                raise ValueError(f"plan of image {j} covers {len(plan.negative)} steps; the loop makes {self.n_calls} UNet calls")
        try:
            for hook in hooks:
                hook.on_start(self, batch)
            images = self._loop(batch, hooks)
            for hook in hooks:
                hook.on_end(images)
            return images
        finally:
            for hook in hooks:
                hook.close()

    def _loop(self, batch: Batch, hooks: Sequence[Hook]) -> np.ndarray:
        # 2. lanes: one per distinct (prompt, negative, seed[, snapshot]); encode each text once
        resume = batch.resume
        image_start = self._check_resume(batch) if resume is not None else [0] * len(batch)
        keys = [(p, q, x) + ((id(resume[b]),) if resume is not None else ())
                for b, (p, q, x) in enumerate(zip(batch.prompts, batch.negative_prompts, batch.seeds))]
        lanes: list[list[int]] = []
        first: dict[tuple, int] = {}
        for b in sorted(range(len(batch)), key=lambda b: image_start[b]):  # lanes in the order they join
            if keys[b] not in first:
                first[keys[b]] = len(lanes)
                lanes.append([])
            lanes[first[keys[b]]].append(b)  # a lane's images share one snapshot: they stay in batch order
        start = image_start[lanes[0][0]]
        if hooks and any(image_start[lane[0]] != start for lane in lanes):
            raise ValueError("Batch.resume: snapshots of several steps join the loop as it reaches them; hooks see "
                             "every image at every step, so a call with hooks continues from one step")
        # lanes of snapshots of later steps wait and join the loop at their step (their prefix is not recomputed)
        waiting = [lane for lane in lanes if image_start[lane[0]] != start]
        lanes = lanes[: len(lanes) - len(waiting)]
        embeds, pooled = self._lane_embeds([keys[lane[0]] for lane in lanes])
        # 3. timesteps
        self.scheduler.set_timesteps(self.steps, device=self.device)
        timesteps = self.scheduler.timesteps
        # 4. initial latents and scheduler extras (eta=0 for DDIM, per-image generators for stochastic ones):
        # as in diffusers, each image's generator draws x_T and then goes on to draw the per-step noise
        seeds = [keys[lane[0]][2] for lane in lanes]
        generators = [torch.Generator("cpu").manual_seed(int(x)) for x in seeds]
        extra = self.pipe.prepare_extra_step_kwargs(generators, 0.0)
        if resume is None:
            latents = self.initial_latents(seeds, generators)
            self.guider.start(len(lanes), self.device)
        else:
            latents = self._restore([resume[lane[0]] for lane in lanes], extra)
        s = self.guidance_scale
        lane_of = self._lane_of(lanes, len(batch))
        # 5. the denoising loop
        for i, t in enumerate(tqdm(timesteps, desc="steps", leave=False, disable=not self.progress)):
            if i < start:
                continue
            joining = [lane for lane in waiting if image_start[lane[0]] == i]
            if joining:
                latents = self._join(latents, [resume[lane[0]] for lane in joining], extra)
                more, more_pooled = self._lane_embeds([keys[lane[0]] for lane in joining])
                embeds = {k: torch.cat([v, more[k]]) for k, v in embeds.items()}
                pooled = {k: torch.cat([v, more_pooled[k]]) for k, v in pooled.items()}
                lanes = lanes + joining
                waiting = [lane for lane in waiting if image_start[lane[0]] != i]
                lane_of = self._lane_of(lanes, len(batch))
            lanes, source = self._split(lanes, batch.plans, i)
            if len(source) != latents.shape[0]:
                index = torch.tensor(source, device=self.device)
                latents = self._copy_rows(latents, index)
                embeds = {k: v[index] for k, v in embeds.items()}
                pooled = {k: v[index] for k, v in pooled.items()}
                lane_of = self._lane_of(lanes, len(batch))
                self.guider.select(index)
                if isinstance(extra.get("generator"), list):  # stochastic schedulers: each lane keeps its own stream
                    extra["generator"] = [_clone(extra["generator"][k]) for k in source]
            plans = [batch.plans[lane[0]] for lane in lanes]
            rows = self._rows(plans, i)
            for hook in hooks:
                hook.before_unet(i, [(lanes[b][0], branch) for b, branch in rows])
            index = torch.tensor([b for b, _ in rows], device=self.device)
            use_neg = torch.tensor([bool(p.negative[i]) for p in plans], device=self.device)
            self.guider.before_unet(i, rows, use_neg, embeds)
            model_in = self.scheduler.scale_model_input(latents[index], t)
            cond = torch.cat([embeds[branch][b : b + 1] for b, branch in rows])
            added = {"text_embeds": torch.cat([pooled[branch][b : b + 1] for b, branch in rows]),
                     "time_ids": self.time_ids(len(rows))} if pooled else None
            with FixedRows(self.fixed_rows) if self.fixed_rows else contextlib.nullcontext(), self._autocast(), self._guider_call():
                out = self.unet(model_in, t, encoder_hidden_states=cond, added_cond_kwargs=added, return_dict=False)[0].to(latents.dtype)
            eps = {branch: torch.full_like(latents, float("nan")) for branch in BRANCHES}
            for j, (b, branch) in enumerate(rows):
                eps[branch][b] = out[j]
            x = GuideInput(i, len(timesteps), int(t), int(timesteps[i + 1]) if i + 1 < len(timesteps) else None, s,
                           latents, eps, use_neg)
            applied = self.guider(x, torch.tensor([float(p.inject[i]) for p in plans], device=self.device))
            guided = applied.pred
            if hooks:
                snap = lambda b, i=i, latents=latents, lane_of=lane_of: self._snapshot(batch, b, i, latents, int(lane_of[b]), extra)
                state = StepState(i, int(t), latents[lane_of], {k: v[lane_of] for k, v in eps.items()},
                                  guided[lane_of], [p.branch(i) for p in batch.plans], snap,
                                  applied.uncond[lane_of], applied.direction[lane_of])
                for hook in hooks:
                    hook.on_step(state)
            latents = self.scheduler.step(guided, t, latents, **extra, return_dict=False)[0]
            self.guider.after_step(x, applied, latents, self.scheduler)
        # 6. decode each lane once
        decoded = self.decode(latents)
        out = np.empty((len(batch), *decoded.shape[1:]), dtype=decoded.dtype)
        for k, lane in enumerate(lanes):
            out[lane] = decoded[k]
        return out

    # -- snapshots: continue a trajectory from a step without recomputing its prefix

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST[self.autocast])

    def _settings(self) -> tuple:
        return (id(self.unet), type(self.scheduler).__name__, self.steps, self.guidance_scale, self.height, self.width,
                self.autocast, self.guider.describe())

    def _per_sample(self, value, n: int) -> bool:
        """Whether a scheduler attribute holds one row per lane (a latents-shaped tensor or a list of them)."""
        if isinstance(value, torch.Tensor):
            return value.ndim == 1 + len(self.latent_shape) and value.shape[0] == n and tuple(value.shape[1:]) == self.latent_shape
        return isinstance(value, list) and bool(value) and all(self._per_sample(v, n) for v in value)

    def _snapshot(self, batch: Batch, b: int, step: int, latents: torch.Tensor, lane: int, extra: dict) -> Snapshot:
        n, plan = latents.shape[0], batch.plans[b]
        rows, shared = {}, {}
        for name, value in vars(self.scheduler).items():
            if self._per_sample(value, n):
                rows[name] = [v[lane : lane + 1].clone() for v in value] if isinstance(value, list) else value[lane : lane + 1].clone()
            else:
                shared[name] = value
        gens = extra.get("generator")
        return Snapshot(step, batch.prompts[b], batch.negative_prompts[b], int(batch.seeds[b]),
                        (tuple(bool(x) for x in plan.negative[:step]), tuple(float(x) for x in plan.inject[:step])),
                        latents[lane : lane + 1].clone(), rows, shared,
                        gens[lane].get_state() if isinstance(gens, list) else None, self._settings(),
                        self.guider.state_of(lane))

    def _check_resume(self, batch: Batch) -> list[int]:
        """The step each image continues from (its snapshot's); ValueError where a snapshot does not fit its image."""
        for b, snap in enumerate(batch.resume):
            step, plan = snap.step, batch.plans[b]
            prefix = (tuple(bool(x) for x in plan.negative[:step]), tuple(float(x) for x in plan.inject[:step]))
            used_negative = any(prefix[0]) or any(prefix[1])
            if snap.settings != self._settings():
                raise ValueError(f"Batch.resume[{b}]: snapshot of another sampler (model, scheduler, steps, guidance or size)")
            if (snap.prompt, snap.seed) != (batch.prompts[b], int(batch.seeds[b])) or (used_negative and snap.negative != batch.negative_prompts[b]):
                raise ValueError(f"Batch.resume[{b}]: snapshot of {snap.prompt!r} / {snap.negative!r} / seed {snap.seed}, "
                                 f"image {batch.prompts[b]!r} / {batch.negative_prompts[b]!r} / seed {batch.seeds[b]}")
            if prefix != snap.prefix:
                raise ValueError(f"Batch.resume[{b}]: its plan differs from the snapshot's on steps before {step}")
            if not 0 <= step < self.n_calls:
                raise ValueError(f"Batch.resume[{b}]: snapshot of step {step}; the loop makes {self.n_calls} UNet calls")
        return [snap.step for snap in batch.resume]

    def _restore(self, snaps: Sequence[Snapshot], extra: dict) -> torch.Tensor:
        """Scheduler state and latents (one row per lane) from one snapshot per lane."""
        for name, value in snaps[0].shared.items():
            setattr(self.scheduler, name, copy.copy(value) if isinstance(value, (list, dict)) else value)
        for name, value in snaps[0].rows.items():
            if isinstance(value, list):
                setattr(self.scheduler, name, [torch.cat(parts) for parts in zip(*(snap.rows[name] for snap in snaps))])
            else:
                setattr(self.scheduler, name, torch.cat([snap.rows[name] for snap in snaps]))
        if isinstance(extra.get("generator"), list):
            for gen, snap in zip(extra["generator"], snaps):
                gen.set_state(snap.generator)
        self.guider.restore([snap.guider_state for snap in snaps])
        return torch.cat([snap.latents for snap in snaps]).to(self.device)

    def _lane_embeds(self, keys: Sequence[tuple]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each branch's text embeddings, one row per lane (key: prompt, negative, seed, ...); SDXL: and the
        pooled ones, indexed alike (the time ids are the same for every row)."""
        prompts, negatives = [k[0] for k in keys], [k[1] for k in keys]
        embeds = {
            "positive": torch.cat([self.encode(p) for p in prompts]),
            "negative": torch.cat([self.encode(p) for p in negatives]),
            "empty": self.encode(None).expand(len(keys), -1, -1),
        }
        pooled = {
            "positive": torch.cat([self.encode_pooled(p) for p in prompts]),
            "negative": torch.cat([self.encode_pooled(p) for p in negatives]),
            "empty": self.encode_pooled(None).expand(len(keys), -1),
        } if self.xl else {}
        return embeds, pooled

    def _join(self, latents: torch.Tensor, snaps: Sequence[Snapshot], extra: dict) -> torch.Tensor:
        """Lanes continued from snapshots of the step the loop has reached join it: their latents, the
        scheduler's per-sample state, noise streams and the guider's state are appended to the running
        lanes'. The scheduler's shared state (e.g. PNDM's step counter) is the one every lane reaching
        this step has; a snapshot whose shared state differs is refused."""
        n = latents.shape[0]
        for name, value in snaps[0].shared.items():
            current = getattr(self.scheduler, name, None)
            if (value is None or isinstance(value, (bool, int, float, str))) and current != value:
                raise ValueError(f"Batch.resume: the scheduler's {name} is {current!r} in the running lanes and "
                                 f"{value!r} in a snapshot of step {snaps[0].step}")
        for name, value in snaps[0].rows.items():
            current = getattr(self.scheduler, name)
            if isinstance(value, list):
                if not isinstance(current, list) or len(current) != len(value):
                    raise ValueError(f"Batch.resume: the scheduler's {name} does not match a snapshot of step {snaps[0].step}")
                setattr(self.scheduler, name, [torch.cat([c, *parts]) for c, parts in zip(current, zip(*(snap.rows[name] for snap in snaps)))])
            else:
                setattr(self.scheduler, name, torch.cat([current, *(snap.rows[name] for snap in snaps)]))
        if isinstance(extra.get("generator"), list):
            for snap in snaps:
                gen = torch.Generator("cpu").manual_seed(snap.seed)
                gen.set_state(snap.generator)
                extra["generator"].append(gen)
        self.guider.restore([self.guider.state_of(lane) for lane in range(n)] + [snap.guider_state for snap in snaps])
        return torch.cat([latents, *(snap.latents.to(self.device) for snap in snaps)])

    def _lane_of(self, lanes: list[list[int]], n: int) -> torch.Tensor:
        """(n,) index of the lane each image rides in."""
        lane_of = torch.empty(n, dtype=torch.long)
        for k, lane in enumerate(lanes):
            lane_of[lane] = k
        return lane_of.to(self.device)

    @staticmethod
    def _split(lanes: list[list[int]], plans: Sequence[StepPlan], step: int) -> tuple[list[list[int]], list[int]]:
        """Split each lane whose images take different actions at ``step``; ``source[k]`` is the old
        lane the new lane ``k`` continues."""
        new, source = [], []
        for k, lane in enumerate(lanes):
            groups: dict[tuple, list[int]] = {}
            for b in lane:
                groups.setdefault((bool(plans[b].negative[step]), float(plans[b].inject[step])), []).append(b)
            for group in groups.values():
                new.append(group)
                source.append(k)
        return new, source

    def _copy_rows(self, latents: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Latents and the scheduler's per-sample state (e.g. PNDM's past predictions) for new lanes."""
        n, shape = latents.shape[0], latents.shape[1:]

        def pick(value):
            if isinstance(value, torch.Tensor) and value.ndim == latents.ndim and value.shape[0] == n and value.shape[1:] == shape:
                return value[index]
            if isinstance(value, list):
                return [pick(v) for v in value]
            return value

        for name, value in vars(self.scheduler).items():
            setattr(self.scheduler, name, pick(value))
        return latents[index]

    def _needs(self, plan: StepPlan, step: int) -> set[str]:
        """Branches beside the positive one image needs at ``step``: the guider's, plus both sides on inject steps."""
        if plan.inject[step] != 0.0:
            return {"negative", "empty"} | self.guider.needs(bool(plan.negative[step]))
        return self.guider.needs(bool(plan.negative[step]))

    @contextlib.contextmanager
    def _guider_call(self):
        try:
            yield
        finally:
            self.guider.after_unet()

    def _rows(self, plans: Sequence[StepPlan], step: int) -> list[tuple[int, str]]:
        """(image, branch) rows of this step's UNet batch, ordered negative, empty, positive."""
        wanted = [set(BRANCHES) if self.three_branches else self._needs(plan, step) | {"positive"} for plan in plans]
        return [(b, branch) for branch in BRANCHES for b in range(len(plans)) if branch in wanted[b]]

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> images (B, H, W, 3) in [0, 1]; pixel-space models skip the VAE."""
        if self.vae is not None and self.xl and self.vae.dtype == torch.float16 and self.vae.config.force_upcast:
            # SDXL's VAE overflows in float16; StableDiffusionXLPipeline decodes in float32 for the same reason
            self.vae.to(torch.float32)
            try:
                return self.decode(latents.float())
            finally:
                self.vae.to(torch.float16)
        if self.vae is not None:
            latents = latents / self.vae.config.scaling_factor
            # with fixed rows, one image per call: the VAE's wide convolutions need no batch, and 1 pads nothing
            parts = latents.split(1) if self.fixed_rows else [latents]
            latents = torch.cat([self.vae.decode(part, return_dict=False)[0] for part in parts])
        return self.pipe.image_processor.postprocess(latents, output_type="np")


def _clone(generator: torch.Generator) -> torch.Generator:
    """An independent generator in the same state (a split lane continues the same noise stream)."""
    copy = torch.Generator(generator.device)
    copy.set_state(generator.get_state())
    return copy


def cpu_fixed_rows(unet, latent_shape: tuple[int, int, int]) -> int:
    """Rows per block on the CPU: the fewest of 2, 4, 8 whose block holds ``CPU_BLOCK_WORK``.

    Small UNets need several rows per call to keep the CPU busy, large ones do not, and padding a
    lone image (2 rows) to the block costs the rest. Measured (2 cores): the shapes model's time
    per row is 1.6-2.2x higher at 2 rows than at 8, so it gets 8 (cost of the blocks, against
    unblocked batches: 1.10x at 16 images a batch, 1.02x at 4, 2.2x for one image alone);
    Stable Diffusion 2's UNet at 256 px is only 1.15x higher at 2 rows, so SD UNets get 2.
    """
    work = latent_shape[1] * latent_shape[2] * unet.config.block_out_channels[0]
    rows = 2
    while rows < 8 and rows * work < CPU_BLOCK_WORK:
        rows *= 2
    return rows


class UNetRows:
    """Counts the UNet calls made within it and their rows: as called, and as computed (padded to the
    sampler's fixed-row blocks). A torch forward pre-hook on the UNet, so it counts any generate call,
    also one whose images join at several steps (where :class:`Hook` s are refused)."""

    def __init__(self, sampler: "NegativeSampler"):
        self.unet, self.block = sampler.unet, sampler.fixed_rows
        self.calls = self.rows = self.padded = 0

    def _count(self, module, args) -> None:
        n = int(args[0].shape[0])
        self.calls += 1
        self.rows += n
        self.padded += -(-n // self.block) * self.block if self.block else n

    def __enter__(self) -> "UNetRows":
        self._handle = self.unet.register_forward_pre_hook(self._count)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


class FixedRows(TorchFunctionMode):
    """Within this context every ``conv2d`` and ``linear`` runs on blocks of exactly ``rows`` rows.

    The input's first axis (the UNet's batch rows) is cut into blocks of ``rows``; the last block
    is padded with copies of its last row, whose outputs are dropped. Kernels then see one shape
    whatever the batch, and a row's result depends on its own input only (checked bit for bit on
    the shipped model: any batch, position or neighbours; tests/test_determinism.py). The UNet
    still makes one call per step, so hooks and attention processors see the whole batch.
    """

    def __init__(self, rows: int):
        super().__init__()
        self.rows = rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is F.conv2d:
            x = args[0]
            # conv2d's unbatched (C, H, W) input has no row axis
            if isinstance(x, torch.Tensor) and x.ndim >= 2 and x.shape[0] != self.rows and (func is F.linear or x.ndim == 4):
                outs = []
                for start in range(0, x.shape[0], self.rows):
                    block = x[start : start + self.rows]
                    n = block.shape[0]
                    if n < self.rows:
                        block = torch.cat([block, block[-1:].expand(self.rows - n, *block.shape[1:])])
                    outs.append(func(block, *args[1:], **kwargs)[:n])
                return torch.cat(outs)
        return func(*args, **kwargs)


def halve_on_oom(items: Sequence, batch_size: int, run: Callable[[Sequence], T]) -> Iterator[tuple[Sequence, T]]:
    """``run`` over ``items`` in batches, yielding (batch, result); on CUDA out-of-memory the batch is halved.

    The failed batch is retried at half the size, down to 1 item, and the smaller size is kept for
    the rest of ``items``; ``run`` must leave no trace of a call that raised. With one item left
    the error is raised again with the sizes tried. Images do not depend on the batch size on the
    CPU (:class:`FixedRows`); on a GPU they differ from the full batch's by float rounding.
    """
    size, start = batch_size, 0
    while start < len(items):
        batch = items[start : start + size]
        try:
            result = run(batch)
        except torch.cuda.OutOfMemoryError as err:
            if len(batch) == 1:
                first_line = (str(err).splitlines() or [""])[0][:200]
                raise torch.cuda.OutOfMemoryError(
                    f"out of memory with a batch of 1 (tried {batch_size} down to 1 by halving): one image does not "
                    f"fit; use a smaller height/width, model.dtype=fp16 or another device ({first_line})"
                ) from err
        else:
            yield batch, result
            start += len(batch)
            continue
        # outside the except block, so the failed call's tensors (held by the traceback) are freed first
        size = max(1, len(batch) // 2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("out of memory with a batch of %d; retrying with %d", len(batch), size)
