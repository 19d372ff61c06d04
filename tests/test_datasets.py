"""Prompt files are data: CSV, JSONL and TXT give the same pairs; bad files fail with one line."""

import pytest
from omegaconf import OmegaConf

from negstudy.datasets import Pair, pairs_of, read_pairs
from negstudy.errors import ConfigError

EXPECTED = [Pair("a lawn in a courtyard", "flowers", "object"), Pair("a woman on the street", "ugly", "attribute"),
            Pair("a red ball", "__import__('os').system('x')", "object")]


def test_three_formats_agree(tmp_path):
    (tmp_path / "p.csv").write_text("prompt,negative,category\na lawn in a courtyard,flowers,object\n"
                                    "a woman on the street,ugly,attribute\na red ball,__import__('os').system('x'),\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a lawn in a courtyard", "negative": "flowers"}\n'
                                      '{"prompt": "a woman on the street", "negative": "ugly", "category": "attribute"}\n\n'
                                      '{"prompt": "a red ball", "negative": "__import__(\'os\').system(\'x\')"}\n')
    (tmp_path / "p.txt").write_text("# pairs\na lawn in a courtyard\tflowers\na woman on the street\tugly\tattribute\n"
                                    "a red ball\t__import__('os').system('x')\n")
    for name in ("p.csv", "p.jsonl", "p.txt"):
        assert read_pairs(tmp_path / name) == EXPECTED  # text stays text: nothing is evaluated


def test_limit_and_inline_pairs(tmp_path):
    (tmp_path / "p.csv").write_text("prompt,negative\na,b\nc,d\ne,f\n")
    cfg = OmegaConf.create({"name": "x", "pairs": [], "path": str(tmp_path / "p.csv"), "limit": 2})
    assert [p.prompt for p in pairs_of(cfg)] == ["a", "c"]
    inline = OmegaConf.create({"name": "x", "pairs": [{"prompt": "a", "negative": "b", "category": "object"}], "path": None, "limit": None})
    assert pairs_of(inline) == [Pair("a", "b", "object")]


@pytest.mark.parametrize("content, message", [
    ("prompt,negative\n", "the prompt set is empty"),
    ("text,neg\nx,y\n", "cannot read pairs (KeyError"),
    ("prompt,negative,category\nx,y,colour\n", "[0].category='colour': allowed values are object, attribute"),
])
def test_bad_files(tmp_path, content, message):
    (tmp_path / "bad.csv").write_text(content)
    with pytest.raises(ConfigError) as err:
        read_pairs(tmp_path / "bad.csv")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_broken_jsonl(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "negative": \n')
    with pytest.raises(ConfigError, match="cannot read pairs"):
        read_pairs(tmp_path / "bad.jsonl")
