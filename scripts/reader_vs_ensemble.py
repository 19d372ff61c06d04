#!/usr/bin/env python
"""How often the studies' other readers agree with the validated ensemble on the shipped shapes model.

The main job's images (the pairs of ``shapes_critical``, seeds 0..S-1; per pair-seed the image WITHOUT the
negative, as screened, and the image with the negative from step 0, as in the start-step sweep) are read for
the pair's negative concept by the studies' reader (negstudy.evaluators.reader) under three evaluators:

- ``ensemble``: the default, validated against by-eye labels (reader_agreement.md);
- ``clip``: the shipped shapes CLIP through ``evaluator=clip`` (its margin and unsure band; no regions);
- ``judge``: the judge evaluator against a local OpenAI-compatible server that answers from the pixel
  oracle (``tests/judge_server.py``), a stand-in for a vision model that reads the world exactly.

Agreement is counted over the decisions both readers make surely (True / False), per category, with 95 %
Wilson intervals; each reader's unsure rate beside it. Writes a Markdown table (``--out``) and prints it.

    python scripts/reader_vs_ensemble.py --seeds 16 --out docs/reader_vs_ensemble.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO))
sys.path.insert(0, str(_REPO / "tests"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("outputs/reader_vs_ensemble.md"))
    args = ap.parse_args(argv)

    from omegaconf import OmegaConf

    from negstudy.config import ModelConfig
    from negstudy.critical import wilson
    from negstudy.datasets import pairs_of
    from negstudy.evaluators.reader import study_reader
    from negstudy.models import load_pipeline, pick_device
    from negstudy.records import to_uint8
    from negstudy.sampler import Batch, NegativeSampler
    from negstudy.schedules import FromStep, Never

    from judge_server import JudgeServer

    from negstudy.config import DatasetConfig

    node = OmegaConf.load(_REPO / "conf" / "dataset" / "shapes_critical.yaml")
    node.pop("defaults", None)
    dataset = OmegaConf.merge(OmegaConf.structured(DatasetConfig), node)
    pairs = pairs_of(dataset)
    sampler = NegativeSampler(load_pipeline(OmegaConf.structured(ModelConfig(name="shapes", path="builtin:shapes", dtype="fp32")),
                                            pick_device("cpu")), steps=args.steps, guidance_scale=7.5)
    n = sampler.n_calls
    items = [(p, seed, k) for p in range(len(pairs)) for seed in range(args.seeds) for k in ("without", "from0")]
    start = time.perf_counter()
    images = []
    for i in range(0, len(items), args.batch_size):
        part = items[i : i + args.batch_size]
        plans = [Never().plan(n) if k == "without" else FromStep(0).plan(n) for _, _, k in part]
        batch = Batch([pairs[p].prompt for p, _, _ in part], [pairs[p].negative for p, _, _ in part], [s for _, s, _ in part], plans)
        images.append(to_uint8(sampler.generate(batch)))
        print(f"generated {i + len(part)} / {len(items)}", flush=True)
    images = np.concatenate(images)
    minutes = (time.perf_counter() - start) / 60
    concepts, categories = [pairs[p].negative for p, _, _ in items], [pairs[p].category for p, _, _ in items]

    verdicts = {}
    os.environ.setdefault("OPENAI_API_KEY", "not-a-real-key")
    with JudgeServer() as server, tempfile.TemporaryDirectory() as cache:
        nodes = {"ensemble": {"_target_": "negstudy.evaluators.ensemble.EnsembleEvaluator.build", "name": "ensemble"},
                 "clip": {"_target_": "negstudy.evaluators.clip.ClipEvaluator.build", "name": "clip"},
                 "judge": {"_target_": "negstudy.evaluators.judge.JudgeEvaluator.build", "name": "judge",
                           "base_url": server.base_url, "cache_dir": cache, "labels": "shapes", "requests_per_minute": 60000}}
        for name, node in nodes.items():
            reader = study_reader(OmegaConf.create(node), "shapes")
            verdicts[name] = [look.present for look in reader.look(images, concepts, categories)]
    frame = pd.DataFrame({"category": categories, "image": [k for _, _, k in items], **verdicts})

    rows = []
    for other in ("clip", "judge"):
        for category in ("object", "attribute", "all"):
            g = frame if category == "all" else frame[frame.category == category]
            sure = g[g.ensemble.notna() & g[other].notna()]
            agree = int((sure.ensemble.astype(bool) == sure[other].astype(bool)).sum())
            rate, lo, hi = wilson(agree, len(sure))
            rows.append({"reader": other, "category": category, "agree": agree, "n": len(sure),
                         "agreement": f"{100 * rate:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]",
                         "unsure (reader)": f"{100 * g[other].isna().mean():.1f} %",
                         "unsure (ensemble)": f"{100 * g.ensemble.isna().mean():.1f} %"})
    table = pd.DataFrame(rows)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    text = (f"{len(pairs)} pairs of shapes_critical x {args.seeds} seeds x (without the negative, negative from step 0) = "
            f"{len(items)} images of the shipped model, {args.steps} PNDM steps, guidance 7.5; generated in {minutes:.1f} min "
            f"on {cpu} ({os.cpu_count()} cores). Command: `python scripts/reader_vs_ensemble.py --seeds {args.seeds} --steps {args.steps}`.\n\n"
            + table.to_markdown(index=False) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
