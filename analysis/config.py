"""What an analysis command is asked to do, without importing torch, h5py, scipy or matplotlib: the
configs of ``similarity`` (:class:`SimilarityConfig`), ``consistency`` (:class:`ConsistencyConfig`) and
``diagnose`` (:class:`DiagnoseConfig`) and the names their options choose from. Parsers build their
options from here; the computations import their libraries when they run. ``METRICS`` lists the names
of the metric registry of analysis/similarity.py (tests/analysis/test_similarity_metrics.py checks that
they agree)."""
from __future__ import annotations

from dataclasses import dataclass

METRICS = ("cka", "cka_minibatch", "cka_rbf", "cka_rbf_unbiased", "cka_unbiased", "procrustes", "pwcca", "r2cca",
           "shape", "svcca")
FORMS = ("auto", "features", "gram")                  # linear CKA: features, Gram matrices, or whichever fits
CCA_FEATURES = ("pooled", "flat", "positions")        # what SVCCA / PWCCA see of a (C, H, W) map
SVCCA_RULES = ("variance", "singular")
PWCCA_VARIANTS = ("paper", "svcca-code")
VISUALS = ("auto", "study", "consistency", "similarity", "family", "panel")   # what `visualize` draws


@dataclass(frozen=True)
class SimilarityConfig:
    """Options of one ``similarity`` run."""

    layer: str = ""                  # module path of the layer, as in the feature file
    layers: str = ""                 # comma list: layer x layer matrices of one or two --nets instead of --layer
    split: str = "test"
    nets: str = ""                   # comma list; empty: every net of the split
    metric: str = "cka"              # comma list of metric names
    permutations: int = 100          # shuffles of the sample pairing for the null (0: no null)
    seed: int = 0                    # seed of the permutations and of the minibatches
    cka_form: str = "auto"           # auto | features (memory independent of N) | gram (independent of C*H*W)
    cca_features: str = "pooled"     # pooled | flat | positions: samples x dims given to SVCCA/PWCCA
    svcca_keep: float = 0.99         # SVCCA: fraction 0 < f <= 1 (see svcca_rule) or an integer count of directions
    svcca_rule: str = "variance"     # SVCCA's fraction of: variance (sum s^2) | singular (sum s, google's tutorial)
    pwcca_variant: str = "paper"     # paper (Morcos et al. 2018) | svcca-code (google/svcca compute_pwcca's numbers)
    rank_tol: float = 0.0            # CCA rank: 0 = from the storage dtype's rounding; else relative to s_max
    rbf_sigma: float = 0.8           # RBF CKA bandwidth as a fraction of the median distance (Kornblith et al.)
    shape_alpha: float = 1.0         # shape metric's partial whitening: 1 none (angular Procrustes), 0 full
    fit_split: str = ""              # alignment metrics: fit on this split's rows ("": in-sample on --split)
    score_split: str = ""            # ... and score on this split's rows ("": --split)
    spatial: str = ""                # positions mode, nets of different H x W: pool | interpolate to the smallest
    batch_size: int = 256            # cka_minibatch: samples per minibatch
    memory_gb: float = 4.0           # what the computation may hold in memory at once
    allow_changed_checkpoints: bool = False   # use features whose checkpoint changed since extraction


@dataclass(frozen=True)
class DiagnoseConfig:
    features: str = ""              # kc-features file
    layer: str = ""                 # module path (default with --consistency: the folder's layer)
    a: str = ""                     # the net diagnosed
    b: str = ""                     # the net it is compared with
    consistency: str = ""           # consistency folder with pairs/A__B and pairs/B__A (or give both below)
    transnet_ab: str = ""           # Trans-Net run A -> B (overrides --consistency)
    transnet_ba: str = ""           # Trans-Net run B -> A (overrides --consistency)
    split: str = "test"             # held-out split to diagnose
    top: int = 10                   # ranked images / channels / (image, channel) pairs to list
    panels: int = 2                 # Fig. 1 panels per direction (top images, their top channels)
    panel_channels: int = 3         # channels per panel image
    block_rows: int = 256           # rows per contiguous HDF5 read
    device: str = "cpu"
    allow_other_checkpoints: bool = False   # apply the Trans-Nets to features of other checkpoints
    allow_unfinished: bool = False          # read Trans-Nets whose fit did not finish


PAIR_PLANS = ("all", "chain", "star:NAME", "A>B,C>D")
# Fit options the consistency folder owns per pair (the rest come from the user's fit options).
PER_PAIR = ("features", "source", "target", "layer", "target_layer", "spatial", "eval_split")


@dataclass(frozen=True)
class ConsistencyConfig:
    """What to compare: the feature file, one layer, the nets and the pair plan."""

    features: str = ""          # kc-features file
    layer: str = ""             # module path, e.g. features.30
    pairs: str = "all"          # all | chain | star:NAME | A>B,C>D (explicit ordered pairs)
    nets: str = ""              # comma list in family order (chain order); empty: every net of the file
    family: str = ""            # a family.json (or its folder): its members are the nets, in generation order
    split: str = "test"         # held-out split of the variance report (fits use --train_split)
    allow_other_checkpoints: bool = False   # --family: accept feature-file nets whose checkpoint is not the member's
    grouped: str = "auto"       # auto | on | off: fit pairs of one build together (transnet/group_fit.py)
    target_layer: str = ""      # the targets' layer when it is another (cross-layer pairs); "" = layer
    spatial: str = ""           # pool | interpolate: resize sources of another H x W; "": refuse them

    @property
    def cross(self) -> bool:
        """Source and target at different layers."""
        return bool(self.target_layer) and self.target_layer != self.layer

    @property
    def layer_b(self) -> str:
        return self.target_layer if self.cross else self.layer

    @property
    def label(self) -> str:
        """The layer, or ``L -> L2`` of a cross-layer study (titles, log lines)."""
        return f"{self.layer} -> {self.layer_b}" if self.cross else self.layer
