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


def test_bad_settings_devices_and_outputs_are_clear_errors(tmp_path, capsys):
    import os
    run = tmp_path / "run"
    for override, said in (("pretrain.epochs=abc", "expected an integer (the config has 12), got 'abc'"),
                           ("pretrain.epochs=2.5", "expected an integer"),
                           ("pretrain.base_lr=abc", "expected a number")):
        assert main(["pretrain", "--run-dir", str(run), "--config", "demo", "--set", override]) == 2
        assert f"--set {override.split('=')[0]}: {said}" in capsys.readouterr().err
    import torch
    for device, said in (("tpu", "is not a device"), ("cuda:7", "no usable GPU")):
        if device.startswith("cuda") and torch.cuda.is_available():
            continue
        assert main(["pretrain", "--run-dir", str(run), "--config", "demo", "--device", device]) == 2
        assert said in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a parent that is a file
    assert main(["synth", str(blocker / "data"), "--classes", "1", "--train-per-class", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("luss synth: error:") and "Traceback" not in err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(["synth", str(locked / "data"), "--classes", "1", "--train-per-class", "1"]) == 2


def test_every_command_takes_quiet(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "d"), "--classes", "1", "--train-per-class", "2",
                 "--quiet"]) == 0
    assert "synth:" not in capsys.readouterr().err  # no progress bar
    assert main(["synth", str(tmp_path / "e"), "--classes", "1", "--train-per-class", "2"]) == 0
    assert "synth:" in capsys.readouterr().err
