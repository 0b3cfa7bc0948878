"""The packaged synthetic_gpu config (the S50 recipe at GPU scale) and its `luss synth` recipe.

The tiny CPU run of this config (every key reaching the stages) is in test_ops_switch.py.
"""
import shlex

from PIL import Image

from lusscore import cli
from lusscore.config import load_config
from lusscore.data import ImageNetS
from lusscore.stages import synth

# The keys synthetic_gpu scales down from imagenet_s50 (everything else is the S50 recipe).
SCALED = {"name", "data.root", "data.workers", "model.width", "model.output_stride", "pretrain.epochs",
          "pretrain.epoch_queue_starts", "pretrain.freeze_prototypes_iters", "attention.epochs",
          "finetune.epochs", "label.sweep"}


def flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and k not in ("loss_weights", "crops"):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def synth_recipe_args(out):
    """The `luss synth` command written in the config's header, parsed by the synth command."""
    text = resources_text("synthetic_gpu")
    lines = [line.lstrip("# ").rstrip() for line in text.splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith("luss synth "))
    command = lines[start]
    while command.endswith("\\"):
        start += 1
        command = command[:-1] + " " + lines[start]
    argv = shlex.split(command)[2:]
    argv[argv.index("DATA")] = str(out)
    import argparse
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    return argv, parser.parse_args(argv)


def resources_text(name):
    from importlib import resources
    return resources.files("lusscore.configs").joinpath(f"{name}.yaml").read_text()


def test_config_is_the_s50_recipe_at_gpu_scale():
    gpu, s50 = flat(load_config("synthetic_gpu")), flat(load_config("imagenet_s50"))
    assert set(gpu) - set(s50) <= {"model.width", "model.output_stride"}
    assert set(s50) <= set(gpu)
    for key in set(s50) - SCALED:
        assert gpu[key] == s50[key], key
    assert gpu["data.num_classes"] == gpu["cluster.k"] == 50
    assert gpu["model.arch"] == "resnet18" and gpu["model.width"] == 64
    assert gpu["pretrain.batch_size"] == gpu["attention.batch_size"] == gpu["finetune.batch_size"] == 256
    assert gpu["pretrain.crops"]["sizes"] == [224, 96] and gpu["data.workers"] > 0
    assert gpu["ops"] == "fused"
    assert 0 < gpu["pretrain.epochs"] < s50["pretrain.epochs"]
    assert gpu["label.sweep"][:2] == s50["label.sweep"][:2]  # the same tau range, a coarser step


def test_recipe_command_matches_the_config(tmp_path):
    cfg = load_config("synthetic_gpu")
    _, args = synth_recipe_args(tmp_path / "data")
    recipe = synth.config_from_args(args)
    assert recipe.classes == cfg["data"]["num_classes"]
    assert recipe.size == cfg["pretrain"]["crops"]["sizes"][0] == cfg["attention"]["crop"]
    # A full batch of 256 per iteration, several per epoch (drop_last would drop a smaller set).
    assert recipe.classes * recipe.train_per_class >= 10 * cfg["pretrain"]["batch_size"]
    assert recipe.val_per_class > 0


def test_luss_synth_writes_the_recipe_at_small_counts(tmp_path):
    """The recipe's options on the real command, with one train image per class."""
    out = tmp_path / "data"
    argv, _ = synth_recipe_args(out)
    for opt, value in (("--train-per-class", "1"), ("--val-per-class", "1"), ("--semi-per-class", "0"),
                       ("--workers", "1")):
        argv[argv.index(opt) + 1] = value
    assert cli.main(["synth"] + argv) == 0
    ds = ImageNetS(out, num_classes=load_config("synthetic_gpu")["data"]["num_classes"])
    assert len(ds.wnids) == 50
    train = ds.image_samples("train")
    assert len(train) == 50 and len({c for _, c in train}) == 50
    for path, _ in train[:5]:
        with Image.open(path) as im:  # sides vary around --size (+-25%), as ImageNet's do
            assert all(0.75 * 224 - 1 <= side <= 1.25 * 224 + 1 for side in im.size)
    assert len(ds.segmentation_samples("validation")) == 50
