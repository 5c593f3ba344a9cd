"""Typed configuration: the schema of ``configs/``, validated once before any work.

Entry points hand the composed Hydra/OmegaConf object to :func:`load_config`, which merges
it into the dataclasses below (unknown keys and wrong types are rejected) and checks the
values; code below the entry points only sees these dataclasses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from msn.architectures import ARCHITECTURES, MODELS, POS_EMBEDS
from msn.config_values import literal, plain_dict  # noqa: F401 (re-exported: the config API)
from msn.dataset_roots import FASHION_MNIST_ROOT


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


@dataclass
class ModelConfig:
    """Encoder architecture (``configs/model``; docs/method.md Sec. 3)."""

    name: str = "vit_small_16"  #: the preset (a key of ``msn.architectures.MODELS``), giving arch and patch_size
    arch: Optional[str] = None  #: architecture override, a key of ``msn.architectures.ARCHITECTURES`` (null: the preset's)
    patch_size: Optional[int] = None  #: patch side in pixels (null: the preset's)
    embed_dim: Optional[int] = None  #: width override (null: the architecture's)
    depth: Optional[int] = None  #: block-count override (null: the architecture's)
    num_heads: Optional[int] = None  #: attention-head override (null: the architecture's)
    mlp_ratio: float = 4.0  #: MLP hidden width over the embedding width
    attention: str = "sdpa"  #: sdpa (fused) | eager
    grad_checkpointing: bool = False  #: activation checkpointing of the blocks (ViT-L/7-sized runs)
    drop_path_rate: float = 0.0  #: stochastic depth of the last block, online encoder only (0 in the released configs)
    pos_embed: str = "learned"  #: learned (the reference: a trained table) | sincos (a fixed 2-D sine-cosine table, not trained; msn.models.vit.sincos_pos_embed)
    sync_bn: bool = True  #: synchronised batch norms in the heads (online and target) with several processes

    def apply_preset(self) -> "ModelConfig":
        """Fill ``arch`` and ``patch_size`` left null from the preset ``name`` (:data:`MODELS`)."""
        preset = MODELS.get(self.name)
        if preset is not None:
            self.arch = preset.arch if self.arch is None else self.arch
            self.patch_size = preset.patch_size if self.patch_size is None else self.patch_size
        return self


@dataclass
class HeadConfig:
    """Projection head (docs/method.md Sec. 3)."""

    hidden_dim: int = 2048  #: width of the two hidden layers
    output_dim: int = 256  #: projection (and prototype) width
    use_bn: bool = True  #: batch norm after each hidden linear layer


@dataclass
class ViewsConfig:
    """Multi-view augmentation (docs/method.md Sec. 1)."""

    rand_size: int = 224  #: target and anchor view side
    focal_size: int = 96  #: focal view side
    num_focal: int = 10  #: focal views per image
    rand_scale: tuple[float, float] = (0.3, 1.0)  #: RandomResizedCrop area range of target/anchor
    focal_scale: tuple[float, float] = (0.05, 0.3)  #: RandomResizedCrop area range of focal views
    hflip: float = 0.5  #: horizontal-flip probability
    color_jitter: float = 0.5  #: jitter strength s: brightness/contrast/saturation 0.8 s, hue 0.2 s
    color_jitter_prob: float = 0.8  #: probability of the colour jitter
    grayscale_prob: float = 0.2  #: probability of grayscale
    blur_prob: float = 0.5  #: probability of the Gaussian blur
    blur_sigma: tuple[float, float] = (0.1, 2.0)  #: blur sigma range
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  #: normalisation mean
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)  #: normalisation std


@dataclass
class DataConfig:
    """Data set and loader (``configs/data``)."""

    name: str = "imagenet"  #: one of :data:`DATA_SETS`
    root: Optional[str] = None  #: data directory (null: the data set's default)
    num_workers: Optional[int] = None  #: loader worker processes (null: the CPUs this process may use, at most 8)
    on_bad_image: str = "skip"  #: skip (log once, count in skipped_images) | error
    augment: str = "batched"  #: batched (per-image parameters, batched ops) | device (the same, run on the training device) | per_sample (torchvision per image)
    reduced_decode: bool = True  #: decode large JPEGs scaled down by 2, 4 or 8 when every view's crop is still downscaled (msn.data.transforms.min_decode_pixels); false: full decode like the reference
    subset: Optional[int] = None  #: train on N images drawn by `seed` over the whole data set (shard_order=local: the first N)
    long_tail_ratio: Optional[float] = None  #: training split only: class i keeps ratio^(-i/(C-1)) of its images, a seeded draw (largest/smallest class = ratio; msn.data.datasets.long_tail_indices)
    shard_order: str = "global"  #: data=shards only: global (the ImageFolder order, every rank reads all shards) | local (each rank reads its own run of shards; docs/formats.md Sec. 9)
    synthetic_size: int = 256  #: images of data=synthetic
    synthetic_classes: int = 10  #: classes of data=synthetic
    synthetic_image_size: int = 64  #: image side of data=synthetic
    pin_memory: bool = True  #: pinned host memory (CUDA only)
    persistent_workers: bool = True  #: keep the workers between epochs
    views: ViewsConfig = field(default_factory=ViewsConfig)


@dataclass
class MaskConfig:
    """Anchor token drop (docs/method.md Sec. 2)."""

    ratio: float = 0.15  #: fraction of the anchor's patch tokens dropped
    shared: bool = False  #: true: the reference's one subset per step for the global batch


@dataclass
class LossConfig:
    """MSN loss and prototypes (docs/method.md Secs. 4-5)."""

    num_prototypes: int = 1024  #: K
    freeze_prototypes: bool = False  #: keep the prototypes fixed (reference freeze_proto)
    temperature: float = 0.1  #: softmax temperature tau
    sharpen_start: float = 0.25  #: target sharpening temperature at step 0
    sharpen_final: float = 0.25  #: ... and at the end of the stretched schedule
    use_sinkhorn: bool = True  #: Sinkhorn-balanced targets
    sinkhorn_iters: int = 3  #: Sinkhorn rounds
    memax_weight: float = 1.0  #: ME-MAX weight lambda (with prior=power_law: the weight of PMSN's KL term)
    entropy_weight: float = 0.0  #: weight of the mean prediction entropy
    prior: str = "uniform"  #: prototype prior of the regulariser: uniform (ME-MAX, MSN) | power_law (PMSN: KL(pbar || pi), pi_k ~ k^-prior_exponent; docs/method.md Sec. 5)
    prior_exponent: float = 0.25  #: power-law exponent tau of prior=power_law (0: the uniform prior; 0.25 in the PMSN paper)
    proto_grad_reduce: str = "mean"  #: prototype gradient over ranks: mean (like DDP) | sum (the reference)


@dataclass
class OptimConfig:
    """AdamW and its schedules (docs/method.md Sec. 6)."""

    epochs: int = 800  #: epochs the schedules are laid out for
    batch_size: int = 1024  #: GLOBAL batch (split evenly over the processes)
    lr: float = 1e-3  #: peak learning rate (not scaled with the batch)
    start_lr: float = 2e-4  #: learning rate at step 0 of the warm-up
    final_lr: float = 1e-6  #: cosine floor (never reached: the schedule is stretched)
    warmup_epochs: float = 15  #: linear warm-up length
    weight_decay: float = 0.04  #: weight decay at step 0
    final_weight_decay: float = 0.4  #: weight decay at the end of the stretched cosine
    betas: tuple[float, float] = (0.9, 0.999)  #: AdamW betas
    eps: float = 1e-8  #: AdamW eps
    clip_grad: Optional[float] = 3.0  #: global gradient-norm clip of the encoder (null: off)
    ema_start: float = 0.996  #: target EMA momentum at step 0
    ema_end: float = 1.0  #: ... approached at the end of the stretched schedule
    schedule_stretch: float = 1.25  #: schedule length over the run length
    decay_pos_embed: bool = True  #: weight decay on CLS token and position embedding (the reference)
    fused: str = "auto"  #: fused AdamW: auto (PyTorch's fused kernel on CPU and CUDA) | true | false (its default kernel)


@dataclass
class TrainLoopConfig:
    """Loop length, logging and checkpoint cadence."""

    max_steps: Optional[int] = None  #: stop after this many total steps (schedules still follow optim.epochs)
    log_every: int = 10  #: steps per metrics record
    checkpoint_every_epochs: int = 50  #: keep checkpoints/epoch_XXXX.pt every N epochs (0: only latest.pt)
    progress: bool = True  #: progress bar
    compile: bool = False  #: torch.compile the encoders, one static graph per view group (the first steps compile, no later one)
    compile_backend: str = "inductor"  #: torch.compile backend (inductor; aot_eager or eager to check graphs quickly)


@dataclass
class LoggingConfig:
    """Experiment tracking."""

    wandb: str = "disabled"  #: disabled | offline | online
    project: str = "msn"  #: wandb project
    run_name: Optional[str] = None  #: wandb run name (null: the config's name)
    entity: Optional[str] = None  #: wandb team or user (null: wandb's default)
    tags: list[str] = field(default_factory=list)  #: wandb run tags
    group: Optional[str] = None  #: wandb run group (e.g. one per sweep)
    artifact: Optional[str] = None  #: null | hf | timm | msn: log the final weights, exported so, as a wandb artifact


@dataclass
class DistConfig:
    """Multi-process training and preemption (``docs/scaling.md``)."""

    backend: str = "auto"  #: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    strategy: str = "ddp"  #: ddp (weights replicated, DistributedDataParallel) | fsdp2 (weights, gradients and AdamW moments sharded with fully_shard)
    timeout_min: float = 30.0  #: collective timeout in minutes
    slurm_env: str = "auto"  #: auto: without torchrun, build the process group from srun's SLURM_* variables | never
    #: signals that checkpoint at the next step boundary, then exit with code 75
    preempt_signals: list[str] = field(default_factory=lambda: ["USR1", "USR2", "TERM"])
    requeue: str = "auto"  #: auto: rank 0 runs `scontrol requeue $SLURM_JOB_ID` after that checkpoint | never


@dataclass
class MonitorConfig:
    """Live low-shot monitor of the target encoder during pre-training (docs/eval.md "Live monitor")."""

    enabled: bool = False  #: evaluate the target encoder every `every` steps and at the end (k-NN and k-shot accuracy)
    every: int = 1000  #: steps between two evaluations (the last step is always evaluated)
    root: Optional[str] = None  #: a labelled ImageFolder to draw the images from (null: the training data set and its labels)
    train_images: int = 500  #: labelled pool: the k-NN's neighbours and the source of the k-shot subsets
    test_images: int = 500  #: held-out images scored, disjoint from the pool (both drawn once, balanced over classes, seed 0)
    shots: list[int] = field(default_factory=lambda: [1, 5])  #: labelled images per class of the logistic-regression scores
    splits: int = 3  #: seeded k-shot subsets of the pool, their accuracies averaged
    knn_k: int = 20  #: neighbours of the k-NN vote (capped at train_images)


@dataclass
class AlarmConfig:
    """The collapse alarm: one warning per run (docs/method.md Sec. 5 "The collapse alarm"; msn.train.collapse)."""

    enabled: bool = True  #: warn once (log, progress bar, an `alarm` field in metrics.jsonl) when the run collapses or does not learn
    max_t: float = 0.9  #: collapse: max_t (mean largest target probability) at least this: targets one-hot
    prototypes: float = 0.1  #: collapse: np at most this fraction of min(global batch, K) (the floor never below 1)
    rank: float = 0.02  #: collapse: RankMe of the target embeddings at most this fraction of min(local batch, head.output_dim) (the floor never below 2)
    uniform: float = 1.5  #: not learning: max_t at most this multiple of 1/K (near-uniform targets), from twice the warm-up on
    patience: int = 3  #: logged records in a row a condition must hold


@dataclass
class MSNConfig:
    """The whole pre-training configuration (``configs/config.yaml`` composes it)."""

    name: str = "msn"  #: run name
    output_dir: str = "outputs/msn"  #: run directory (configs/config.yaml: outputs/${name})
    seed: int = 0  #: seed of weights, data order, augmentations and masks
    device: str = "auto"  #: auto | cpu | cuda | cuda:N
    precision: str = "auto"  #: auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp64 (numerical checks)
    #: auto (output_dir/checkpoints/latest.pt if present, refused when written with another config) | force (auto, even with
    #: another config) | never | PATH
    resume: str = "auto"
    init_from: Optional[str] = None  #: weights to start from (README "init_from")
    #: unpickle `resume` / `init_from` files in full (can run code a file carries): only for files you trust (docs/security.md)
    trust_pickle: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    alarm: AlarmConfig = field(default_factory=AlarmConfig)


AUGMENT_MODES = ("batched", "device", "per_sample")
DATA_SETS = ("imagenet", "folder", "shards", "fashion_mnist", "synthetic")
SHARD_ORDERS = ("global", "local")
PRIORS = ("uniform", "power_law")
PREEMPT_SIGNALS = ("USR1", "USR2", "TERM", "INT", "HUP", "CONT")


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: MSNConfig, world_size: int = 1) -> MSNConfig:
    """Check values that the schema's types cannot; raise :class:`ConfigError` naming the key."""
    model, data, views = cfg.model, cfg.data, cfg.data.views
    _check(model.arch is not None and model.patch_size is not None, "model.name",
           f"unknown preset {model.name!r}; choose from {sorted(MODELS)} or set model.arch and model.patch_size")
    _check(model.arch in ARCHITECTURES, "model.arch", f"unknown model {model.arch!r}; choose from {sorted(ARCHITECTURES)}")
    _check(model.patch_size > 0, "model.patch_size", f"must be positive, got {model.patch_size}")
    _check(0.0 <= model.drop_path_rate < 1.0, "model.drop_path_rate", f"must be in [0, 1), got {model.drop_path_rate}")
    _check(model.attention in ("sdpa", "eager"), "model.attention", f"must be sdpa or eager, got {model.attention!r}")
    _check(model.pos_embed in POS_EMBEDS, "model.pos_embed", f"must be one of {list(POS_EMBEDS)}, got {model.pos_embed!r}")
    for key, size in (("data.views.rand_size", views.rand_size), ("data.views.focal_size", views.focal_size)):
        _check(size > 0 and size % model.patch_size == 0, key, f"{size} px is not a positive multiple of model.patch_size={model.patch_size}")
    _check(views.num_focal >= 0, "data.views.num_focal", f"must be >= 0, got {views.num_focal}")
    _check(0.0 <= cfg.mask.ratio < 1.0, "mask.ratio", f"must be in [0, 1), got {cfg.mask.ratio}")
    _check(cfg.optim.batch_size > 0, "optim.batch_size", f"must be positive, got {cfg.optim.batch_size}")
    _check(
        cfg.optim.batch_size % world_size == 0,
        "optim.batch_size",
        f"global batch {cfg.optim.batch_size} is not divisible by the world size {world_size}",
    )
    _check(cfg.optim.epochs > 0, "optim.epochs", f"must be positive, got {cfg.optim.epochs}")
    _check(cfg.optim.schedule_stretch >= 1.0, "optim.schedule_stretch", f"must be >= 1, got {cfg.optim.schedule_stretch}")
    _check(cfg.train.max_steps is None or cfg.train.max_steps > 0, "train.max_steps", f"must be positive, got {cfg.train.max_steps}")
    _check(cfg.train.log_every > 0, "train.log_every", f"must be positive, got {cfg.train.log_every}")
    _check(cfg.loss.num_prototypes > 1, "loss.num_prototypes", f"must be > 1, got {cfg.loss.num_prototypes}")
    _check(cfg.loss.temperature > 0, "loss.temperature", f"must be positive, got {cfg.loss.temperature}")
    _check(cfg.loss.sharpen_start > 0 and cfg.loss.sharpen_final > 0, "loss.sharpen_start", "sharpen temperatures must be positive")
    _check(data.name in DATA_SETS, "data.name", f"unknown data set {data.name!r}; choose from {list(DATA_SETS)}")
    _check(data.on_bad_image in ("skip", "error"), "data.on_bad_image", f"must be skip or error, got {data.on_bad_image!r}")
    _check(data.subset is None or data.subset > 0, "data.subset", f"must be positive, got {data.subset}")
    _check(data.long_tail_ratio is None or data.long_tail_ratio >= 1, "data.long_tail_ratio", f"must be >= 1 (or null), got {data.long_tail_ratio}")
    _check(data.long_tail_ratio is None or data.shard_order == "global", "data.long_tail_ratio", "needs data.shard_order=global (a subset is not shard-local)")
    _check(data.augment in AUGMENT_MODES, "data.augment", f"must be one of {list(AUGMENT_MODES)}, got {data.augment!r}")
    _check(data.num_workers is None or data.num_workers >= 0, "data.num_workers", f"must be >= 0, got {data.num_workers}")
    if data.name in ("imagenet", "folder"):
        _check(data.root is not None, "data.root", f"is required for data={data.name} (an ImageFolder root)")
    _check(data.name != "shards" or data.root is not None, "data.root", "is required for data=shards (a folder written by msn-shards)")
    if data.name != "synthetic" and data.root not in (None, FASHION_MNIST_ROOT):  # the default one is fetched when missing
        _check(os.path.isdir(data.root), "data.root", f"directory not found: {data.root}")
    _check(data.shard_order in SHARD_ORDERS, "data.shard_order", f"must be global or local, got {data.shard_order!r}")
    _check(data.shard_order == "global" or data.name == "shards", "data.shard_order", f"local needs data=shards, got data={data.name}")
    _check(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"), "device", f"must be auto, cpu or cuda[:N], got {cfg.device!r}")
    _check(cfg.precision in ("auto", "fp32", "bf16", "fp64"), "precision",
           f"must be auto, fp32, bf16 or fp64, got {cfg.precision!r}")
    _check(cfg.logging.wandb in ("disabled", "offline", "online"), "logging.wandb", f"must be disabled, offline or online, got {cfg.logging.wandb!r}")
    _check(cfg.optim.fused in ("auto", "true", "false"), "optim.fused", f"must be auto, true or false, got {cfg.optim.fused!r}")
    _check(cfg.loss.proto_grad_reduce in ("mean", "sum"), "loss.proto_grad_reduce", f"must be mean or sum, got {cfg.loss.proto_grad_reduce!r}")
    _check(cfg.loss.prior in PRIORS, "loss.prior", f"must be one of {list(PRIORS)}, got {cfg.loss.prior!r}")
    _check(cfg.loss.prior_exponent >= 0, "loss.prior_exponent", f"must be >= 0, got {cfg.loss.prior_exponent}")
    _check(cfg.dist.backend in ("auto", "nccl", "gloo"), "dist.backend", f"must be auto, nccl or gloo, got {cfg.dist.backend!r}")
    _check(cfg.dist.strategy in ("ddp", "fsdp2"), "dist.strategy", f"must be ddp or fsdp2, got {cfg.dist.strategy!r}")
    _check(cfg.dist.timeout_min > 0, "dist.timeout_min", f"must be positive, got {cfg.dist.timeout_min}")
    _check(cfg.dist.slurm_env in ("auto", "never"), "dist.slurm_env", f"must be auto or never, got {cfg.dist.slurm_env!r}")
    _check(cfg.dist.requeue in ("auto", "never"), "dist.requeue", f"must be auto or never, got {cfg.dist.requeue!r}")
    for name in cfg.dist.preempt_signals:
        _check(name.upper().removeprefix("SIG") in PREEMPT_SIGNALS, "dist.preempt_signals", f"unknown signal {name!r}; choose from {list(PREEMPT_SIGNALS)}")
    monitor = cfg.monitor
    _check(monitor.every > 0, "monitor.every", f"must be positive, got {monitor.every}")
    _check(monitor.root is None or os.path.isdir(monitor.root), "monitor.root", f"directory not found: {monitor.root}")
    _check(monitor.train_images > 0, "monitor.train_images", f"must be positive, got {monitor.train_images}")
    _check(monitor.test_images > 0, "monitor.test_images", f"must be positive, got {monitor.test_images}")
    _check(len(monitor.shots) > 0 and all(k > 0 for k in monitor.shots) and len(set(monitor.shots)) == len(monitor.shots),
           "monitor.shots", f"must be distinct positive counts, got {list(monitor.shots)}")
    _check(monitor.splits > 0, "monitor.splits", f"must be positive, got {monitor.splits}")
    _check(monitor.knn_k > 0, "monitor.knn_k", f"must be positive, got {monitor.knn_k}")
    alarm = cfg.alarm
    _check(0 < alarm.max_t <= 1, "alarm.max_t", f"must be in (0, 1], got {alarm.max_t}")
    _check(0 <= alarm.prototypes < 1, "alarm.prototypes", f"must be in [0, 1), got {alarm.prototypes}")
    _check(0 <= alarm.rank < 1, "alarm.rank", f"must be in [0, 1), got {alarm.rank}")
    _check(alarm.uniform >= 1, "alarm.uniform", f"must be >= 1 (a multiple of 1/K), got {alarm.uniform}")
    _check(alarm.patience > 0, "alarm.patience", f"must be positive, got {alarm.patience}")
    _check(cfg.resume in ("auto", "force", "never") or os.path.isfile(cfg.resume), "resume",
           f"must be auto, force, never or an existing checkpoint file, got {cfg.resume!r}")
    return cfg


def load_config(raw: DictConfig | dict[str, Any], world_size: int = 1) -> MSNConfig:
    """Merge a composed config into :class:`MSNConfig` and validate it.

    Raises:
        ConfigError: one line naming the offending key.
    """
    try:
        schema = OmegaConf.structured(MSNConfig)
        merged = OmegaConf.merge(schema, raw)
        cfg = _typed(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        message = str(error).splitlines()[0]
        raise ConfigError(f"{key}: {message}" if key else message) from None
    return validate(cfg, world_size)


def to_dict(cfg: MSNConfig) -> dict[str, Any]:
    """:func:`plain_dict` of a training config."""
    return plain_dict(cfg)


#: Keys that name this machine's files: left out of anything made to be shared (exports, model
#: cards); a config read back without them takes the schema's defaults.
LOCAL_PATH_KEYS = ("output_dir", "resume", "init_from", "data.root", "monitor.root")


def shareable_dict(cfg: MSNConfig) -> dict[str, Any]:
    """:func:`to_dict` without :data:`LOCAL_PATH_KEYS` (docs/security.md)."""
    values = to_dict(cfg)
    for key in LOCAL_PATH_KEYS:
        *parents, leaf = key.split(".")
        section = values
        for parent in parents:
            section = section.get(parent, {})
        section.pop(leaf, None)
    return values


def from_dict(values: dict[str, Any], where: str = "config") -> MSNConfig:
    """Typed config from :func:`to_dict` output read from a file (a checkpoint, an export):
    data only, no interpolation is resolved (``${oc.env:...}`` stays text; docs/security.md),
    no file-system validation.

    Raises:
        ConfigError: one line naming ``where`` and the key at fault.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys, got {type(values).__name__}")
    try:
        return _typed(OmegaConf.merge(OmegaConf.structured(MSNConfig), literal(values)))
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        raise ConfigError(f"{where}: {key + ': ' if key else ''}{str(error).splitlines()[0]}") from None


def _typed(merged: DictConfig) -> MSNConfig:
    cfg = OmegaConf.to_object(merged)
    cfg.model.apply_preset()
    return cfg


def register_schema() -> None:
    """Register :class:`MSNConfig` as ``msn_schema`` in Hydra's ConfigStore, the base of
    ``configs/config.yaml``, so every key exists (and is typed) at composition time."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="msn_schema", node=MSNConfig)


register_schema()
