"""Every path of a run folder and every "is this step complete" check, in one place (no
torch: the report uses it too).

Validation (every choice is made there) sits in the protocol's folder, test (scored once,
never used for a choice) in its test/ sub-folder::

    <run>/config.yaml                 the resolved config (label.tau written by the sweep)
    <run>/<stage>.pt, .yaml, .jsonl   pretrain, attention, finetune, semi, hp, hp_linear:
                                      checkpoint, its config, the loss log
    <run>/cluster/                    centroids.npy, assignments.npy, summary.json
    <run>/labels/<split>/<wnid>/<name>.png (+ .npy mean attention for validation)
    <run>/sweep_tau.json, sweep_tau.png, attention_score.json
    <run>[/<protocol>]/predictions/<split>/<wnid>/<name>.png
    <run>[/<protocol>]/metrics.json, match.json (when matched on validation)
    <run>[/<protocol>]/test/metrics.json
                                      protocol: semi, distance_match, hp, hp_linear (none:
                                      the fully unsupervised one)
    <run>/hp/clusters.json            HP's cluster order (the border cluster first: 'other')
    <run>/distance_match/bank.pt      the train-semi region bank of distance matching
    <run>/baselines.json, <run>/test/baselines.json       the trivial floors of each split
    <run>/saliency/<split>/<wnid>/<name>.png, settings.json  label.prior rc: the shape prior
    <run>/saliency_score.json         that prior scored on validation (F-beta, MAE)
    <run>/protocols.json, timings.json, report/
"""
from __future__ import annotations

import os
from pathlib import Path

from lusscore.utils import LusscoreError

# The paper's ablations as config switches (`luss run --help`, `luss ablate --help`).
SWITCHES = """the paper's ablations as config switches (--set KEY=VALUE; defaults: PASS):
  pretrain.loss_weights={swav: 0.5, d2s: 0.5, p2p: 1.0}   a weight of 0 (or absent) drops a part (Tab 7a)
  pretrain.d2s.stages=[3]          [3, 2]: D2S32 (Tab 7a)
  pretrain.d2s.view=cross          same: same-view supervision (Tab 8d)
  pretrain.d2s.target=deep         same_stage: the stage's own codes supervise it (Tab 8c)
  pretrain.p2p.kind=noncontrastive contrastive | clustering (Tab 8a)
  pretrain.p2p.pixel_mlp=true      false: P2P without M_p (Tab 8b)
  model.zero_init_residual=false   true: residual branches start at zero (SwAV's torchvision)
  attention.optimizer=lars         sgd: plain SGD with momentum (LARS: the reference)
  attention.shared=false           true: one attention map for all channels (Tab 10c)
  cluster.pooling=attention        mean: image-level pooling
  label.method=attention           image | pixel_kmeans: image- or pixel-level labels (Tab 10a)
  infer.mode=argmax                cam: CAM inference, infer.cam_tau (Tab 10a "^tau", App. A)
  finetune.enabled=true            false: the pseudo labels are the predictions (Tab 10d)
  pretrain.method=swav             pixpro: PASS_p, PixPro as L_e + the clustering loss (Tab 5, 7a)
  label.prior=none                 rc | maps: a saliency shape prior (Tab 5 "+RC", "+Sal"), with
  label.prior_maps=null              maps: the folder of <split>/<wnid>/<name>.png maps
  label.prior_mask=true              false: the prior does not replace the attention mask
  attention.prior_weight=1.0         0: the prior does not supervise the attention"""

RUN_CONFIG = "config.yaml"
METRICS_FILE = "metrics.json"
MATCH_FILE = "match.json"
PROTOCOLS = ("unsupervised", "semi", "distance_match", "hp", "hp_linear")
EVAL_SPLITS = ("validation", "test")
TRAINING_STAGES = ("pretrain", "attention", "finetune", "semi", "hp", "hp_linear")

# What HP's training reads (hp.match only scores it).
HP_TRAINING_KEYS = ("backbone", "vit", "epochs", "batch_size", "crop", "scale", "dim", "dropout",
                    "lr", "weight_decay", "probe_lr", "grad_norm", "tau", "base_tau", "rho", "alpha",
                    "ema_momentum", "pool_size", "renew_interval", "lambda_warmup")

# The steps of a run whose outputs depend on the config, each after the step it starts from,
# with the config keys (sections or dotted keys) its outputs depend on beyond that step's.
# Keys that change no output are not listed: data.workers, ops, how the protocols are scored
# (distance_match.match, hp.match), and data.root (a dataset that moved keeps its run folder; a
# pretraining folder of its own, data.pretrain_root, is another dataset and is listed).
STEPS = {
    "pretrain": (None, ("seed", "data.num_classes", "data.pretrain_root", "model", "pretrain")),
    # The prior settings are the attention step's: they shape its loss and every label after it.
    "attention": ("pretrain", ("attention", "label.prior", "label.prior_maps", "label.prior_mask",
                               "saliency")),
    "cluster": ("attention", ("cluster", "label.method")),
    "sweep_tau": ("cluster", ("label.sweep", "label.resize")),
    "label": ("sweep_tau", ("label.tau",)),  # the swept tau, or the config's without a sweep
    "finetune": ("label", ("finetune",)),
    "infer": ("finetune", ("infer",)),
    "semi": ("pretrain", ("semi", "infer.resize")),
    "hp": ("pretrain", tuple(f"hp.{k}" for k in HP_TRAINING_KEYS) + ("infer.resize",)),
    "hp_linear": ("hp", ("hp_linear",)),
    "distance_match": ("pretrain", ("distance_match.k", "distance_match.temperature",
                                    "distance_match.stride", "distance_match.resize")),
}


def step_keys(step: str) -> tuple[str, ...]:
    """Every config key a step's outputs depend on, its upstream steps' included."""
    keys = []
    while step is not None:
        upstream, own = STEPS[step]
        keys = list(own) + keys
        step = upstream
    return tuple(keys)


def downstream(step: str) -> list[str]:
    """The step and every step that starts from it, in run order."""
    out = [step]
    for s, (upstream, _) in STEPS.items():
        if upstream in out and s not in out:
            out.append(s)
    return out


class RunDir:
    """A run folder: the path of each artefact and whether each step is complete."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)

    # the run
    @property
    def config(self) -> Path:
        return self.root / RUN_CONFIG

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    @property
    def protocols_summary(self) -> Path:
        return self.root / "protocols.json"

    @property
    def demo_picture(self) -> Path:
        return self.root / "demo.png"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    # the training stages
    def checkpoint(self, stage: str) -> Path:
        if stage not in TRAINING_STAGES:
            raise LusscoreError(f"unknown training stage {stage!r}; one of {list(TRAINING_STAGES)}")
        return self.root / f"{stage}.pt"

    def training_log(self, stage: str) -> Path:
        return self.checkpoint(stage).with_suffix(".jsonl")

    # clustering and pseudo labels
    @property
    def cluster_dir(self) -> Path:
        return self.root / "cluster"

    @property
    def centroids(self) -> Path:
        return self.cluster_dir / "centroids.npy"

    @property
    def assignments(self) -> Path:
        return self.cluster_dir / "assignments.npy"

    @property
    def cluster_summary(self) -> Path:
        return self.cluster_dir / "summary.json"

    def labels(self, split: str) -> Path:
        return self.root / "labels" / split

    @property
    def sweep(self) -> Path:
        return self.root / "sweep_tau.json"

    @property
    def sweep_plot(self) -> Path:
        return self.root / "sweep_tau.png"

    @property
    def attention_score(self) -> Path:
        return self.root / "attention_score.json"

    # the protocols
    def protocol_dir(self, protocol: str) -> Path:
        if protocol not in PROTOCOLS:
            raise LusscoreError(f"unknown protocol {protocol!r}; one of {list(PROTOCOLS)}")
        return self.root if protocol == "unsupervised" else self.root / protocol

    def predictions(self, protocol: str, split: str) -> Path:
        return self.protocol_dir(protocol) / "predictions" / split

    def metrics(self, protocol: str, split: str = "validation") -> Path:
        if split not in EVAL_SPLITS:
            raise LusscoreError(f"protocols are scored on {list(EVAL_SPLITS)}, not {split!r}")
        folder = self.protocol_dir(protocol)
        return (folder if split == "validation" else folder / split) / METRICS_FILE

    def match(self, protocol: str) -> Path:
        """The match found on validation; test reuses it (re-matching on test would be a
        choice made on test)."""
        return self.protocol_dir(protocol) / MATCH_FILE

    def submission(self, protocol: str) -> Path:
        """The test-server archive of a protocol's test predictions (`luss submit`)."""
        return self.protocol_dir(protocol) / "submission.zip"

    @property
    def distance_bank(self) -> Path:
        """The distance-matching protocol's train-semi region bank."""
        return self.protocol_dir("distance_match") / "bank.pt"

    def baselines(self, split: str = "validation") -> Path:
        """The trivial floors of a split, beside the unsupervised protocol's metrics.json."""
        return self.metrics("unsupervised", split).with_name("baselines.json")

    @property
    def saliency_dir(self) -> Path:
        """label.prior rc: the region-contrast maps, <split>/<wnid>/<name>.png."""
        return self.root / "saliency"

    @property
    def saliency_settings(self) -> Path:
        return self.saliency_dir / "settings.json"

    @property
    def saliency_score(self) -> Path:
        return self.root / "saliency_score.json"

    @property
    def fingerprints(self) -> Path:
        """{step: {config key: value}} of every step completed in this folder."""
        return self.root / "fingerprints.json"

    def outputs(self, step: str) -> list[Path]:
        """What a step writes (its checkpoint, log, folders and files): what --redo-from
        removes."""
        if step in TRAINING_STAGES:
            ck = self.checkpoint(step)
            paths = [ck, ck.with_suffix(".yaml"), self.training_log(step)]
            return paths + ([self.protocol_dir(step)] if step in ("semi", "hp", "hp_linear") else [])
        return {
            "cluster": [self.cluster_dir],
            "sweep_tau": [self.labels("validation"), self.sweep, self.sweep_plot, self.attention_score],
            "label": [self.labels("train")],
            "infer": [self.predictions("unsupervised", s) for s in EVAL_SPLITS]
                     + [self.metrics("unsupervised", s) for s in EVAL_SPLITS]
                     + [self.match("unsupervised"), self.submission("unsupervised")],
            "distance_match": [self.protocol_dir("distance_match")],
        }[step]

    # completeness: one definition per kind of step
    def stage_done(self, stage: str) -> bool:
        """A training stage is complete when its checkpoint says so (saved after its last
        epoch); a partial checkpoint is resumed."""
        from lusscore.checkpoint import checkpoint_done  # torch, only when asked
        return checkpoint_done(self.checkpoint(stage))

    def cluster_done(self) -> bool:
        return self.cluster_summary.is_file()

    def sweep_done(self) -> bool:
        return self.sweep.is_file()

    def scored(self, protocol: str, split: str) -> bool:
        return self.metrics(protocol, split).is_file()
