"""Every YAML composes against its schema; every semantic check fails with its one-line message."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from negstudy.checks import validate
from negstudy.config import register_configs
from negstudy.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


@pytest.fixture(scope="module")
def hydra_ctx():
    with initialize_config_module(config_module="negstudy.conf", version_base="1.3"):
        yield


def cfg_of(*overrides):
    return compose(config_name="config", overrides=list(overrides))


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_the_package_conf_is_the_repository_conf():
    import negstudy.conf

    assert Path(negstudy.conf.__file__).resolve().parent == CONF


@pytest.mark.parametrize("group", ["model", "dataset", "schedule", "evaluator", "logger"])
def test_every_option_composes(hydra_ctx, group, tiny_model_dir):
    for option in options(group):
        overrides = [f"{group}={option}"]
        if group == "model" and option != "shapes":
            cfg = cfg_of(*overrides)  # hub models: composed and type-checked, not loaded
            assert cfg.model.path.count("/") == 1
            continue
        cfg = cfg_of(*overrides, f"model.path={tiny_model_dir}", "evaluator=none") if group != "evaluator" else cfg_of(*overrides)
        if group != "evaluator":
            validate(cfg)
        assert cfg[group].name == option


def test_sweep_options_compose(hydra_ctx):
    for option in options("sweep"):
        cfg = cfg_of(f"+sweep={option}")
        assert cfg.sweep.name == option


def test_types_are_checked_by_the_schema(hydra_ctx):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        cfg_of("steps=many")
    with pytest.raises((ConfigCompositionException, ValidationError)):
        cfg_of("evaluator=judge", "evaluator.concurrency=many")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["steps=0"], "steps=0: must be >= 1"),
        (["guidance_scale=0"], "guidance_scale=0.0: must be > 0"),
        (["seeds=[]"], "seeds=[]: give at least one seed"),
        (["batch_size=0"], "batch_size=0: must be >= 1"),
        (["height=30"], "height=30: must be a positive multiple of 8"),
        (["device=tpu"], "device='tpu': allowed values are auto, cpu, cuda, mps"),
        (["model.scheduler=heun"], "model.scheduler='heun': allowed values are default, pndm, ddim, euler, dpmpp"),
        (["model.dtype=int8"], "model.dtype='int8': allowed values are auto, fp32, fp16, bf16"),
        (["model.path=/no/such/dir"], "model.path='/no/such/dir': not a diffusers model directory"),
        (["model.path=not a hub id"], "model.path='not a hub id': neither an existing local directory nor a hub id"),
        (["model.path=builtin:nothing"], "model.path='builtin:nothing': no shipped model of that name"),
        (["dataset.pairs=[]"], "dataset.pairs: the prompt set is empty (dataset 'shapes_objects')"),
        (["dataset.path=/no/pairs.csv"], "dataset.path='/no/pairs.csv': no such file"),
        (["dataset.path=pairs.xlsx"], "dataset.path='pairs.xlsx': unknown format '.xlsx' (allowed: .csv, .jsonl, .txt)"),
        (["dataset.pairs.0.category=colour"], "dataset.pairs[0].category='colour': allowed values are object, attribute"),
        (["dataset.limit=0"], "dataset.limit=0: must be >= 1 or null"),
        (["schedule=window", "schedule.start=20", "schedule.end=10"], "schedule.start=20 > schedule.end=10"),
        (["schedule=window", "schedule.start=5", "schedule.end=31"], "schedule.end=31: a step index must be in [0, 30]"),
        (["schedule=from_step", "schedule.start=1.5"], "schedule.start=1.5: a fraction of the loop must be in [0, 1]"),
        (["schedule=first_k", "schedule.k=-2"], "schedule.k=-2"),
        (["schedule=window", "schedule.start=soon"], "schedule.start='soon': expected a step index (int) or a fraction"),
        (["schedule=window", "+schedule.begin=3"], "schedule.begin: not a parameter of negstudy.schedules.Window (allowed: start, end)"),
        (["schedule=inject", "schedule.g=strong"], "schedule.g='strong': the injection gain must be a number"),
        (["logger.mode=sometimes"], "logger.mode='sometimes': allowed values are offline, online, disabled"),
        (["record=[attention_everything]"], "record='attention_everything': allowed values are eps, latents"),
        (["schedule._target_=negstudy.schedules.Sometimes"], "schedule._target_='negstudy.schedules.Sometimes': does not import"),
        (["evaluator._target_=negstudy.evaluators.nothing.Reader"], "evaluator._target_='negstudy.evaluators.nothing.Reader': does not import"),
        (["evaluator=clip", "evaluator._target_=negstudy.evaluators.oracle.OracleEvaluator"],
         "evaluator.path: not a parameter of negstudy.evaluators.oracle.OracleEvaluator (allowed: none)"),
        (["+sweep=reverse_activation", "sweep.study._target_=negstudy.studies.nothing.run"],
         "sweep.study._target_='negstudy.studies.nothing.run': does not import"),
        (["+sweep=removal", "removal.window=[5,40]", "hydra.mode=RUN"], "removal.window=[5, 40]: give [start, end]"),
    ],
)
def test_semantic_errors(hydra_ctx, tiny_model_dir, overrides, message):
    base = [f"model.path={tiny_model_dir}"] if not any(o.startswith("model.path") for o in overrides) else []
    cfg = cfg_of(*base, *overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_window_range_follows_the_scheduler(hydra_ctx, tiny_model_dir):
    """PNDM makes steps + 1 calls, so end=30 is valid at 30 PNDM steps and invalid with DDIM."""
    validate(cfg_of(f"model.path={tiny_model_dir}", "schedule=window", "schedule.end=30"))
    with pytest.raises(ConfigError, match="schedule.end=30"):
        validate(cfg_of(f"model.path={tiny_model_dir}", "model.scheduler=ddim", "schedule=window", "schedule.end=30"))
