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


def test_real_configurations_have_the_published_sizes():
    """sd2 / sdxl are built from SD 2 base's and SDXL base 1.0's configurations: on the meta device (no
    memory, no time) every component has the parameter count of the published checkpoint."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    bench = load_bench()
    with torch.device("meta"):
        built = {
            "sd2 unet": UNet2DConditionModel(**bench.SD2_UNET), "sdxl unet": UNet2DConditionModel(**bench.SDXL_UNET),
            "sd2 vae": AutoencoderKL(**bench.SD2_VAE), "sdxl vae": AutoencoderKL(**bench.SDXL_VAE),
            "sd2 text": CLIPTextModel(CLIPTextConfig(**bench.SD2_TEXT)),
            "sdxl text": CLIPTextModel(CLIPTextConfig(**bench.SDXL_TEXT)),
            "sdxl text_2": CLIPTextModelWithProjection(CLIPTextConfig(**bench.SDXL_TEXT_2)),
        }
    sizes = {name: sum(p.numel() for p in m.parameters()) for name, m in built.items()}
    assert sizes == {"sd2 unet": 865_910_724, "sdxl unet": 2_567_463_684, "sd2 vae": 83_653_863, "sdxl vae": 83_653_863,
                     "sd2 text": 340_387_840, "sdxl text": 123_060_480, "sdxl text_2": 694_659_840}


def test_gpu_figures_dry_run(tmp_path, capsys):
    """The GPU run's code (sd2, sdxl: sampler vs the diffusers pipelines, attention, throughput, projections, the
    largest-batch search, sweep) on the CPU at 64 px with narrowed channels; --report rebuilds the same tables."""
    bench = load_bench()
    out = tmp_path / "dry.json"
    results = bench.main(["--quick", "--models", "sd2,sdxl", "--device", "cpu", "--max-batch", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "NOTE: measured on cpu, not a GPU" in printed and printed.count("goal check: ") == 2
    for name, layers in (("sd2", 15), ("sdxl", 60)):  # SD2: the paper's 15 down/up layers; SDXL: 2x2 + 2x10 down, 3x2 + 3x10 up
        m = results["models"][name]
        assert "NARROWED" in m["about"] and m["fixed_rows_used"] == 0 and "errors" not in m
        assert m["diffusers"]["off"]["max_pixel_diff"] <= 1e-5 and m["diffusers"]["off"]["finite"]  # = diffusers' pipeline
        assert m["attention"]["layers"] == layers and m["attention"]["same_pixels"]
        assert m["capacity"]["batch"] == 2 and m["capacity"]["out_of_memory"] is None  # the doubling search, to its cap
        thr = m["throughput"]
        assert thr["batch"] == 2 and thr["rows"] == 2 * thr["batch"] * thr["n_calls"] and thr["rows_per_s"] > 0
        sweep = m["sweep"]
        assert sweep["rows_independent"] == 2 * m["n_calls"] * sweep["schedules"] > sweep["rows_shared"]
        assert sweep["max_pixel_diff"] <= 1e-5
        removal = m["projection"]["removal"]
        # the hand count of negstudy.studies.removal's rows: originals 2 x 31, per object from-0 2 x 31, window
        # 2 x (31 - 5), adaptive first try 2 x (31 - 6); worst: tries continuing after ends 10, 15, 20, 25
        best, worst = 2000 * 62 + 8638 * (62 + 52 + 50), 2000 * 62 + 8638 * (62 + 52 + 50 + 40 + 30 + 20 + 10)
        assert (removal["best"]["rows"], removal["worst"]["rows"]) == (best, worst)
        assert best < removal["expected"]["rows"] < worst < removal["worst"]["rows_without_prefix_reuse"]
        assert removal["best"]["judge_calls"] == 2000 + 3 * 8638
        assert removal["best"]["seconds"] < removal["expected"]["seconds"] < removal["worst"]["seconds"]
    assert bench.report(json.loads(out.read_text())) in printed  # the saved JSON holds every figure printed
