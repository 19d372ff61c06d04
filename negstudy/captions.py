"""Caption files of the paper's removal prompt sets (PAPER.md section 6), read from the user's disk.

:func:`read_captions` returns prompts: stripped (inner whitespace collapsed), empty ones skipped,
duplicates dropped (first kept), cut to ``limit``. Files are parsed as data only (``json`` and
``csv``), never executed or unpickled. Formats (``dataset.format``):

- ``conceptual_captions``: Conceptual Captions TSV, ``caption<TAB>url`` per line (the first column
  is taken, so the Image Labels subset's ``caption<TAB>labels<TAB>...`` works too); a
  ``caption<TAB>url`` header row is skipped;
- ``msvd``: MSVD captions as JSON, one of ``{"<video id>": ["caption", ...]}``,
  ``[{"video_id": ..., "caption": "..." or [...]}]``, ``{"sentences": [...]}`` (MSR-VTT style) or
  ``{"annotations": [...]}`` (COCO style); or the text dump ``<video id> <caption>`` per line
  (the author's ``MSVD.txt``); or Microsoft's ``MSR Video Description Corpus.csv`` (English rows);
- ``vatex``: VATEX JSON, ``[{"videoID": ..., "enCap": [English captions]}]``
  (``vatex_training_v1.0.json``, ``vatex_validation_v1.0.json``, ``vatex_public_test_english_v1.1.json``);
- ``places365``: ``categories_places365.txt``, ``/a/abbey 0`` per line, made "a photo of an abbey";
  ``/a/apartment_building/outdoor`` becomes "a photo of an outdoor apartment building";
- ``nocaps``: NoCaps JSON, COCO style ``{"annotations": [{"image_id": ..., "caption": ...}]}``
  (``nocaps_val_4500_captions.json``; the test split publishes no captions);
- ``coco_objects``: one scene per line, its COCO objects separated by commas (``dog, frisbee, bench``),
  made "a photo of a dog, a frisbee and a bench" (a template, where the paper had GPT-4 write scenes);
- ``txt``: one caption per line.

Video and image sets hold several captions per item, written by different people about the same
clip: they are interleaved, every item's first caption, then every item's second, ..., so that the
first ``limit`` prompts are different scenes (the author's code took VATEX's first English caption
per video). ``auto`` guesses the format from the extension and the content (:func:`detect_format`).
"""

from __future__ import annotations

import csv
import itertools
import json
import re
from pathlib import Path

from negstudy.errors import ConfigError

FORMATS = ("auto", "conceptual_captions", "msvd", "vatex", "places365", "nocaps", "coco_objects", "txt")
PLACES_LINE = re.compile(r"^/[a-z]/[^\s/]+(/[^\s/]+)*(\s+\d+)?$")
MSVD_LINE = re.compile(r"^(\S{11}_\d+_\d+)\s+(.+)$")  # YouTube id _ start _ end, then the caption

# Places365 second-level names: most read as a prefix ("outdoor church", "hockey arena"); these
# follow the noun, and a few whole names read better rewritten.
PLACES_SUFFIX = {"platform", "door", "shop"}
PLACES_PHRASES = {"temple/asia": "an asian temple", "underwater/ocean_deep": "the deep ocean, underwater",
                  "moat/water": "a moat with water", "sky": "the sky", "badlands": "badlands",
                  "office_cubicles": "office cubicles"}
SPELLED_NUMBERS = {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "several", "many", "some"}


def read_captions(path: str | Path, format: str = "auto", limit: int | None = None) -> list[str]:
    """Prompts from a caption file of the given format (see the module doc); ConfigError naming
    ``dataset.format`` / ``dataset.path`` / ``dataset.limit`` when they cannot work."""
    if format not in FORMATS:
        raise ConfigError(f"dataset.format={format!r}: allowed values are {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"dataset.limit={limit}: must be >= 1 or null")
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"dataset.path={str(path)!r}: no such file")
    if format == "auto":
        format = detect_format(file)
    captions = _clean(READERS[format](file))
    if not captions:
        raise ConfigError(f"dataset.path={str(path)!r}: no captions in it (read as dataset.format={format})")
    return captions[:limit]


def detect_format(path: str | Path) -> str:
    """The format of a caption file, from its extension and content."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix == ".tsv":
        return "conceptual_captions"
    if suffix == ".json":
        data = _json(file)
        if isinstance(data, list) and data and isinstance(data[0], dict) and "enCap" in data[0]:
            return "vatex"
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            first = data["annotations"][0] if data["annotations"] else {}
            return "msvd" if isinstance(first, dict) and "video_id" in first else "nocaps"
        if isinstance(data, dict) and "images" in data:
            return "nocaps"  # a NoCaps file without captions: its reader says so
        return "msvd"  # the other JSON layouts are MSVD's; its reader names them if this is none
    if suffix == ".csv":
        return "msvd"
    lines = [line.strip() for line in _text(file).splitlines() if line.strip()]
    if lines and all(PLACES_LINE.match(line) for line in lines):
        return "places365"
    if lines and all(MSVD_LINE.match(line) for line in lines):
        return "msvd"
    if lines and all(_is_object_list(line) for line in lines):
        return "coco_objects"
    return "txt"


def places_caption(category: str) -> str:
    """``/a/apartment_building/outdoor`` -> "a photo of an outdoor apartment building"."""
    parts = [p for p in category.strip().split("/") if p]
    if len(parts) >= 2 and len(parts[0]) == 1:
        parts = parts[1:]  # the alphabetical bucket
    key = "/".join(parts)
    if key in PLACES_PHRASES:
        return f"a photo of {PLACES_PHRASES[key]}"
    name, qualifiers = parts[0].replace("_", " "), [q.replace("_", " ") for q in parts[1:]]
    for q in qualifiers:
        name = f"{name} {q}" if q in PLACES_SUFFIX else f"{q} {name}"
    return f"a photo of {with_article(name)}"


def objects_caption(objects: list[str]) -> str:
    """["dog", "frisbee", "bench"] -> "a photo of a dog, a frisbee and a bench"."""
    items = [with_article(o) for o in dict.fromkeys(" ".join(o.split()) for o in objects) if o]
    if len(items) > 1:
        return f"a photo of {', '.join(items[:-1])} and {items[-1]}"
    return f"a photo of {items[0]}" if items else ""


def with_article(noun: str) -> str:
    """"a"/"an" before a singular noun phrase; one that has an article or a count already is kept."""
    first = noun.split()[0].lower() if noun.split() else ""
    if first in ("a", "an", "the") or first in SPELLED_NUMBERS or first[:1].isdigit():
        return noun
    sounds_like_you = noun.lower().startswith(("uni", "use", "usu", "uti", "eu", "one"))
    return f"an {noun}" if noun[:1].lower() in "aeiou" and not sounds_like_you else f"a {noun}"


# -- readers: each returns raw captions, in order -------------------------------------------------


def _conceptual_captions(file: Path) -> list[str]:
    with file.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if rows and rows[0] and rows[0][0].strip().lower() == "caption":
        rows = rows[1:]
    return [row[0] for row in rows if row]


def _msvd(file: Path) -> list[str]:
    if file.suffix.lower() == ".csv":
        return _msvd_csv(file)
    if file.suffix.lower() != ".json":
        return _msvd_text(file)
    data = _json(file)
    expected = ('expected {"<video id>": [captions]}, [{"video_id": ..., "caption": ...}], '
                '{"sentences": [...]} or {"annotations": [...]}')
    if isinstance(data, dict) and isinstance(data.get("sentences"), list):
        return _interleave(_records(data["sentences"], file, expected))
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        return _interleave(_records(data["annotations"], file, expected))
    if isinstance(data, dict) and data and all(isinstance(v, (list, str)) for v in data.values()):
        return _interleave([(video, c) for video, caps in data.items() for c in ([caps] if isinstance(caps, str) else caps)])
    if isinstance(data, list):
        return _interleave(_records(data, file, expected))
    raise ConfigError(f"dataset.path={str(file)!r}: not an MSVD caption file: {expected}")


def _msvd_text(file: Path) -> list[str]:
    pairs = []
    for number, line in enumerate(_text(file).splitlines(), 1):
        if not line.strip():
            continue
        match = MSVD_LINE.match(line.strip())
        if not match:
            raise ConfigError(f"dataset.path={str(file)!r}: line {number} is not '<video id> <caption>' "
                              "(MSVD text, e.g. '-4wsuPCjDBc_5_15 a squirrel is eating a peanut')")
        pairs.append(match.groups())
    return _interleave(pairs)


def _msvd_csv(file: Path) -> list[str]:
    with file.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "Description" not in reader.fieldnames:
            raise ConfigError(f"dataset.path={str(file)!r}: not the MSVD corpus CSV (expected the columns VideoID, "
                              "Start, End, ..., Language, Description)")
        rows = [r for r in reader if (r.get("Language") or "English").strip() == "English"]
    return _interleave([(f"{r.get('VideoID')}_{r.get('Start')}_{r.get('End')}", r["Description"] or "") for r in rows])


def _vatex(file: Path) -> list[str]:
    data = _json(file)
    if not isinstance(data, list) or not all(isinstance(v, dict) and isinstance(v.get("enCap"), list) for v in data):
        raise ConfigError(f"dataset.path={str(file)!r}: not a VATEX caption file: expected a JSON list of "
                          '{"videoID": ..., "enCap": [English captions]}')
    return _interleave([(v.get("videoID", i), c) for i, v in enumerate(data) for c in v["enCap"]])


def _nocaps(file: Path) -> list[str]:
    data = _json(file)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        extra = " (the NoCaps test split publishes no captions: use nocaps_val_4500_captions.json)" \
            if isinstance(data, dict) and "images" in data else ""
        raise ConfigError(f"dataset.path={str(file)!r}: not a NoCaps caption file: expected COCO-style "
                          f'{{"annotations": [{{"image_id": ..., "caption": ...}}]}}{extra}')
    return _interleave(_records(data["annotations"], file, 'expected {"annotations": [{"image_id": ..., "caption": ...}]}'))


def _places365(file: Path) -> list[str]:
    captions = []
    for number, line in enumerate(_text(file).splitlines(), 1):
        if not line.strip():
            continue
        if not PLACES_LINE.match(line.strip()):
            raise ConfigError(f"dataset.path={str(file)!r}: line {number} is not a Places365 category "
                              "('/a/abbey 0' or '/a/apartment_building/outdoor 8')")
        captions.append(places_caption(line.split()[0]))
    return captions


def _coco_objects(file: Path) -> list[str]:
    return [objects_caption(re.split(r"[,;\t]", line)) for line in _text(file).splitlines() if line.strip()]


def _txt(file: Path) -> list[str]:
    return _text(file).splitlines()


READERS = {"conceptual_captions": _conceptual_captions, "msvd": _msvd, "vatex": _vatex, "places365": _places365,
           "nocaps": _nocaps, "coco_objects": _coco_objects, "txt": _txt}


# -- helpers ----------------------------------------------------------------------------------------

ID_KEYS = ("video_id", "videoID", "video", "vid", "image_id", "id")
CAPTION_KEYS = ("caption", "captions", "sentence", "enCap")


def _records(records: list, file: Path, expected: str) -> list[tuple[object, str]]:
    """(item id, caption) of JSON records holding one caption or a list of them."""
    pairs = []
    for i, record in enumerate(records):
        if isinstance(record, str):
            pairs.append((i, record))
            continue
        key = next((k for k in CAPTION_KEYS if isinstance(record, dict) and k in record), None)
        if key is None:
            raise ConfigError(f"dataset.path={str(file)!r}: record {i} has no caption field "
                              f"({', '.join(CAPTION_KEYS)}): {expected}")
        item = next((record[k] for k in ID_KEYS if k in record), i)
        values = record[key] if isinstance(record[key], list) else [record[key]]
        pairs += [(item, v) for v in values]
    return pairs


def _interleave(pairs) -> list[str]:
    """Captions grouped by item (first appearance order), then taken round-robin across items."""
    groups: dict[object, list[str]] = {}
    for item, caption in pairs:
        groups.setdefault(json.dumps(item) if isinstance(item, (list, dict)) else item, []).append(caption)
    return [c for round_ in itertools.zip_longest(*groups.values()) for c in round_ if c is not None]


def _clean(captions) -> list[str]:
    return list(dict.fromkeys(" ".join(c.split()) for c in captions if isinstance(c, str) and c.strip()))


def _is_object_list(line: str) -> bool:
    from negstudy.labels import COCO_80

    items = [i.strip().lower() for i in re.split(r"[,;\t]", line) if i.strip()]
    return bool(items) and all(i in COCO_80 for i in items)


def _text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"dataset.path={str(file)!r}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _json(file: Path):
    try:
        return json.loads(_text(file))
    except json.JSONDecodeError as err:
        raise ConfigError(f"dataset.path={str(file)!r}: not valid JSON (line {err.lineno}: {err.msg})") from None
