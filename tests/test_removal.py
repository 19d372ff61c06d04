"""The removal sweep (negstudy.studies.removal) end to end on the shipped model, and its parts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from negstudy.shapes import oracle, world
from negstudy.studies.removal import critical_step, named_in, scale, strip_name

sys.path.insert(0, str(Path(__file__).parent))
from shipped_sweeps import REMOVAL  # noqa: E402


def test_named_in_matches_whole_words_and_plurals():
    assert named_in("a ball on the grass", "ball") and named_in("two Balls at night", "ball")
    assert not named_in("a ballroom at night", "ball") and named_in("a sports ball", "sports ball")
    assert named_in("three boxes", "box")


def test_scale_maps_the_papers_window_onto_other_loops():
    assert (scale(5, 31, 31), scale(15, 31, 31)) == (5, 15)
    assert (scale(5, 31, 11), scale(15, 31, 11)) == (1, 5)
    assert scale(30, 31, 62) == 60


def test_critical_step_is_the_first_step_where_attention_concentrates_on_the_region():
    mask = np.zeros((8, 8), bool)
    mask[:2, :2] = True  # 1/16 of the image
    maps = np.ones((6, 8, 8))
    maps[3][mask] = 5.0  # mass inside: 20/80 = 0.25 = 4x the share
    assert critical_step(maps, mask, hit_lift=2.0) == 3
    assert critical_step(maps, mask, hit_lift=5.0) is None
    assert critical_step(maps, None, hit_lift=2.0) is None
    maps[1] = np.nan  # a step whose branch was not computed never counts
    assert critical_step(maps, mask, hit_lift=2.0) == 3


@pytest.fixture(scope="module")
def removal_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("removal")
    out = root / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "negstudy", *REMOVAL, "logger=none",  # one seed, 1 object per shard (shipped_sweeps.py)
         "removal.max_regenerations=2", "evaluator=oracle", f"hydra.sweep.dir={out}"],  # the tests re-read with the oracle
        capture_output=True, text=True, timeout=600, cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_removal_sweep_runs_every_method_on_every_unnamed_object(removal_sweep):
    out, stdout = removal_sweep
    originals = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*/originals.parquet"))])
    assert len(originals) == 2 and originals.judged.all()  # 2 captions x 1 seed over the two shards
    for row in originals.itertuples():
        named = set(world.parse_caption(row.prompt).objects)
        targets = set(filter(None, row.targets.split(",")))
        assert targets == set(filter(None, row.objects.split(","))) - named
    t = pd.concat([pd.read_parquet(p).assign(job=p.parent.name) for p in sorted(out.glob("*/removal_targets.parquet"))])
    assert len(t) == 3 * originals.targets.str.split(",").map(lambda x: len([o for o in x if o])).sum()
    n = 21  # PNDM, 20 steps: 21 UNet calls
    by = {m: g.reset_index(drop=True) for m, g in t.groupby("method")}
    assert (by["from0"].start == 0).all() and (by["from0"].end == n - 1).all()
    assert (by["window"].start == 3).all() and (by["window"].end == 10).all()  # steps 5..15 of 31, scaled to 21 calls
    a = by["adaptive"]
    assert (a.start == a.critical_step).all() and a.regenerations.between(0, 2).all()
    assert (a.end == np.minimum(n - 1, a.critical_step + 5 - 1 + 5 * a.regenerations)).all()
    assert set(a.critical_source) <= {"attention", "fallback"}
    assert (a[a.critical_source == "fallback"].critical_step == scale(6, 31, n)).all()
    assert t.psnr_out.notna().all() and t.ssim_out.between(-1, 1).all()
    assert t.substituted.notna().all() and (t.substituted == (t.new_objects != "")).all()


def test_removal_verdicts_match_the_saved_images(removal_sweep):
    """Each method's 'removed' is the oracle's verdict on the image saved in the strip."""
    out, _ = removal_sweep
    t = pd.concat([pd.read_parquet(p).assign(job=p.parent.name) for p in sorted(out.glob("*/removal_targets.parquet"))])
    columns = {"from0": 1, "window": 2, "adaptive": 3}
    originals = {(p.parent.name, r.caption, r.seed): r.objects for p in sorted(out.glob("*/originals.parquet"))
                 for r in pd.read_parquet(p).itertuples()}
    checked = 0
    for row in t.itertuples():
        strip = np.asarray(Image.open(out / row.job / "triples" / strip_name(row.caption, row.prompt, row.seed, row.object)))
        image = strip[:, 32 * columns[row.method] : 32 * (columns[row.method] + 1)]
        verdict = oracle.inspect(image)
        decision = verdict.decision(row.object)  # None: the oracle is unsure, and 'removed' is missing
        assert pd.isna(row.removed) if decision is None else row.removed == (not decision)
        found = set(originals[(row.job, row.caption, row.seed)].split(",")) - {""}
        assert row.new_objects == ",".join(sorted(set(verdict.objects) - found))
        checked += 1
    assert checked == len(t) > 0


def test_removal_report_pools_the_shards(removal_sweep):
    out, stdout = removal_sweep
    table = pd.read_csv(out / "report" / "removal_methods.csv")
    t = pd.concat([pd.read_parquet(p).assign(job=p.parent.name) for p in sorted(out.glob("*/removal_targets.parquet"))])
    assert list(table.method) == ["negative from step 0", "fixed window", "adaptive window"]
    # objects count where the reader decided for every method (unsure leaves 'removed' missing)
    wide = t.pivot_table(index=["job", "caption", "seed", "object"], columns="method", values="removed", aggfunc="first",
                         dropna=False)
    judged = wide.reindex(columns=["from0", "window", "adaptive"]).dropna()
    assert (table.objects == len(judged)).all() and len(judged) > 0
    for row in table.itertuples():
        rate = judged[{"negative from step 0": "from0", "fixed window": "window", "adaptive window": "adaptive"}[row.method]].astype(float).mean()
        assert row.removed == pytest.approx(rate) and row.ci_low <= row.removed <= row.ci_high
    assert "sweep report ->" in stdout and "removal, shapes_removal, adaptive window:" in stdout
    assert (out / "report" / "removal_methods.png").stat().st_size > 5000


# ----------------------------------------------------------------------------- the author's protocol (removal.protocol=paper)


def test_paper_object_selection_is_substring_without_people_and_uncapped():
    from negstudy.studies.removal import paper_targets

    found = ["car", "person", "ball", "people", "ball", "dog", "bench", "kite"]
    # "car" is a substring of "cart": the author leaves it alone; negstudy's whole-word rule would remove it
    assert paper_targets("A Cart in the street", found) == ["ball", "dog", "bench", "kite"]  # 4 > negstudy's cap of 3
    assert not named_in("a cart in the street", "car")
    assert paper_targets("a kite at night", ["kite", "sun"], drop=["sun"]) == []


def test_paper_window_grows_one_step_per_try_up_to_step_29():
    from negstudy.studies.removal import paper_window_ends

    assert paper_window_ends(6, 31, 31) == list(range(7, 30))  # [6, 7], [6, 8], ..., [6, 29]: 23 tries
    # 11 calls (10 PNDM steps): ends 7..29 of 31 scaled, each once, after the scaled start scale(6) = 2
    assert scale(6, 31, 11) == 2 and paper_window_ends(6, 31, 11) == list(range(3, 11))


def test_paper_counting_rules():
    from negstudy.studies.removal import paper_prefers_window, paper_removed

    assert paper_removed(False) and paper_removed(None) and not paper_removed(True)  # only "yes" keeps the object
    # [original, from-0, windowed]: anything but "the second one" counts for the windowed image
    assert paper_prefers_window("b") and paper_prefers_window(None) and not paper_prefers_window("a")


def test_the_judge_asks_the_authors_questions_and_counts_by_substring(tmp_path, monkeypatch):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from judge_server import JudgeServer
    from omegaconf import OmegaConf

    from negstudy.config import JudgeConfig
    from negstudy.evaluators.judge import JudgeEvaluator, _Request, parse_answer

    # the author's substring rules on planted answers, where strict JSON would refuse or differ
    assert parse_answer("present_paper", "No, I would not say yes.") is True  # contains "yes"
    assert parse_answer("present_paper", "I cannot tell.") is False
    assert parse_answer("closer_paper", "the second one.") == "a"
    assert parse_answer("closer_paper", "The Second one") == "b"  # case-sensitive "second", as the author's
    images, _, scenes = world.sample_dataset(6, seed=3, p_attribute=0.0)
    with JudgeServer() as server:
        monkeypatch.setenv("OPENAI_API_KEY", "not-a-real-key")
        j = JudgeEvaluator.from_config(OmegaConf.structured(JudgeConfig(
            base_url=server.base_url, labels="shapes", cache_dir=str(tmp_path / "cache"), requests_per_minute=60_000)))
        messages, response_format = j._messages(_Request("present_paper", (images[0],), ("ball",)))
        content = messages[0]["content"]
        assert response_format is None and [c["type"] for c in content] == ["text", "image_url"]
        assert content[0]["text"] == "tell me 'yes' if the image contains the ball, otherwise, tell me 'no'."
        messages, _ = j._messages(_Request("closer_paper", tuple(images[:3]), ()))
        assert [c["type"] for c in messages[0]["content"]] == ["text", "image_url", "image_url", "image_url"]
        names = ["ball" if i % 2 else "tree" for i in range(6)]
        truth = [any(o == n for o in s.object_names) for s, n in zip(scenes, names)]
        assert j.present_paper(images, names) == truth
        # [original, the original itself, another image]: "The second one." -> "a"
        assert j.closer_paper(images[:2], images[:2], images[2:4]) == ["a", "a"]
        assert set(server.tasks) == {"present_paper", "closer_paper"}


@pytest.fixture(scope="module")
def paper_sweep(tmp_path_factory):
    """`removal.protocol=paper` with the judge (the local server answering from the oracle)."""
    import os
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from judge_server import JudgeServer

    root = tmp_path_factory.mktemp("paper_removal")
    out = root / "job"
    with JudgeServer() as server:
        proc = subprocess.run(
            [sys.executable, "-m", "negstudy", "+sweep=removal", "hydra.mode=RUN", "dataset.shards=1", "steps=10",
             "seeds=[0,1]", "dataset.limit=3", "logger=none", "save_images=false", "removal.protocol=paper",
             "fixed_rows=0", "evaluator=judge", f"evaluator.base_url={server.base_url}", f"evaluator.cache_dir={root / 'cache'}",
             "evaluator.requests_per_minute=60000", f"hydra.run.dir={out}"],
            capture_output=True, text=True, timeout=600, cwd=root, env={**os.environ, "OPENAI_API_KEY": "not-a-real-key"},
        )
        tasks = list(server.tasks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, tasks


@pytest.mark.slow
def test_paper_protocol_from_the_command_line(paper_sweep):
    from negstudy.studies.removal import paper_window_ends

    out, tasks = paper_sweep
    assert {"present_paper", "closer_paper"} <= set(tasks) and not {"present", "closer"} & set(tasks)
    originals = pd.read_parquet(out / "originals.parquet")
    for row in originals.itertuples():
        found = [o for o in row.objects.split(",") if o]
        assert row.targets.split(",") == [o for o in found if o not in row.prompt.lower()] or not row.targets
    t = pd.read_parquet(out / "removal_targets.parquet")
    assert len(t) and (t.protocol == "paper").all() and t.removed.notna().all()
    ends = paper_window_ends(6, 31, 11)
    a = t[t.method == "adaptive"]
    assert (a.critical_source == "fixed").all() and (a.start == 2).all()
    assert (a.end == [ends[k] for k in a.regenerations]).all()
    w = t[t.method.isin(["window", "adaptive"])]
    assert w.prefers_over_from0.notna().all() and (w.shown_first == "from0").all()


# ----------------------------------------------------------------------------- prefix reuse: branched = fresh


@pytest.fixture(scope="module")
def shipped20():
    import torch
    from omegaconf import OmegaConf

    from negstudy.config import ModelConfig
    from negstudy.models import load_pipeline
    from negstudy.sampler import NegativeSampler

    pipe = load_pipeline(OmegaConf.structured(ModelConfig(name="shapes", path="builtin:shapes")), torch.device("cpu"))
    return NegativeSampler(pipe, steps=20, fixed_rows=8)  # PNDM: 21 UNet calls


@pytest.mark.parametrize("protocol", ["negstudy", "paper"])
def test_branched_windows_equal_fresh_generations(shipped20, tmp_path, protocol, caplog):
    """Every image of the sweep (original, from-0, fixed window, the adaptive try kept) equals its plan
    generated from x_T alone, bit for bit, although the windows continue the original's kept state and
    each adaptive try the previous try's (20 steps: 21 UNet calls)."""
    import logging

    from omegaconf import OmegaConf

    from negstudy.config import RemovalConfig
    from negstudy.evaluators.oracle import OracleEvaluator
    from negstudy.sampler import Batch
    from negstudy.schedules import Never, Window
    from negstudy.studies import removal

    sampler, n = shipped20, shipped20.n_calls
    cfg = OmegaConf.create({
        "dataset": {"name": "t", "captions": ["a view at night", "a tree at night"], "limit": None},
        "seeds": [1], "batch_size": 8, "save_images": True, "sweep": {"layers": "down_up"},
        "removal": OmegaConf.structured(RemovalConfig(protocol=protocol, max_regenerations=2)),
    })
    with caplog.at_level(logging.INFO, logger="negstudy"):
        tables = removal.run(cfg, sampler, tmp_path, evaluator=OracleEvaluator(), world="shapes")
    t = tables["removal_targets"]
    assert len(t) and (t[t.method == "adaptive"].regenerations > 0).any()  # some try continued a previous try
    assert (t[t.method == "window"].start > 0).all()  # the fixed window continued the original's state
    rows = [r for r in caplog.messages if "UNet rows" in r]
    assert rows, caplog.messages
    # fresh: each kept image's plan from x_T, all in one batch (fixed rows: bits do not depend on the batch)
    objects = t[t.method == "from0"].reset_index(drop=True)
    plans = {m: [Window(int(r.start), int(r.end)).plan(n) for r in t[t.method == m].itertuples()] for m in removal.METHODS}
    fresh = sampler.generate(Batch(
        list(objects.prompt) * 4, [""] * len(objects) + list(objects.object) * 3, list(objects.seed) * 4,
        [Never().plan(n)] * len(objects) + plans["from0"] + plans["window"] + plans["adaptive"]))
    fresh = removal.to_uint8(fresh).reshape(4, len(objects), *fresh.shape[1:])
    for i, row in enumerate(objects.itertuples()):
        strip = np.asarray(Image.open(tmp_path / "triples" / strip_name(row.caption, row.prompt, row.seed, row.object)))
        for col in range(4):  # original | from0 | window | adaptive
            assert np.array_equal(strip[:, 32 * col : 32 * (col + 1)], fresh[col, i]), (row.object, row.seed, col)
