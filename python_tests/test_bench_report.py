"""bench/report.py: one markdown table from the benchmarks' JSON. The docs below have the shapes
the bench scripts write (bench/bench_*.py), with made-up numbers."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
GPU, CPU = "NVIDIA H200", "cpu (x86_64, 2 threads)"
MIB = 2**20


def load_report():
    spec = importlib.util.spec_from_file_location("bench_report", BENCH / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


report = load_report()


def timing(seconds):  # bench/common.py time_fn's dict
    return {"median_s": seconds, "min_s": seconds * 0.9, "runs": 20}


def doc(bench, device, results, **extra):  # bench/common.py write_results's doc
    return {"bench": bench, "device": device, "torch": "2.8.0", "results": results, **extra}


def attention_pool_doc():
    case = "256x2048x7x7 bfloat16"

    def record(impl, fwd_bwd, peak):
        return {"case": case, "impl": impl, "grad_x": False, "fwd": timing(fwd_bwd / 4),
                "bwd": timing(fwd_bwd / 2), "fwd+bwd": timing(fwd_bwd),
                "fwd_mean_attention": timing(fwd_bwd / 3), "peak_bytes_fwd+bwd": peak,
                "speedup_vs_this": fwd_bwd / 200e-6}

    ours = {**record("lusscore", 200e-6, 8 * MIB), "hbm_floor_s": 100e-6, "hbm_fraction": 0.5}
    return doc("attention_pool", GPU, [record("eager", 1e-3, 96 * MIB),
                                       record("torch.compile", 400e-6, 64 * MIB), ours],
               peak_bandwidth_gbs=4800.0)


def hp_loss_doc():
    small, large = "N=4096 d=512 d_f=384 rho=0.02", "N=24576 d=512 d_f=384 rho=0.02"

    def record(case, impl, n, seconds, peak, ours_seconds, ours_peak):
        return {"case": case, "impl": impl, "n": n, "peak_bytes": peak, "fwd+bwd": timing(seconds),
                "time_vs_ours": seconds / ours_seconds, "memory_vs_ours": peak / ours_peak}

    return doc("hp_loss", CPU, [
        record(small, "lusscore", 4096, 1.72, 11 * MIB, 1.72, 11 * MIB),
        record(small, "reference (chunked, masks)", 4096, 16.3, 821 * MIB, 1.72, 11 * MIB),
        record(small, "all-pairs (official HP's way)", 4096, 1.36, 531 * MIB, 1.72, 11 * MIB),
        record(large, "lusscore", 24576, 36.9, 51 * MIB, 36.9, 51 * MIB),
        {"case": large, "impl": "all-pairs (official HP's way)", "n": 24576,
         "error": "killed (out of memory)"},
    ])


def kmeans_gpu_doc():
    cuda_case = {"case": "N=1183322 D=2048 K=919 float32", "n": 1183322, "d": 2048, "k": 919,
                 "dtype": "torch.float32", "ours_step_s": 0.050, "ours_assign_fused_s": 0.030,
                 "ours_assign_buffered_s": 0.036, "torch_baseline_step_s": 0.150,
                 "torch_baseline_assign_s": 0.090, "torch_compile_error": "BackendCompilerFailed: x",
                 "gemm_bound_s": 0.025, "gemm_bound_chunk_rows": 65536,
                 "fused_over_gemm_bound": 1.2, "buffered_over_gemm_bound": 1.44}
    bf16_case = {**cuda_case, "case": "N=1183322 D=2048 K=919 bfloat16", "dtype": "torch.bfloat16",
                 "torch_compile_step_s": 0.100}
    del bf16_case["torch_compile_error"]
    buffer = {"case": "buffered assign N=58000000 D=128 K=919 bf16, score buffer 32 MB",
              "ours_assign_buffered_s": 0.5}
    upload = {"case": "upload N=58000000 D=128 fp32 (pinned)", "upload_s": 1.5}
    fit = {"case": "fit N=58000000 D=128 K=919 float32", "n": 58000000, "d": 128, "k": 919, "niter": 20,
           "dtype": "torch.float32", "fit_s": 12.5, "final_objective": 1.0e8}
    cpu = {"case": "cpu N=20000 D=32 K=50 float32, 1 thread(s)", "n": 20000, "d": 32, "k": 50,
           "threads": 1, "repeats": 3, "ours_assign_s": 0.010, "ours_step_s": 0.012,
           "torch_baseline_step_s": 0.030}  # faiss not installed on that machine
    return doc("kmeans", GPU, [cuda_case, bf16_case, buffer, upload, fit, cpu], quick=True, faiss=None)


def kmeans_cpu_doc():
    cpu = {"case": "cpu N=100000 D=128 K=919 float32, 2 thread(s)", "n": 100000, "d": 128, "k": 919,
           "threads": 2, "repeats": 7, "ours_assign_s": 0.2, "ours_step_s": 0.25,
           "torch_baseline_step_s": 0.5, "faiss_assign_s": 0.3, "faiss_iter_s": 0.75,
           "assign_ratio_ours_over_faiss": 0.2 / 0.3, "step_ratio_ours_over_faiss_iter": 0.25 / 0.75}
    fit = {"case": "fit N=100000 D=128 K=919 float32 cpu", "n": 100000, "d": 128, "k": 919, "niter": 3,
           "dtype": "torch.float32", "fit_s": 2.0, "final_objective": 5.0e5}
    return doc("kmeans", CPU, [cpu, fit], quick=False, faiss="1.9.0")


def overlap_gather_doc():
    base = {"case": "(256,512,7,7)->7x7", "dtype": "bfloat16"}

    def record(impl, fwd, fwd_bwd, peak, layout="contiguous"):
        return {**base, "layout": layout, "impl": impl, "forward": timing(fwd),
                "fwd_bwd": timing(fwd_bwd), "peak_bytes": peak}

    return doc("overlap_gather", GPU, [
        record("lusscore", 20e-6, 50e-6, 3 * MIB),
        record("reference_grid_sample", 80e-6, 300e-6, 12 * MIB),
        record("reference_compiled", 40e-6, 150e-6, 10 * MIB),
        {**base, "layout": "contiguous", "impl": "torchvision_roi_align",
         "error": "RuntimeError: \"roi_align_forward_kernel\" not implemented for 'BFloat16'"},
        record("lusscore", 25e-6, 60e-6, 3 * MIB, layout="channels_last"),
    ])


def seg_metrics_doc():
    case = "375x500 C=919 labels=2"
    return doc("seg_metrics", GPU, [
        {"case": case, "impl": "lusscore", "per_image_s": 0.0004, **timing(0.0004)},
        {"case": case, "impl": "reference", "per_image_s": 0.008, **timing(0.008),
         "note": "band maps only (per-label max-pool erosions on the GPU)"},
        {"case": case, "impl": "official (cv2, CPU)", "per_image_s": 0.030, **timing(0.030)},
        {"case": "matching C=50 N=752", "impl": "lusscore", "cooccurrence_s": 0.001,
         "munkres_s": 0.002, "median_s": 0.003},
    ], official_measured_cpu_s_per_image=0.030)


def label_doc():
    return doc("label", GPU, [{"case": "resnet50 resize 256 K=919 batch 64", "impl": "lusscore",
                               "images": 512, "seconds": 2.0, "images_per_s": 256.0}])


def pipeline_doc():
    fused = {"case": "pretrain_swav", "impl": "fused", "batch": 64, "step": timing(0.5),
             "images_per_s": 128.0, "first_loss": 8.1, "peak_bytes": 6 * 2**30,
             "peak_step_bytes": 5 * 2**30, "images_per_s_fused_over_reference": 1.6,
             "peak_bytes_fused_over_reference": 0.75, "peak_step_bytes_fused_over_reference": 0.7}
    reference = {"case": "pretrain_swav", "impl": "reference", "batch": 64, "step": timing(0.8),
                 "images_per_s": 80.0, "first_loss": 8.1, "peak_bytes": 8 * 2**30,
                 "peak_step_bytes": 7 * 2**30}
    return doc("pipeline", "NVIDIA H200", [fused, reference], config="synthetic_gpu", overrides=[],
               quick=False, warmup=5, repeat=20, amp="torch.bfloat16")


def pipeline_stages_doc():
    return doc("pipeline_stages", GPU, [
        {"case": "stage pretrain", "impl": "fused", "seconds": 100.0, "peak_bytes": 4 * 2**30,
         "images_per_s": 500.0, "seconds_fused_over_reference": 0.5},
        {"case": "stage pretrain", "impl": "reference", "seconds": 200.0, "peak_bytes": 6 * 2**30,
         "images_per_s": 250.0},
        {"case": "stage total", "impl": "fused", "seconds": 400.0, "process_wall_s": 410.0, "mIoU": 0.3},
        {"case": "stage total", "impl": "reference", "seconds": 600.0, "process_wall_s": 610.0,
         "mIoU": 0.3},
    ], config="synthetic_gpu", quick=False, work="runs", data="runs/data")


def synthetic_doc():  # bench_synthetic.py writes its own doc: no "results"
    return {"bench": "synthetic", "device": "cpu", "processor": "x86_64", "cpu_count": 2, "workers": 1,
            "config": {"classes": 6, "train_per_class": 80, "val_per_class": 12, "semi_per_class": 4,
                       "test_per_class": 20, "size": 96, "seed": 0},
            "images": 696, "seconds": 3.48, "images_per_s": 200.0, "render_only_images_per_s": 400.0}


ALL_DOCS = [attention_pool_doc, hp_loss_doc, kmeans_gpu_doc, kmeans_cpu_doc, overlap_gather_doc,
            seg_metrics_doc, label_doc, pipeline_doc, pipeline_stages_doc, synthetic_doc]


def table_of(text: str) -> list[dict]:
    """The markdown table's rows as dicts keyed by the header."""
    lines = [line for line in text.splitlines() if line.startswith("|")]

    def split(line):
        return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]

    header = split(lines[0])
    assert header == list(report.HEADER)
    assert set(lines[1].replace("|", "").split()) == {"---"}
    return [dict(zip(header, split(line))) for line in lines[2:]]


def find(rows, **cells):
    """The one row whose cells match (keys with spaces spelt with underscores)."""
    cells = {k.replace("_", " "): v for k, v in cells.items()}
    found = [r for r in rows if all(r[k] == v for k, v in cells.items())]
    assert len(found) == 1, (cells, found)
    return found[0]


def render(*docs) -> list[dict]:
    rows = [row for i, d in enumerate(docs) for row in report.doc_rows(d, f"doc {i}")]
    return table_of(report.markdown(rows))


def test_hp_loss_rows_time_memory_and_speedup_direction():
    rows = render(hp_loss_doc())
    small = "N=4096 d=512 d_f=384 rho=0.02"
    chunked = find(rows, workload=small, peer="reference (chunked, masks)")
    assert chunked["benchmark"] == "hp_loss" and chunked["device"] == CPU
    assert chunked["metric"] == "fwd+bwd"
    assert chunked["ours"] == "1.72 s" and chunked["peer's result"] == "16.3 s"
    assert chunked["speedup"] == f"{16.3 / 1.72:.3g}x" == "9.48x"  # the peer is slower: > 1
    assert chunked["peak memory (ours / peer)"] == "11 MiB / 821 MiB"
    all_pairs = find(rows, workload=small, peer="all-pairs (official HP's way)")
    assert all_pairs["speedup"] == f"{1.36 / 1.72:.3g}x" == "0.791x"  # the peer is faster: < 1
    assert all_pairs["peak memory (ours / peer)"] == "11 MiB / 531 MiB"
    assert all_pairs["bound (ours as a multiple)"] == ""
    oom = find(rows, workload="N=24576 d=512 d_f=384 rho=0.02")
    assert oom["ours"] == "36.9 s" and oom["peer's result"] == "error: killed (out of memory)"
    assert oom["speedup"] == "" and oom["peak memory (ours / peer)"] == "51 MiB / —"
    assert len(rows) == 3


def test_rates_invert_the_ratio_and_rows_without_peers_show_ours():
    rows = render(pipeline_doc(), label_doc(), synthetic_doc())
    step = find(rows, benchmark="pipeline")
    assert (step["ours"], step["peer"], step["peer's result"]) == ("128 images/s", "reference", "80 images/s")
    assert step["speedup"] == "1.6x"  # 128 / 80: ours faster, > 1
    assert step["peak memory (ours / peer)"] == "6.00 GiB / 8.00 GiB"
    label = find(rows, benchmark="label")
    assert (label["ours"], label["peer"], label["speedup"]) == ("256 images/s", "", "")
    assert label["workload"] == "resnet50 resize 256 K=919 batch 64"
    generate = find(rows, benchmark="synthetic", metric="generate (render + write)")
    assert generate["ours"] == "200 images/s" and generate["device"] == "cpu"
    assert generate["workload"] == "696 images of 96 px, 1 worker(s)"
    assert find(rows, benchmark="synthetic", metric="render only")["ours"] == "400 images/s"


def test_a_run_without_ours_shows_the_peer():
    rows = render(doc("pipeline", GPU, [pipeline_doc()["results"][1]]))  # --ops reference
    only = find(rows, benchmark="pipeline")
    assert (only["ours"], only["peer"], only["peer's result"]) == ("not run", "reference", "80 images/s")
    assert only["speedup"] == "" and only["peak memory (ours / peer)"] == "— / 8.00 GiB"


def test_pipeline_stages_time_and_rate():
    rows = render(pipeline_stages_doc())
    wall = find(rows, workload="stage pretrain", metric="wall time")
    assert (wall["ours"], wall["peer's result"], wall["speedup"]) == ("100 s", "200 s", "2x")
    assert wall["peak memory (ours / peer)"] == "4.00 GiB / 6.00 GiB"
    rate = find(rows, workload="stage pretrain", metric="training, end to end")
    assert (rate["ours"], rate["peer's result"], rate["speedup"]) == ("500 images/s", "250 images/s", "2x")
    total = find(rows, workload="stage total")  # no rate for the whole run
    assert (total["ours"], total["peer's result"], total["speedup"]) == ("400 s", "600 s", "1.5x")
    assert total["peak memory (ours / peer)"] == ""


def test_kmeans_bound_compile_error_and_cpu_cases():
    rows = render(kmeans_gpu_doc(), kmeans_cpu_doc())
    fp32 = "N=1183322 D=2048 K=919 float32"
    fused = find(rows, workload=fp32, metric="assign, fused path")
    assert fused["device"] == GPU and fused["peer"] == "torch matmul + argmax"
    assert (fused["ours"], fused["peer's result"], fused["speedup"]) == ("30 ms", "90 ms", "3x")
    assert fused["bound (ours as a multiple)"] == "GEMM alone 25 ms (ours 1.2x)"
    buffered = find(rows, workload=fp32, metric="assign, buffered path")
    assert buffered["bound (ours as a multiple)"] == "GEMM alone 25 ms (ours 1.44x)"
    assert buffered["speedup"] == "2.5x"
    compile_error = find(rows, workload=fp32, metric="Lloyd step", peer="torch.compile")
    assert compile_error["peer's result"] == "error: BackendCompilerFailed: x"
    assert compile_error["speedup"] == ""
    baseline = find(rows, workload=fp32, metric="Lloyd step", peer="torch baseline")
    assert baseline["speedup"] == "3x" and baseline["bound (ours as a multiple)"] == ""
    compiled = find(rows, workload="N=1183322 D=2048 K=919 bfloat16", peer="torch.compile")
    assert compiled["speedup"] == "2x"
    buffer = find(rows, workload="buffered assign N=58000000 D=128 K=919 bf16, score buffer 32 MB")
    assert (buffer["ours"], buffer["peer"]) == ("500 ms", "")
    assert find(rows, workload="upload N=58000000 D=128 fp32 (pinned)")["ours"] == "1.5 s"
    fit = find(rows, workload="fit N=58000000 D=128 K=919 float32")
    assert (fit["metric"], fit["ours"], fit["device"]) == ("fit, 20 iterations", "12.5 s", GPU)
    # The CPU case of a CUDA run ran on the CPU; without faiss its step has one peer.
    cpu_step = find(rows, workload="cpu N=20000 D=32 K=50 float32, 1 thread(s)", metric="Lloyd step")
    assert cpu_step["device"] == "cpu" and cpu_step["speedup"] == "2.5x"
    cpu_assign = find(rows, workload="cpu N=20000 D=32 K=50 float32, 1 thread(s)", metric="assign")
    assert (cpu_assign["ours"], cpu_assign["peer"]) == ("10 ms", "")
    faiss = find(rows, workload="cpu N=100000 D=128 K=919 float32, 2 thread(s)", metric="assign")
    assert (faiss["device"], faiss["peer"]) == (CPU, "faiss-cpu search")
    assert faiss["speedup"] == f"{0.3 / 0.2:.3g}x" == "1.5x"
    faiss_iter = find(rows, metric="Lloyd step", peer="faiss-cpu, 1 iteration")
    assert faiss_iter["speedup"] == "3x"
    assert find(rows, workload="fit N=100000 D=128 K=919 float32 cpu")["metric"] == "fit, 3 iterations"


def test_attention_pool_bound_on_fwd_bwd_only():
    rows = render(attention_pool_doc())
    compiled = find(rows, metric="fwd+bwd", peer="torch.compile")
    assert compiled["workload"] == "256x2048x7x7 bfloat16"
    assert (compiled["ours"], compiled["peer's result"], compiled["speedup"]) == ("200 µs", "400 µs", "2x")
    assert compiled["bound (ours as a multiple)"] == "HBM floor 100 µs (ours 2x)"
    assert compiled["peak memory (ours / peer)"] == "8 MiB / 64 MiB"
    eager = find(rows, metric="fwd+bwd", peer="eager")
    assert eager["speedup"] == "5x"
    mean = find(rows, metric="fwd with mean attention", peer="eager")
    assert (mean["ours"], mean["peer's result"], mean["speedup"]) == ("66.7 µs", "333 µs", "5x")
    assert mean["bound (ours as a multiple)"] == "" and mean["peak memory (ours / peer)"] == ""
    assert len(rows) == 4 * 2  # four timed modes, two peers


def test_overlap_gather_errors_and_layouts_and_seg_metrics_notes():
    rows = render(overlap_gather_doc(), seg_metrics_doc())
    contiguous = "(256,512,7,7)->7x7 bfloat16 contiguous"
    grid = find(rows, workload=contiguous, metric="fwd+bwd", peer="reference_grid_sample")
    assert (grid["ours"], grid["peer's result"], grid["speedup"]) == ("50 µs", "300 µs", "6x")
    assert grid["peak memory (ours / peer)"] == "3 MiB / 12 MiB"
    roi = find(rows, workload=contiguous, metric="fwd", peer="torchvision_roi_align")
    assert roi["peer's result"].startswith("error: RuntimeError: \"roi_align_forward_kernel\"")
    channels_last = find(rows, workload="(256,512,7,7)->7x7 bfloat16 channels_last", metric="fwd")
    assert (channels_last["ours"], channels_last["peer"]) == ("25 µs", "")
    reference = find(rows, workload="375x500 C=919 labels=2",
                     peer="reference (band maps only (per-label max-pool erosions on the GPU))")
    assert reference["speedup"] == "20x" and reference["device"] == GPU
    official = find(rows, peer="official (cv2, CPU)")
    assert (official["ours"], official["peer's result"], official["speedup"]) == ("400 µs", "30 ms", "75x")
    matching = find(rows, benchmark="seg_metrics", workload="matching C=50 N=752")
    assert matching["device"] == "cpu" and matching["ours"] == "3 ms"  # numpy, whatever the device


def test_every_bench_script_is_known_to_the_report():
    """A new bench script whose results the report cannot read fails here."""
    pattern = re.compile(r'write_results\([^,]+,\s*"(\w+)"|name = "(\w+)"|"bench": "(\w+)"')
    scripts = sorted(BENCH.glob("bench_*.py"))
    assert scripts
    for script in scripts:
        names = {n for match in pattern.findall(script.read_text()) for n in match if n}
        assert names, f"{script.name}: no bench name found"
        assert names <= set(report.BENCHES), (script.name, names)
    fixtures = {d()["bench"] for d in ALL_DOCS}
    assert fixtures == set(report.BENCHES)  # and each one is tested here


@pytest.mark.parametrize("bad, message", [
    ({"bench": "resize", "device": CPU, "results": []}, "unknown bench 'resize'"),
    ({"device": CPU, "results": []}, "not a bench result"),
    ({"bench": "hp_loss", "device": CPU}, "bench 'hp_loss': no list of result records"),
    (doc("hp_loss", CPU, []), "bench 'hp_loss': no list of result records"),
    (doc("hp_loss", CPU, [{"case": "N=1", "impl": "lusscore", "fwd_bwd_s": 1.0}]),
     "bench 'hp_loss': 'N=1' (lusscore): no measurement this report knows"),
    (doc("label", CPU, [{"impl": "lusscore", "images_per_s": 3.0}]),
     "bench 'label': a record of unknown shape"),
    (doc("hp_loss", CPU, [{"case": "N=1", "fwd+bwd": timing(1.0)}]), "a record without 'impl'"),
    (doc("kmeans", CPU, [{"case": "cpu N=1", "ours_assign_tiled_s": 1.0}]),
     "bench 'kmeans': 'cpu N=1': measurements this report does not know: ['ours_assign_tiled_s']"),
    (doc("kmeans", CPU, [{"case": "cpu N=1", "n": 1}]), "bench 'kmeans': 'cpu N=1': no measurement"),
    (doc("pipeline", GPU, [{"case": "x", "impl": "fused", "images_per_s": "fast"}]), "not a number"),
])
def test_unknown_or_malformed_input_is_a_clear_error(tmp_path, bad, message):
    path = tmp_path / "merged.json"
    path.write_text(json.dumps([label_doc(), bad]))
    with pytest.raises(report.ReportError) as err:
        report.collect_rows([path])
    assert str(err.value).startswith(f"{path}[1]: ")
    assert message in str(err.value)


def run_report(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "report.py"), *map(str, args)],
                          capture_output=True, text=True, check=False)


def test_cli_reads_merged_files_and_folders_and_writes_the_table(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    for make in ALL_DOCS:
        d = make()
        (parts / f"{d['bench']}_{d['device'][:3]}.json").write_text(json.dumps(d))
    merged = tmp_path / "bench_results.json"
    merged.write_text(json.dumps([hp_loss_doc(), label_doc()]))
    out = tmp_path / "tables" / "bench_table.md"
    done = run_report(merged, parts, "--out", out)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == done.stdout
    assert [p.name for p in out.parent.iterdir()] == ["bench_table.md"]  # no temporary file left
    rows = table_of(done.stdout)
    assert [r["benchmark"] for r in rows[:4]] == ["hp_loss"] * 3 + ["label"]  # the merged file first
    assert {r["benchmark"] for r in rows} == set(report.BENCHES)
    assert len(rows) == 4 + sum(len(report.doc_rows(make(), "x")) for make in ALL_DOCS)

    (parts / "broken.json").write_text(json.dumps({"bench": "resize", "results": []}))
    failed = run_report(parts, "--out", out)
    assert failed.returncode == 1 and failed.stdout == ""
    assert f"{parts / 'broken.json'}: unknown bench 'resize'" in failed.stderr
    assert out.read_text() == done.stdout  # the last good table stays
