"""The judge evaluator end to end: the real openai client against a local OpenAI-compatible server
(tests/judge_server.py) that answers from the shapes-world oracle, with injected faults."""

import json
import time
from dataclasses import dataclass, replace

import numpy as np
import pytest
from judge_server import JudgeServer
from omegaconf import OmegaConf

from negstudy.config import JudgeConfig, register_configs
from negstudy.errors import ConfigError
from negstudy.checks import build
from negstudy.evaluators.judge import PLACEHOLDER_KEY, InvalidAnswer, JudgeEvaluator, parse_answer
from negstudy.shapes import world

SECRET = "sk-test-0123456789-SECRET-never-stored"
FAST = {"requests_per_minute": 60_000, "concurrency": 4, "max_retries": 2, "timeout_s": 5.0}


@dataclass
class Item:
    prompt: str
    negative: str
    category: str


@pytest.fixture(scope="module")
def scenes():
    """12 attribute-free shapes-world images with known objects (uint8 (12, 32, 32, 3))."""
    images, _, scenes = world.sample_dataset(12, seed=3, p_attribute=0.0)
    assert any(len(s.objects) >= 2 for s in scenes) and any(not s.objects for s in scenes)
    return images, scenes


@pytest.fixture
def server():
    with JudgeServer() as s:
        yield s


def judge(server, tmp_path, **overrides):
    """An evaluator built through from_config, as negstudy.checks.build does."""
    fields = {"base_url": server.base_url, "labels": "shapes", "cache_dir": str(tmp_path / "cache"), **FAST, **overrides}
    return JudgeEvaluator.from_config(OmegaConf.structured(JudgeConfig(**fields)))


def truth(scene):
    return set(scene.object_names)


def test_objects_and_present_are_right_over_a_batch(server, tmp_path, scenes, monkeypatch):
    images, scs = scenes
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    j = judge(server, tmp_path)
    found = j.objects(images)
    assert [set(f) for f in found] == [truth(s) for s in scs]
    assert all(v is None for f in found for v in f.values())  # no masks from a judge
    names = [world.OBJECT_NAMES[i % 5] for i in range(len(scs))]
    assert j.present(images, names) == [n in truth(s) for n, s in zip(names, scs)]
    assert server.requests == 2 * len(scs)
    assert set(server.authorizations) == {f"Bearer {SECRET}"}
    u = j.usage
    assert u["answers"] == u["requests"] == 24 and u["cache_hits"] == 0 and u["missing"] == 0
    assert u["input_tokens"] > 24 * 85 and u["output_tokens"] > 0
    assert u["cost_usd"] == pytest.approx((u["input_tokens"] * 2.5 + u["output_tokens"] * 10.0) / 1e6)


def test_closer_and_background_rating(server, tmp_path, scenes):
    images, scs = scenes
    rng = np.random.default_rng(0)
    with_objects = [i for i, s in enumerate(scs) if s.objects][:4]
    originals = images[with_objects]
    kept = world.render_batch([replace(scs[i], objects=scs[i].objects[1:]) for i in with_objects], rng)
    other = {"grass": "sky", "sky": "sand", "sand": "night", "night": "grass"}
    moved = world.render_batch([replace(scs[i], objects=scs[i].objects[1:], background=other[scs[i].background])
                                for i in with_objects], rng)
    j = judge(server, tmp_path)
    assert j.closer(originals, kept, moved) == ["a"] * 4
    assert j.closer(originals, moved, kept) == ["b"] * 4
    assert j.background_rating(originals, kept) == [10.0] * 4
    assert all(r is not None and r < 5 for r in j.background_rating(originals, moved))


def test_a_rerun_hits_the_cache_and_sends_nothing(server, tmp_path, scenes):
    images, _ = scenes
    first = judge(server, tmp_path)
    answers = first.objects(images)
    sent = server.requests
    again = judge(server, tmp_path)  # a new process would build a new evaluator on the same cache_dir
    assert again.objects(images) == answers
    assert server.requests == sent
    assert all(c.cached and c.cost_usd == 0 and c.input_tokens == 0 for c in again.last_calls)
    assert again.usage["cache_hits"] == len(images) and again.usage["cost_usd"] == 0
    # another label set, task or model is another key
    judge(server, tmp_path, model="other-model").objects(images[:2])
    assert server.requests == sent + 2


def test_identical_requests_in_one_batch_are_asked_once(server, tmp_path, scenes):
    images, _ = scenes
    j = judge(server, tmp_path)
    assert j.present(np.stack([images[0]] * 3), ["ball"] * 3).count(None) == 0
    assert server.requests == 1
    assert [c.cached for c in j.last_calls] == [False, True, True]


@pytest.mark.parametrize("fault", ["429", "500"])
def test_rate_limits_and_server_errors_are_retried_with_backoff(server, tmp_path, scenes, fault):
    images, scs = scenes
    j = judge(server, tmp_path, max_retries=3, concurrency=1)
    server.fail(fault, times=2)
    start = time.monotonic()
    found = j.objects(images[:1])
    elapsed = time.monotonic() - start
    assert set(found[0]) == truth(scs[0])
    assert server.requests == 3  # two faults, then the answer
    assert j.last_calls[0].http_retries == 2 and j.usage["http_retries"] == 2
    assert elapsed > 0.375 + 0.75  # the client's exponential backoff (0.5 s, 1 s, minus up to 25 % jitter)


def test_a_hung_request_times_out_and_is_retried(tmp_path, scenes):
    images, scs = scenes
    with JudgeServer(hang_s=3.0) as server:
        j = judge(server, tmp_path, timeout_s=0.4, max_retries=1)
        server.fail("hang")
        start = time.monotonic()
        assert set(j.objects(images[:1])[0]) == truth(scs[0])
        assert 0.4 < time.monotonic() - start < 3.0
        assert server.requests == 2


def test_errors_that_outlast_the_retries_are_recorded_not_raised(server, tmp_path, scenes):
    images, _ = scenes
    j = judge(server, tmp_path, max_retries=1, concurrency=1)
    server.fail("500", times=2)
    assert j.present(images[:2], ["ball", "box"]).count(None) == 1
    missing = [c for c in j.last_calls if c.answer is None]
    assert len(missing) == 1 and missing[0].error.startswith("InternalServerError")
    assert server.requests == 3
    rows = j.evaluate(images[:1], [Item("a view", "ball", "object")])  # the next call works again
    assert rows[0]["judge_error"] is None


def test_garbage_twice_is_missing_with_the_raw_text(server, tmp_path, scenes):
    images, _ = scenes
    j = judge(server, tmp_path, concurrency=1)
    server.fail("garbage", times=2)
    assert j.objects(images[:1]) == [None]
    call = j.last_calls[0]
    assert server.requests == 2 and call.requests == 2
    assert call.raw == "Sure! I can see a few colourful shapes in this picture."
    assert call.error.startswith("invalid answer: not JSON")
    assert call.input_tokens > 0 and call.cost_usd > 0  # both attempts were paid
    assert not list((tmp_path / "cache").rglob("*.json"))  # a missing answer is not cached: a rerun asks again
    assert j.objects(images[:1]) != [None] and server.requests == 3


def test_one_malformed_answer_is_asked_again(server, tmp_path, scenes):
    images, scs = scenes
    j = judge(server, tmp_path)
    server.fail("bad_json")
    assert set(j.objects(images[:1])[0]) == truth(scs[0])
    assert server.requests == 2 and j.last_calls[0].error is None and j.last_calls[0].raw is None


@pytest.mark.parametrize("task", ["objects", "present", "closer", "background_rating"])
def test_an_invalid_value_is_malformed(server, tmp_path, scenes, task):
    images, _ = scenes
    j = judge(server, tmp_path)
    server.fail("bad_label", times=2)
    one = images[:1]
    ask = {"objects": lambda: j.objects(one), "present": lambda: j.present(one, ["ball"]),
           "closer": lambda: j.closer(one, one, one), "background_rating": lambda: j.background_rating(one, one)}
    assert ask[task]() == [None]
    assert j.last_calls[0].error.startswith("invalid answer")
    assert server.requests == 2


def test_answer_validation():
    labels = ("ball", "box", "traffic light")
    assert parse_answer("objects", '{"objects": ["Ball", "traffic light"]}', labels) == {"ball": None, "traffic light": None}
    assert parse_answer("objects", '```json\n{"objects": []}\n```', labels) == {}
    assert parse_answer("background_rating", '{"rating": 7}') == 7.0
    assert parse_answer("closer", '{"closer": "B"}') == "b"
    for task, text in [("objects", '{"objects": ["unicorn"]}'), ("objects", '{"objects": "ball"}'),
                       ("objects", '{"objects": [], "why": "x"}'), ("present", '{"present": "yes"}'),
                       ("present", '{"present": 1}'), ("closer", '{"closer": "c"}'), ("background_rating", '{"rating": 11}'),
                       ("background_rating", '{"rating": true}'), ("present", ""), ("present", "yes")]:
        with pytest.raises(InvalidAnswer):
            parse_answer(task, text, labels)


def test_a_corrupted_cache_file_is_a_miss_and_is_rewritten(server, tmp_path, scenes, caplog):
    images, scs = scenes
    judge(server, tmp_path).objects(images[:2])
    files = sorted((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 2 and not list((tmp_path / "cache").rglob("*.tmp"))
    files[0].write_text('{"task": "objects", "answer": {"obj')  # a torn write from another tool
    files[1].write_bytes(b"\xff\xfe not utf-8")
    j = judge(server, tmp_path)
    with caplog.at_level("WARNING", logger="negstudy.evaluators.judge"):
        found = j.objects(images[:2])
    assert [set(f) for f in found] == [truth(s) for s in scs[:2]]
    assert server.requests == 4
    assert caplog.text.count("is corrupted") == 2
    assert all(json.loads(f.read_text())["task"] == "objects" for f in files)
    judge(server, tmp_path).objects(images[:2])
    assert server.requests == 4


def test_the_api_key_is_never_stored_logged_or_echoed(server, tmp_path, scenes, monkeypatch, caplog):
    images, _ = scenes
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    j = judge(server, tmp_path, api_key_env="JUDGE_TEST_KEY", max_retries=0)
    with caplog.at_level("DEBUG"):
        items = [Item("a view", "ball", "object"), Item("a view", "box", "object"), Item("x", "dark", "attribute")]
        j.evaluate(images[:3], items)
        server.fail("401")  # the server echoes the Authorization header in its error message
        rows = j.evaluate(images[3:4], [Item("a view", "ball", "object")])
    assert set(server.authorizations) == {f"Bearer {SECRET}"}
    assert rows[0]["judge_error"] and "401" in rows[0]["judge_error"] and "[api key]" in rows[0]["judge_error"]
    assert SECRET not in rows[0]["judge_error"]
    files = list((tmp_path / "cache").rglob("*"))
    assert len([f for f in files if f.is_file()]) == 6
    assert all(SECRET not in f.read_text() for f in files if f.is_file())
    assert SECRET not in caplog.text


def test_key_from_a_file_and_placeholder_for_a_local_server(server, tmp_path, scenes, monkeypatch):
    images, _ = scenes
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    (tmp_path / "key").write_text(SECRET + "\n")
    judge(server, tmp_path, api_key_file=str(tmp_path / "key")).present(images[:1], ["ball"])
    judge(server, tmp_path / "other").present(images[:1], ["ball"])
    assert server.authorizations == [f"Bearer {SECRET}", f"Bearer {PLACEHOLDER_KEY}"]


def test_no_key_for_openai_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    start = time.monotonic()
    with pytest.raises(ConfigError, match="OPENAI_API_KEY") as err:
        JudgeEvaluator.from_config(OmegaConf.structured(JudgeConfig(cache_dir=str(tmp_path))))
    assert time.monotonic() - start < 1 and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="evaluator.api_key_file"):
        JudgeEvaluator.from_config(OmegaConf.structured(JudgeConfig(api_key_file=str(tmp_path / "none"))))
    with pytest.raises(ConfigError, match="evaluator.api_key_env: not an environment variable name") as err:
        JudgeEvaluator.from_config(OmegaConf.structured(JudgeConfig(api_key_env=SECRET)))
    assert SECRET not in str(err.value)
    with pytest.raises(ConfigError, match="evaluator.image_detail='ultra'"):
        JudgeEvaluator.from_config(OmegaConf.structured(JudgeConfig(image_detail="ultra")))


def test_evaluate_columns(server, tmp_path, scenes):
    images, scs = scenes
    items = [Item("a view", "ball", "object"), Item("a view", "a box", "object"), Item("a view", "dark", "attribute")]
    j = judge(server, tmp_path)
    rows = j.evaluate(images[:3], items)
    for row, item, scene in zip(rows, items, scs):
        assert set(row["judge_objects"].split(",") if row["judge_objects"] else []) == truth(scene)
        want = None if item.category == "attribute" else bool(set(world.parse_caption(item.negative).objects) & truth(scene))
        assert row["negative_present"] is want
        assert row["judge_cached"] is False and row["judge_error"] is None and row["judge_raw"] is None
        assert row["judge_input_tokens"] > 0 and row["judge_cost_usd"] > 0
    assert server.requests == 5  # objects for 3 images, present for the 2 object negatives
    again = j.evaluate(images[:3], items)
    assert all(r["judge_cached"] and r["judge_cost_usd"] == 0 for r in again) and server.requests == 5


def test_concurrency_and_rate_limit(tmp_path, scenes):
    images, _ = scenes
    with JudgeServer(delay_s=0.15) as server:
        j = judge(server, tmp_path, concurrency=3, requests_per_minute=60_000)
        j.present(images[:9], ["ball"] * 9)
        assert server.max_in_flight == 3
    with JudgeServer() as server:
        j = judge(server, tmp_path / "rpm", concurrency=4, requests_per_minute=600)  # one start per 0.1 s
        start = time.monotonic()
        j.present(images[:6], ["ball"] * 6)
        assert time.monotonic() - start >= 0.5


def test_hydra_composes_evaluator_judge(monkeypatch, tmp_path):
    from hydra import compose, initialize_config_module

    register_configs()
    with initialize_config_module(config_module="negstudy.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["evaluator=judge", "evaluator.labels=shapes",
                                                       f"evaluator.cache_dir={tmp_path}"])
    assert cfg.evaluator.name == "judge" and cfg.evaluator.base_url is None and cfg.evaluator.model == "gpt-4o"
    assert OmegaConf.to_container(cfg.evaluator).keys() == OmegaConf.to_container(OmegaConf.structured(JudgeConfig)).keys()
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    evaluator = build(cfg.evaluator, "evaluator", world="shapes")
    assert isinstance(evaluator, JudgeEvaluator) and evaluator.labels == world.OBJECT_NAMES
    assert evaluator.base_url == "https://api.openai.com/v1"
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        build(cfg.evaluator, "evaluator", world="shapes")
