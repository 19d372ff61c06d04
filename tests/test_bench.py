"""scripts/bench.py --quick on the tiny model, in-process: the figures it reports hold."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("negstudy_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_bench_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = load_bench().main(["--quick", "--models", str(tiny_model_dir), "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(printed.strip().splitlines()[-1])  # one run, two copies
    (m,) = results["models"].values()
    assert m["steps"] == 10 and m["n_calls"] == 11  # PNDM: steps + 1 calls
    sweep = m["sweep"]
    assert sweep["schedules"] == m["n_calls"] + 1  # from_step k = 0..n_calls
    assert sweep["rows_independent"] == 2 * m["n_calls"] * sweep["schedules"]
    assert sweep["rows_ratio"] < 0.6  # (n + 3) / (2 (n + 1)) = 0.583 for n = 11: prefixes ran once
    assert sweep["max_pixel_diff"] == 0.0  # CPU, fixed rows: lanes equal separate runs bit for bit
    assert m["sweep_off"]["max_pixel_diff"] <= 1e-5 and m["sweep_off"]["rows_ratio"] == sweep["rows_ratio"]
    diff = m["diffusers"]
    assert diff["on"]["fixed_rows"] == 8 and diff["off"]["fixed_rows"] == 0
    assert max(diff["on"]["max_pixel_diff"], diff["off"]["max_pixel_diff"]) <= 1e-5  # StableDiffusionPipeline's images
    att = m["attention"]
    assert att["same_pixels"] and att["bytes_per_image"] > 0
    assert all(x > 0 for x in (diff["on"]["wall_ratio"], att["wall_ratio"], m["fixed_rows"]["wall_ratio"]))
    opts = m["options"]["options"]
    assert opts["fixed rows (default)"]["ratio"] == 1.0 and opts["fixed rows (default)"]["max_pixel_diff"] == 0.0
    assert opts["fixed rows (default)"]["batch_independent"] and opts["bf16 autocast"]["batch_independent"]
    assert opts["fixed rows off"]["max_pixel_diff"] <= 1e-5 < opts["bf16 autocast"]["max_pixel_diff"]
    assert m["prefix_reuse"]["total_after"] < m["prefix_reuse"]["total_before"]
    assert "| UNet rows: shared prefix / independent |" in printed and "machine: " in printed
