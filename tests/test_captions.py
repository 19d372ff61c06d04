"""Caption files of the removal prompt sets (negstudy.captions): a small fixture of each format."""

import json

import pytest

from negstudy.captions import FORMATS, detect_format, objects_caption, places_caption, read_captions
from negstudy.errors import ConfigError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def write_json(tmp_path, name, data):
    return write(tmp_path, name, json.dumps(data))


def test_conceptual_captions_tsv(tmp_path):
    path = write(tmp_path, "Train_GCC-training.tsv",
                 "caption\turl\n"
                 "a very typical bus station\thttp://example.com/1.jpg\n"
                 'sierra " quoted  word\thttp://example.com/2.jpg\n'
                 "\n"
                 "a very typical bus station\thttp://example.com/3.jpg\n"
                 "  actor attends the premiere  \thttp://example.com/4.jpg\n")
    assert read_captions(path, "conceptual_captions") == [
        "a very typical bus station", 'sierra " quoted word', "actor attends the premiere"]
    assert read_captions(path) == read_captions(path, "conceptual_captions")  # auto: .tsv
    labels = write(tmp_path, "labels.tsv", "a dog runs\tdog,grass\t/m/0bt9lr\t0.9\n")  # the Image Labels subset
    assert read_captions(labels, "auto") == ["a dog runs"]


def test_msvd_json_layouts_interleave_videos(tmp_path):
    by_video = {"vid1": ["a man is cooking", "someone cooks", "a man is cooking"], "vid2": ["a cat plays"]}
    expected = ["a man is cooking", "a cat plays", "someone cooks"]  # first of each video, then the second ...
    assert read_captions(write_json(tmp_path, "msvd.json", by_video), "msvd") == expected
    records = [{"video_id": "vid1", "caption": "a man is cooking"}, {"video_id": "vid1", "caption": "someone cooks"},
               {"video_id": "vid2", "caption": "a cat plays"}]
    assert read_captions(write_json(tmp_path, "records.json", records), "msvd") == expected
    assert read_captions(write_json(tmp_path, "sentences.json", {"sentences": records}), "auto") == expected
    listed = [{"video_id": "vid1", "caption": ["a man is cooking", "someone cooks"]}, {"video_id": "vid2", "caption": ["a cat plays"]}]
    assert read_captions(write_json(tmp_path, "listed.json", listed), "auto") == expected
    coco_style = {"annotations": [dict(r, id=i) for i, r in enumerate(records)]}
    assert read_captions(write_json(tmp_path, "coco_style.json", coco_style), "auto") == expected


def test_msvd_text_and_corpus_csv(tmp_path):
    text = write(tmp_path, "MSVD.txt", "-4wsuPCjDBc_5_15 a squirrel is eating a peanut\n"
                                       "-4wsuPCjDBc_5_15 a chipmunk eats\n"
                                       "zv2RIbUsnSw_159_165 a man plays a guitar\n")
    assert detect_format(text) == "msvd"
    assert read_captions(text) == ["a squirrel is eating a peanut", "a man plays a guitar", "a chipmunk eats"]
    corpus = write(tmp_path, "MSR Video Description Corpus.csv",
                   "VideoID,Start,End,WorkerID,Source,AnnotationTime,Language,Description\n"
                   "mv89psg6zh4,33,46,1,clean,18,English,A bird is bathing in a sink.\n"
                   "mv89psg6zh4,33,46,2,clean,18,German,Ein Vogel badet.\n"
                   'mv89psg6zh4,33,46,3,clean,18,English,"A bird, wet, splashes."\n'
                   "60x_yxy7Sfw,1,8,4,clean,18,English,A dog runs.\n")
    assert read_captions(corpus, "msvd") == ["A bird is bathing in a sink.", "A dog runs.", "A bird, wet, splashes."]


def test_vatex_json(tmp_path):
    data = [{"videoID": "Ptf_2VRj-V0_000122_000132", "enCap": ["A man plays drums.", "Someone drums."],
             "chCap": ["一个男人在打鼓。"]},
            {"videoID": "x9Uq2lD0JkE_000005_000015", "enCap": ["Kids swim in a pool."]}]
    path = write_json(tmp_path, "vatex_training_v1.0.json", data)
    assert read_captions(path, "vatex") == ["A man plays drums.", "Kids swim in a pool.", "Someone drums."]
    assert read_captions(path) == read_captions(path, "vatex")
    assert read_captions(path, limit=2) == ["A man plays drums.", "Kids swim in a pool."]  # first caption per video
    with pytest.raises(ConfigError, match='dataset.path=.*not a VATEX caption file.*"enCap"'):
        read_captions(write_json(tmp_path, "other.json", [{"caption": "x"}]), "vatex")


def test_places365_categories(tmp_path):
    path = write(tmp_path, "categories_places365.txt",
                 "/a/abbey 0\n/a/apartment_building/outdoor 8\n/a/arena/hockey 15\n/b/bakery/shop 31\n"
                 "/c/church/indoor 90\n/s/subway_station/platform 320\n/t/temple/asia 330\n/u/utility_room 343\n"
                 "/i/igloo 191\n/s/sky 306\n")
    expected = ["a photo of an abbey", "a photo of an outdoor apartment building", "a photo of a hockey arena",
                "a photo of a bakery shop", "a photo of an indoor church", "a photo of a subway station platform",
                "a photo of an asian temple", "a photo of a utility room", "a photo of an igloo", "a photo of the sky"]
    assert read_captions(path, "places365") == expected
    assert detect_format(path) == "places365" and read_captions(path) == expected
    assert places_caption("/u/underwater/ocean_deep") == "a photo of the deep ocean, underwater"
    with pytest.raises(ConfigError, match="line 2 is not a Places365 category"):
        read_captions(write(tmp_path, "bad.txt", "/a/abbey 0\nabbey\n"), "places365")


def test_nocaps_json(tmp_path):
    data = {"info": {}, "images": [{"id": 0}, {"id": 1}],
            "annotations": [{"image_id": 0, "id": 0, "caption": "A baby with a toy."},
                            {"image_id": 0, "id": 1, "caption": "  a   baby holding a toy "},
                            {"image_id": 1, "id": 2, "caption": "Two jellyfish in the water."},
                            {"image_id": 1, "id": 3, "caption": ""}]}
    path = write_json(tmp_path, "nocaps_val_4500_captions.json", data)
    assert read_captions(path, "nocaps") == ["A baby with a toy.", "Two jellyfish in the water.", "a baby holding a toy"]
    assert detect_format(path) == "nocaps"
    test_split = write_json(tmp_path, "nocaps_test_image_info.json", {"images": [{"id": 0}]})
    with pytest.raises(ConfigError, match="publishes no captions"):
        read_captions(test_split)


def test_coco_object_scenes(tmp_path):
    path = write(tmp_path, "scenes.txt", "dog, frisbee, bench\numbrella\nperson; two cups\n\ndog, frisbee, bench\n")
    expected = ["a photo of a dog, a frisbee and a bench", "a photo of an umbrella", "a photo of a person and two cups"]
    assert read_captions(path, "coco_objects") == expected
    assert detect_format(write(tmp_path, "auto.txt", "dog, frisbee\ncat\n")) == "coco_objects"
    assert objects_caption(["apple", "an orange", "3 bananas"]) == "a photo of an apple, an orange and 3 bananas"


def test_plain_text_dedupes_strips_and_limits(tmp_path):
    path = write(tmp_path, "prompts.txt", "  a red car on a street \n\nA cat on a sofa\na red car on a street\n\tlast one\n")
    assert read_captions(path) == ["a red car on a street", "A cat on a sofa", "last one"]
    assert read_captions(path, "txt", limit=2) == ["a red car on a street", "A cat on a sofa"]


def test_bad_format_missing_file_and_bad_content_name_the_key(tmp_path):
    path = write(tmp_path, "p.txt", "a cat\n")
    with pytest.raises(ConfigError) as err:
        read_captions(path, "coco")
    assert str(err.value) == f"dataset.format='coco': allowed values are {', '.join(FORMATS)}"
    with pytest.raises(ConfigError, match=r"^dataset.path='.*missing.tsv': no such file$"):
        read_captions(tmp_path / "missing.tsv")
    with pytest.raises(ConfigError, match="dataset.path=.*not valid JSON"):
        read_captions(write(tmp_path, "broken.json", "{"), "msvd")
    with pytest.raises(ConfigError, match=r"dataset.path=.*no captions in it"):
        read_captions(write(tmp_path, "empty.txt", "\n  \n"))
    with pytest.raises(ConfigError, match="not an MSVD caption file"):
        read_captions(write_json(tmp_path, "odd.json", {"x": {"y": 1}}), "msvd")
    with pytest.raises(ConfigError, match="dataset.limit=0"):
        read_captions(path, limit=0)
