"""The run-folder contract: every path from RunDir, one completeness check per kind of step,
and stage modules free of import loops."""
import ast
from pathlib import Path

import pytest
import torch

import lusscore
from lusscore.checkpoint import save_checkpoint
from lusscore.stages.layout import PROTOCOLS, TRAINING_STAGES, RunDir
from lusscore.utils import LusscoreError


def test_every_path_lies_in_the_run_folder(tmp_path):
    run = RunDir(tmp_path)
    paths = [run.config, run.timings, run.protocols_summary, run.report_dir, run.demo_picture,
             run.cluster_dir, run.centroids, run.assignments, run.cluster_summary, run.sweep,
             run.sweep_plot, run.attention_score, run.distance_bank]
    paths += [run.checkpoint(s) for s in TRAINING_STAGES] + [run.training_log(s) for s in TRAINING_STAGES]
    paths += [run.labels(s) for s in ("train", "validation")]
    for protocol in PROTOCOLS:
        paths += [run.predictions(protocol, "validation"), run.metrics(protocol, "validation"),
                  run.metrics(protocol, "test"), run.match(protocol), run.submission(protocol)]
    paths += [run.baselines("validation"), run.baselines("test")]
    assert len(set(paths)) == len(paths)  # no two artefacts share a path
    for p in paths:
        assert p.is_relative_to(tmp_path), p
    assert run.metrics("unsupervised") == tmp_path / "metrics.json"
    assert run.metrics("semi", "test") == tmp_path / "semi" / "test" / "metrics.json"
    assert run.baselines("test") == tmp_path / "test" / "baselines.json"
    assert run.checkpoint("attention") == tmp_path / "attention.pt"
    assert run.training_log("semi") == tmp_path / "semi.jsonl"


def test_layout_errors(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(LusscoreError, match="unknown protocol"):
        run.predictions("supervised", "validation")
    with pytest.raises(LusscoreError, match="scored on"):
        run.metrics("semi", "train")
    with pytest.raises(LusscoreError, match="unknown training stage"):
        run.checkpoint("label")


def test_completeness_checks(tmp_path):
    run = RunDir(tmp_path)
    assert not run.stage_done("pretrain") and not run.cluster_done() and not run.sweep_done()
    assert not run.scored("semi", "validation")
    save_checkpoint(run.checkpoint("pretrain"), {"epoch": 1, "done": False})
    assert not run.stage_done("pretrain")  # a partial checkpoint is resumed, not skipped
    save_checkpoint(run.checkpoint("pretrain"), {"epoch": 2, "done": True})
    assert run.stage_done("pretrain")
    for path in (run.cluster_summary, run.sweep, run.metrics("semi")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    assert run.cluster_done() and run.sweep_done() and run.scored("semi", "validation")
    assert not run.scored("semi", "test")
    assert torch.load(run.checkpoint("pretrain"), weights_only=False)["epoch"] == 2


def _imports(path: Path) -> set[str]:
    """Every lusscore module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lusscore"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import mod`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lusscore"))
    return found


def test_the_stages_have_no_import_loop():
    package = Path(lusscore.__file__).parent
    modules = {f"lusscore.stages.{p.stem}": p for p in (package / "stages").glob("*.py")}
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    assert "lusscore.stages.pretrain" in graph["lusscore.stages.run"]  # the graph sees `from pkg import mod`
    state = {}

    def visit(m, trail):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import loop: " + " -> ".join(trail + [m])
        state[m] = "open"
        for n in sorted(graph[m]):
            visit(n, trail + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])


def test_steps_their_keys_outputs_and_what_a_redo_removes(tmp_path):
    from lusscore.stages.common import redo_from
    from lusscore.stages.layout import STEPS, downstream, step_keys
    run = RunDir(tmp_path)
    assert downstream("pretrain") == list(STEPS)
    assert downstream("cluster") == ["cluster", "sweep_tau", "label", "finetune", "infer"]
    assert step_keys("finetune")[:2] == ("seed", "data.num_classes") and "cluster" in step_keys("finetune")
    assert "attention" not in step_keys("semi")
    for step in STEPS:
        assert all(p.is_relative_to(tmp_path) and p != tmp_path for p in run.outputs(step)), step
    for p in (run.centroids, run.checkpoint("attention"), run.labels("train") / "a" / "x.png"):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    assert redo_from(run, "cluster")[0] == "cluster"
    assert not run.cluster_dir.exists() and not run.labels("train").exists()
    assert run.checkpoint("attention").exists()  # upstream of the redone steps
    with pytest.raises(LusscoreError, match="unknown step"):
        redo_from(run, "everything")
