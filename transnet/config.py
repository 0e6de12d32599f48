"""What a Trans-Net command is asked to do, without importing torch or h5py: the configs of a fit
(:class:`FitConfig`), of an import of the original code's checkpoint (:class:`ImportConfig`) and of a
refinement (:class:`RefineConfig`), and the names their options choose from. Parsers build their
options from here; the fitting code imports torch when it runs."""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import UserError

INPUT_NORMS = ("instance", "global", "none")     # input normalisation of a Trans-Net (transnet/model.py)
STD_CORRECTIONS = (0, 1)                         # spatial std: 0 population, 1 unbiased (docs/internals.md)
FIT_SCHEDULES = ("geometric", "cosine", "constant")
LOSS_SCALES = ("none", "target_var")
DATA_ON = ("auto", "device", "ram", "disk")      # where the features live while fitting (transnet/data.py)
SPATIAL = ("pool", "interpolate")                # cross-layer maps of other sizes: how the source is resized
                                                 # (transnet/spatial.py); "" refuses them
GROUPED = ("auto", "on", "off")                  # consistency: fit the pairs of one build together (group_fit.py)
AUTO = "auto"                                    # --epochs auto: stop on a plateau of the validation loss
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "cudagraphs")   # torch.compile of the training step

# The paper's refinement preset (transClassifier.py / its README); weight decay is ours.
REFINE_PRESET = {"epochs": 100, "batch_size": 64, "optimizer": "adam", "lr": 1e-5, "final_lr": 1e-7,
                 "schedule": "geometric", "weight_decay": 1e-4, "eval_every": 10}


@dataclass(frozen=True)
class FitConfig:
    """Options of one Trans-Net fit (defaults: the paper's preset)."""

    features: str = ""                  # kc-features file with the source (and target) features
    source: str = ""                    # net A (input)
    target: str = ""                    # net B (reconstructed)
    layer: str = ""                     # module path, e.g. features.30 (the source's; the target's too by default)
    target_layer: str = ""              # the target's layer when it is another (a cross-layer fit); "" = layer
    spatial: str = ""                   # pool | interpolate: resize the source to the target's H x W; "": refuse
                                        # maps of different sizes (transnet/spatial.py)
    target_features: str | None = None  # a second file for the target (must hold the same rows)
    train_split: str = "train"
    train_rows: int = 0                 # fit on the first N rows of the training split (0: all of them)
    eval_split: str = "test"            # held-out metrics (a split other than train_split; "none" or
                                        # train_split itself: an in-sample report, labelled so)
    orders: int = 2                     # K gates and K+1 convs; 0 = the linear Trans-Net (one conv)
    kernel: int = 3
    alpha: str = "0.1"                  # α per order, order 1 first; one value = every order
    input_norm: str = "instance"        # instance (paper) | global | none
    std_correction: int = 0             # spatial std: 0 population (divide by HW), 1 unbiased (the original code)
    std_floor: float = 0.0              # s = max(std, F * rms) + eps per slice; 0 = off (paper)
    freeze_gates: bool = False
    gate_init: float = 0.5              # initial p of every gate (0.5 = logit 0, the paper)
    loss_scale: str = "none"            # none (paper) | target_var (MSE / Var(x_B): a deviation)
    epochs: int | str = 1000            # a number (the paper's fixed schedule), or "auto": stop on a plateau
    max_epochs: int = 1000              # --epochs auto: the most epochs (the lr schedule spans them)
    patience: int = 20                  # --epochs auto: epochs without a validation-loss improvement
    val_fraction: float = 0.1           # validation rows held out of the training split (0: none)
    batch_size: int = 64                # global batch (split over DDP ranks)
    lr: float = 1e-4
    final_lr: float = 1e-6              # lr at the last epoch (geometric) / floor (cosine)
    schedule: str = "geometric"         # geometric (paper, per epoch) | cosine | constant
    weight_decay: float = 1e-4          # Adam L2, gate logits included (paper)
    eval_every: int = 50                # held-out evaluation every N epochs (and at the end)
    save_every: int = 10                # write last.pt every N epochs (and at the end)
    data_on: str = "auto"               # auto | device | ram | disk (contiguous HDF5 blocks)
    block_rows: int = 256               # rows per contiguous HDF5 read
    device: str = "auto"
    precision: str = "fp32"             # CUDA arithmetic: fp32 (paper, TF32 off) | tf32 | bf16; CPU: always fp32
    channels_last: bool = True          # CUDA only
    compile: str = "off"                # torch.compile mode of the training forward (off: eager)
    seed: int = 0
    allow_changed_checkpoints: bool = False   # use features whose checkpoint changed since extraction

    def __post_init__(self) -> None:
        """``epochs`` from the command line or a study file ("25", 25 or "auto") as an int or "auto";
        ``target_layer`` equal to ``layer`` as "" (one spelling of a same-layer fit)."""
        if self.target_layer == self.layer:          # the same layer: a same-layer fit, recorded as one
            object.__setattr__(self, "target_layer", "")
        e = self.epochs
        if isinstance(e, str) and e != AUTO:
            try:
                object.__setattr__(self, "epochs", int(e))
            except ValueError:
                raise UserError(f"--epochs must be a whole number or {AUTO!r}, got {e!r}") from None

    @property
    def auto(self) -> bool:
        return self.epochs == AUTO

    @property
    def epoch_cap(self) -> int:
        """The epochs of the schedule: ``epochs``, or ``max_epochs`` for ``--epochs auto``."""
        return self.max_epochs if self.auto else int(self.epochs)


@dataclass(frozen=True)
class ImportConfig:
    """Options of ``import-transnet``."""

    checkpoint: str = ""                # the original code's Trans-Net checkpoint (.pth.tar)
    features: str = ""                  # kc-features file with the pair's features (what the Trans-Net maps)
    source: str = ""                    # net A (the Trans-Net's input)
    target: str = ""                    # net B (reconstructed)
    layer: str = ""                     # module path, e.g. features.30
    target_features: str | None = None  # a second file for the target
    train_split: str = "train"          # the split the original was fitted on (decides what is held-out)
    eval_split: str = "test"            # split of the variance report in metrics.json ("none": no report)
    std_correction: int = 1             # the original's unbiased std; 0 evaluates in the population convention
    batch_size: int = 256
    data_on: str = "auto"               # auto | device | ram | disk
    device: str = "auto"
    allow_changed_checkpoints: bool = False


@dataclass(frozen=True)
class RefineConfig:
    net_a: str = ""                        # checkpoint of net A (input side, frozen up to the layer)
    net_b: str = ""                        # checkpoint of net B (its upper part is fine-tuned)
    transnet: str = ""                     # fit-transnet run directory or its transnet.pt
    orders: str = "all"                    # orders fed to B's upper part, e.g. 0,1,2 or 0; all = every order
    layer: str = ""                        # default: the Trans-Net's layer
    baseline: bool = True                  # also fine-tune B on its own features (the fair baseline)
    data_root: str | None = None           # override the data root stored in net B's checkpoint
    allow_other_checkpoints: bool = False  # accept nets other than those the Trans-Net's features came from
    allow_unfinished: bool = False         # use a Trans-Net whose fit did not finish (its last.pt)
