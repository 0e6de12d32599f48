"""Command-line pieces of the Trans-Net fit shared by ``fit-transnet`` and ``consistency``: the help
text and the choices of the :class:`~transnet.config.FitConfig` options (torch-free, like the config)."""
from __future__ import annotations

from common.precision import PRECISIONS
from common.ranges import positive_int_or
from transnet.config import COMPILE_MODES, DATA_ON, FIT_SCHEDULES, INPUT_NORMS, LOSS_SCALES, SPATIAL, STD_CORRECTIONS

FIT_HELP = {
    "features": "kc-features file with the source (and target) features",
    "source": "net A: the input of the Trans-Net (a net name in the file)",
    "target": "net B: the features to reconstruct",
    "layer": "layer (module path) in the file, e.g. features.30: the source's, and the target's unless "
             "--target_layer",
    "target_layer": "the target's layer when it is another than --layer (a cross-layer Trans-Net, e.g. "
                    "features.20 -> features.30; source and target may be one net); empty: --layer",
    "spatial": "source and target maps of different H x W (cross-layer pairs): pool = adaptive average pooling "
               "of the source down to the target's size (needs a source at least as large), interpolate = "
               "bilinear resampling (align_corners=False) of the source to the target's size; the target is "
               "never resized. Empty (default): such pairs are refused. Unused when the sizes agree",
    "target_features": "a second kc-features file for the target (same rows required)",
    "allow_changed_checkpoints": "use stored features even when their checkpoint file changed since extraction "
                                 "(refused by default: the sha256 recorded in the feature file must match)",
    "train_split": "split to fit on",
    "train_rows": "fit on the first N rows of --train_split only (0: every row); held-out metrics still use "
                  "the whole --eval_split",
    "eval_split": "held-out split for the metrics: a split other than --train_split ('none', or --train_split "
                  "itself, gives an in-sample report, labelled held_out: false with a warning)",
    "orders": "K: number of gates / nonlinear orders (0 = linear Trans-Net, one conv)",
    "kernel": "conv kernel size (odd)",
    "alpha": "α per order, order 1 first (comma list; one value = every order; each finite, >= 0): "
             "loss + Σ α_k p_k²",
    "input_norm": "input normalisation: instance (paper: per-sample spatial std), global (per-channel std of "
                  "the training features), none",
    "std_correction": "spatial std convention of every instance std: 0 = population std (divide by H*W; default), "
                      "1 = unbiased std (divide by H*W-1; the original code). Fits agree under either up to the "
                      "optimiser's path (the factor is absorbed by the last conv); weights moved between conventions "
                      "do not (components off by sqrt(HW/(HW-1))). 1x1 maps always "
                      "use s = 1",
    "std_floor": "floor F for every instance std, a fraction of the slice's rms: s = max(std, F*rms) + eps, so "
                 "spatially constant slices give |x̂| <= 1/F instead of x/eps; 0 = off (the paper's preset)",
    "freeze_gates": "keep the gates at --gate_init",
    "gate_init": "initial gate value p (0.5 = the paper)",
    "loss_scale": "none (paper) or target_var (MSE / Var(x_B): scale-free, a deviation from the paper)",
    "epochs": "epochs (paper: 800-1000; a fixed schedule, labelled paper-fixed), or 'auto': stop once the "
              "validation loss has not improved for --patience epochs (labelled auto-plateau)",
    "max_epochs": "--epochs auto: the most epochs; the lr schedule (--schedule, --final_lr) spans them",
    "patience": "--epochs auto: epochs without a validation-loss improvement (> 0.1%% relative) before stopping",
    "val_fraction": "fraction of the --train_split rows held out as validation rows (seeded by --seed; val_loss "
                    "per epoch, the convergence verdict and --epochs auto use them; 0: none)",
    "batch_size": "global batch size",
    "lr": "initial learning rate (Adam)", "final_lr": "learning rate at the last epoch (geometric) / cosine floor",
    "schedule": "learning-rate schedule (geometric per epoch = the paper)",
    "weight_decay": "Adam L2 weight decay (gate logits included, as the paper)",
    "eval_every": "held-out evaluation every N epochs", "save_every": "write the resumable last.pt every N epochs",
    "data_on": "where the features live while fitting: auto, device (GPU memory), ram (pinned), disk "
               "(contiguous HDF5 blocks)",
    "block_rows": "rows per contiguous HDF5 read", "device": "auto, cpu, cuda or cuda:N",
    "precision": "arithmetic on CUDA: fp32 (IEEE float32, TF32 off: the paper-faithful choice), tf32 (TF32 tensor "
                 "cores for convs and matmuls) or bf16 (bf16 autocast); on the CPU every choice computes in fp32 "
                 "(metrics.json records precision and precision_effective)",
    "channels_last": "channels_last memory format on CUDA", "seed": "random seed",
    "compile": "torch.compile the training forward: off (eager), default (inductor: the instance std, gates and "
               "ReLUs fused around the convolutions), reduce-overhead (also CUDA graphs: for small, launch-bound "
               "fits), max-autotune, or cudagraphs (CUDA only: the eager kernels captured as CUDA graphs, no "
               "inductor compile time); the first epoch pays the compilation; results equal eager to float "
               "tolerance",
}


# Choices of the fit options (fit-transnet and consistency).
FIT_CHOICES = {"input_norm": list(INPUT_NORMS), "schedule": list(FIT_SCHEDULES), "loss_scale": list(LOSS_SCALES),
               "data_on": list(DATA_ON), "precision": list(PRECISIONS), "std_correction": list(STD_CORRECTIONS),
               "spatial": list(SPATIAL), "compile": list(COMPILE_MODES)}

# Types of the fit options whose range is not the one their name has in common.ranges.OPTION_TYPES.
FIT_TYPES = {"epochs": positive_int_or("auto")}
