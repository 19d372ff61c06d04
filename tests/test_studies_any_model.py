"""Every study on models that are not the shapes world, read by any evaluator; and the shipped shapes
model read by evaluators other than its validated ensemble.

The tiny random SD checkpoints of negstudy.tiny carry no shapes-world marker, so the studies treat
them as they treat Stable Diffusion: they read images through negstudy.evaluators.reader with the
evaluator the command line names (CLIP, a tiny OWLv2 built from a config, a judge behind a local
OpenAI-compatible server), or read nothing (evaluator=none, the paper's unscreened protocol).
Their images are noise: these are tests of the code path, not of results.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from judge_server import JudgeServer  # noqa: E402
from study_settings import OVERLAYS, STUDIES, WRITES, run_app  # noqa: E402

CLIP = ["evaluator=clip", "evaluator.path=builtin:shapes_clip"]  # a real CLIP, small, on disk: generic prompts here


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
    from negstudy.tiny import save_tiny_owl

    return save_tiny_owl(tmp_path_factory.mktemp("owl") / "tiny-owlv2")


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory):
    """One object pair and one attribute pair, as a user's own file."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.csv"
    path.write_text("prompt,negative,category\na photo of a cat on the grass,dog,object\na photo of a dog,blurry,attribute\n")
    return path


def common(model: str, path, out: Path) -> list[str]:
    return [f"model={model}", f"model.path={path}", "logger=none", "save_images=false", "hydra.mode=RUN",
            "dataset.shards=1", f"hydra.run.dir={out}"]


def test_the_tiny_models_are_not_shapes_world_models(tiny_model_dir):
    from negstudy.generate import model_world
    from omegaconf import OmegaConf

    assert model_world(OmegaConf.create({"path": str(tiny_model_dir)})) is None


def test_every_study_on_a_tiny_sd_read_by_clip(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The issue's command for each overlay: model=sd15 model.path=<tiny SD> evaluator=clip
    evaluator.path=builtin:shapes_clip hydra.mode=RUN dataset.shards=1 dataset.limit=2."""
    assert set(STUDIES) == OVERLAYS  # every overlay
    monkeypatch.chdir(tmp_path)
    for name, extra in STUDIES.items():
        out = tmp_path / name
        run_app(monkeypatch, capsys, [f"+sweep={name}", *common("sd15", tiny_model_dir, out), *CLIP, *extra, "dataset.limit=2"])
        assert (out / "report" / "report.html").exists(), name
        assert len(pd.read_parquet(out / WRITES[name])), name
    limits = pd.read_parquet(tmp_path / "critical_step" / "reader_limits.parquet")
    assert limits.reader.tolist() == ["clip"] and "gives no region" in limits.left_out[0]  # said once, in the table ...
    assert "What the reader could not measure" in (tmp_path / "critical_step" / "report" / "report.md").read_text()  # ... and the report
    screen = pd.read_parquet(tmp_path / "critical_step" / "screen.parquet")
    assert set(screen.reader) == {"clip"} and set(screen.protocol) == {"screened"}
    assert pd.read_parquet(tmp_path / "critical_step" / "attention.parquet").empty  # no region from CLIP: no attention lag
    removal = pd.read_parquet(tmp_path / "critical_step" / "removal.parquet")
    assert removal.psnr_outside.isna().all()  # ... and no PSNR outside the object


def test_every_study_on_a_tiny_sd_read_by_owl_a_judge_or_nothing(tiny_model_dir, owl_dir, tmp_path, monkeypatch, capsys):
    """The same overlays read by a tiny OWLv2 (model=sd2_base), by a judge behind a local server
    (model=sd14), and by nothing (the studies that can do without a reader; the others are refused:
    test_evaluator_none_...)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", "not-a-real-key")
    with JudgeServer() as server:
        readers = {
            "owl": ("sd2_base", ["evaluator=owl", f"evaluator.path={owl_dir}", "evaluator.local_files_only=true",
                                 "evaluator.device=cpu", "removal.max_regenerations=1"]),
            "judge": ("sd14", ["evaluator=judge", f"evaluator.base_url={server.base_url}", f"evaluator.cache_dir={tmp_path / 'cache'}",
                               "evaluator.requests_per_minute=60000"]),
            "none": ("sd15", ["evaluator=none", "sweep.screen=false"]),
        }
        for reader, (model, settings) in readers.items():
            studies = ("critical_step", "attention_maps", "mechanisms") if reader == "none" else tuple(STUDIES)
            for name in studies:
                out = tmp_path / reader / name
                extra = [x for x in STUDIES[name] if not (name == "methods" and x.startswith("sweep.study.methods"))]
                if name == "methods":
                    extra.append("sweep.study.methods=[cfg]")
                run_app(monkeypatch, capsys, [f"+sweep={name}", *common(model, tiny_model_dir, out), *settings, *extra])
                assert (out / "report" / "report.html").exists(), (reader, name)
                assert len(pd.read_parquet(out / WRITES[name].replace("/nag/", "/cfg/"))), (reader, name)
                assert f"  name: {model}\n" in (out / "config.yaml").read_text(), (reader, name)
    assert set(pd.read_parquet(tmp_path / "judge" / "reverse_activation" / "reverse_screen.parquet").reader) == {"judge"}
    mech = tmp_path / "none" / "mechanisms"
    assert (mech / "momentum.parquet").exists() and pd.read_parquet(mech / "energy.parquet").empty  # no reader: no barrier
    assert any("energy barrier" in line for line in pd.read_parquet(mech / "reader_limits.parquet").left_out)


def test_clip_presence_has_an_unsure_band_and_owl_judges_no_attribute(owl_dir):
    """The reader's answers on another model: CLIP's "a photo of a X" against "a photo" is unsure within
    the margin (every answer at a margin larger than any cosine gap, none at 0); OWLv2 locates objects and
    answers no attribute question."""
    from omegaconf import OmegaConf

    from negstudy.evaluators.reader import EvaluatorReader, study_reader

    images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    concepts, kinds = ["dog", "ball", "blurry", "ugly"], ["object", "object", "attribute", "attribute"]
    node = {"_target_": "negstudy.evaluators.clip.ClipEvaluator.build", "name": "clip", "path": "builtin:shapes_clip"}
    for margin, expect in ((2.0, {None}), (0.0, {True, False})):
        reader = study_reader(OmegaConf.create({**node, "margin": margin}), None)
        assert isinstance(reader, EvaluatorReader) and not reader.locates
        looks = reader.look(images, concepts, kinds)
        assert {look.present for look in looks} <= expect and all(look.region is None for look in looks)
    owl = study_reader(OmegaConf.create({"_target_": "negstudy.evaluators.owl.OwlEvaluator.build", "name": "owl",
                                         "path": str(owl_dir), "local_files_only": True, "threshold": 0.0, "device": "cpu"}), None)
    looks = owl.look(images, concepts, kinds, words=["ball", "dog", "ball", "dog"])
    assert [look.present for look in looks] == [True, True, None, None]  # threshold 0: every object query is found
    assert all(look.region is not None and look.region.shape == (32, 32) for look in looks[:2])
    assert looks[0].word_region is not None and looks[2].word_region is None  # asked only where the concept is present


def test_critical_step_read_by_owl_pools_its_boxes_onto_the_latent_grid(tiny_model_dir, owl_dir, tmp_path, monkeypatch, capsys):
    """OWLv2 locates: at threshold 0 it finds every queried object, whose 32x32 box region meets the tiny
    SD's 16x16 attention maps (pooled by area), so the attention table is measured."""
    out = tmp_path / "owl"
    run_app(monkeypatch, capsys, ["+sweep=critical_step", *common("sd2_base", tiny_model_dir, out), "evaluator=owl",
                                  f"evaluator.path={owl_dir}", "evaluator.local_files_only=true", "evaluator.threshold=0.0",
                                  "evaluator.device=cpu", *STUDIES["critical_step"]])
    screen = pd.read_parquet(out / "screen.parquet")
    assert screen.present.tolist() == [2] and screen.reader.tolist() == ["owl"]  # both seeds "show" the object
    attention = pd.read_parquet(out / "attention.parquet")
    assert len(attention) == 5  # 5 UNet calls of the one pair-seed swept (max_seeds=1)
    assert attention.region_fraction.between(0, 1, inclusive="right").all() and attention.mass_in_region.notna().all()
    assert pd.read_parquet(out / "reader_limits.parquet").empty  # OWLv2 on object pairs: nothing left out


def test_critical_step_read_by_a_judge_asks_objects_and_attributes(tiny_model_dir, pairs_csv, tmp_path, monkeypatch, capsys):
    """A vision judge behind an OpenAI-compatible server answers presence for objects and for attributes
    (its own question for a property of the whole image)."""
    out = tmp_path / "judge"
    monkeypatch.setenv("OPENAI_API_KEY", "not-a-real-key")
    with JudgeServer() as server:
        run_app(monkeypatch, capsys, ["+sweep=critical_step", *common("sd14", tiny_model_dir, out), f"dataset.path={pairs_csv}",
                                      "evaluator=judge", f"evaluator.base_url={server.base_url}",
                                      f"evaluator.cache_dir={tmp_path / 'cache'}", "evaluator.requests_per_minute=60000",
                                      *STUDIES["critical_step"][:-1]])
        asked = set(server.tasks)
    assert {"present", "attribute"} <= asked
    screen = pd.read_parquet(out / "screen.parquet")
    assert screen.category.tolist() == ["object", "attribute"] and set(screen.reader) == {"judge"}
    assert (screen.present + screen.unsure <= screen.screened).all()
    assert set(pd.read_parquet(out / "ratio.parquet").category) == {"object", "attribute"}  # min_seeds pads both pairs


def test_evaluator_none_runs_the_papers_protocol_and_refuses_the_screened_one(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """sweep.screen=false: every seed of every pair, the ratio only (Figure 3 needs no reader); the
    screened protocol, reverse activation and removal stop before loading, naming the evaluator."""
    out = tmp_path / "paper"
    run_app(monkeypatch, capsys, ["+sweep=critical_step", *common("sd2_base", tiny_model_dir, out), "evaluator=none",
                                  "sweep.screen=false", "seeds=[0,1,2]", "steps=4", "dataset.limit=2"])
    ratio = pd.read_parquet(out / "ratio.parquet")
    assert ratio.groupby("pair").seed.nunique().tolist() == [3, 3]  # every seed, unscreened
    assert pd.read_parquet(out / "removal.parquet").empty and pd.read_parquet(out / "attention.parquet").empty
    assert set(pd.read_parquet(out / "screen.parquet").protocol) == {"paper"}
    assert (out / "report" / "critical_steps.csv").exists()
    assert len(pd.read_parquet(out / "reader_limits.parquet")) == 2  # no presence, no regions
    from negstudy.__main__ import app

    for sweep in ("critical_step", "reverse_activation", "removal"):
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["negstudy", f"+sweep={sweep}", *common("sd2_base", tiny_model_dir, tmp_path / sweep),
                                          "evaluator=none"])
        with pytest.raises(SystemExit) as exit_:
            app()
        err = capsys.readouterr().err
        assert exit_.value.code == 2, (sweep, err[-2000:])
        line = err.strip().splitlines()[-1]
        assert line.startswith("negstudy: error: evaluator=none") and "needs a reader" in line, line
        assert not (tmp_path / sweep / "config.yaml").exists()  # stopped before the job began


@pytest.mark.parametrize("evaluator", ["clip", "judge"])
def test_the_shipped_model_read_by_another_evaluator(evaluator, tmp_path, monkeypatch, capsys):
    shapes_pairs = tmp_path / "pairs.csv"
    shapes_pairs.write_text("prompt,negative,category\na view at night,sun,object\na ball on the grass,noisy,attribute\n")
    """The main job on the shapes model read by the shapes CLIP (margins, an unsure band, no regions) or
    by a judge (here a local server answering from the oracle, a stand-in for a vision model): the
    tables and the scorecard come out, and the reader's verdicts are its own, not the ensemble's."""
    out = tmp_path / evaluator
    extra = ["evaluator=clip"] if evaluator == "clip" else []
    monkeypatch.setenv("OPENAI_API_KEY", "not-a-real-key")
    with JudgeServer() as server:
        if evaluator == "judge":
            extra = ["evaluator=judge", f"evaluator.base_url={server.base_url}", f"evaluator.cache_dir={tmp_path / 'cache'}",
                     "evaluator.requests_per_minute=60000", "evaluator.labels=shapes"]
        run_app(monkeypatch, capsys, ["+sweep=critical_step", "logger=none", "save_images=false", "hydra.mode=RUN",
                                      "dataset.shards=1", f"hydra.run.dir={out}", *extra, "steps=20", "sweep.screen_seeds=3",
                                      "sweep.max_seeds=1", "sweep.min_seeds=1", "sweep.stride=10", f"dataset.path={shapes_pairs}",
                                      "fixed_rows=0"])  # 6 images: 32-row blocks would be mostly padding
    screen = pd.read_parquet(out / "screen.parquet")
    assert set(screen.reader) == {evaluator} and screen.screened.tolist() == [3, 3]
    assert (out / "report" / "scorecard.csv").exists() and len(pd.read_parquet(out / "ratio.parquet"))
    limits = pd.read_parquet(out / "reader_limits.parquet").left_out.tolist()
    assert any("gives no region" in line for line in limits)
    removal, ratio = pd.read_parquet(out / "removal.parquet"), pd.read_parquet(out / "ratio.parquet")
    assert removal.concept_present.isin([True, False]).any()
    # the ratio takes every present seed (up to the overlay's ratio_seeds), every start step only the first max_seeds (1)
    in_ratio, in_sweep = ratio.groupby("pair").seed.unique(), removal.groupby("pair").seed.unique()
    for p, row in screen.set_index("pair").iterrows():
        assert set(in_sweep[p]) <= set(in_ratio[p]) and len(in_sweep[p]) == 1
        assert len(in_ratio[p]) == max(row.present, 1)  # padded to min_seeds (1) where none is present
        assert bool(ratio[ratio.pair == p].padding.all()) == (row.present == 0)  # ... and marked so
    assert screen.present.max() >= 2  # "noisy" on "a ball on the grass": the ratio has more pair-seeds than the sweep


REAL = {"sd2_base": "NEGSTUDY_SD2_BASE", "sdxl": "NEGSTUDY_SDXL"}


@pytest.mark.parametrize("model", sorted(REAL))
def test_the_main_job_on_a_real_checkpoint(model, tmp_path):
    """With the weights on disk (NEGSTUDY_SD2_BASE=<dir of stabilityai/stable-diffusion-2-base>,
    NEGSTUDY_SDXL=<dir of stabilityai/stable-diffusion-xl-base-1.0>), the paper's protocol of the main job
    runs end to end on the real model, at 4 steps and 256 px (CPU-sized), and its ratio is finite."""
    import os

    path = os.environ.get(REAL[model])
    if not path:
        pytest.skip(f"{REAL[model]} names no local copy of the {model} weights (set it to run the real path)")
    out = tmp_path / model
    proc = subprocess.run([sys.executable, "-m", "negstudy", "+sweep=critical_step", f"model={model}", f"model.path={path}",
                           "dataset=paper_pairs", "dataset.limit=1", "evaluator=none", "sweep.screen=false", "seeds=[6463344]",
                           "steps=4", "height=256", "width=256", "logger=none", "hydra.mode=RUN", "dataset.shards=1",
                           f"hydra.run.dir={out}"], capture_output=True, text=True, timeout=3600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.isfinite(pd.read_parquet(out / "ratio.parquet").ratio).all()
