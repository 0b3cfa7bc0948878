"""The `luss` command line: synth, demo and error reporting."""
import json

from lusscore.cli import main
from lusscore.data import ImageNetS


def test_synth_command_writes_dataset(tmp_path, capsys):
    out = tmp_path / "ds"
    rc = main(["synth", str(out), "--classes", "3", "--train-per-class", "4", "--val-per-class", "2",
               "--semi-per-class", "1", "--size", "48", "--seed", "3"])
    assert rc == 0
    ds = ImageNetS(out)
    assert ds.num_classes == 3
    assert len(ds.image_samples("train")) == 12
    assert len(ds.segmentation_samples("validation")) == 6
    assert "train 12" in capsys.readouterr().out
    assert json.loads((out / "synth.json").read_text())["config"]["seed"] == 3


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "x"), "--classes", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("luss synth: error:") and "classes" in err
    assert main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err
