"""Config fields, validation, and the values derived from them at run time.

Every config in configs/ starts from `base_config()` and overrides what its recipe
changes. Values that depend on the dataset or the hardware (steps per epoch, the
learning rate scaled by batch size) are never written in a config: `derive`
computes them when the run starts.
"""

from __future__ import annotations

import dataclasses
import math
import re

import ml_collections

from imagenet_jax.errors import ConfigError
from imagenet_jax.spec import (
    DATA_AXIS,
    MESH_AXES,
    parse_data_service,
    parse_dataset,
    parse_randaugment,
)

DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "step", "exponential", "poly", "constant")
OPTIMIZERS = ("sgd", "rmsprop", "lars", "lamb", "adamw")
ON_NONFINITE = ("stop", "skip")


def base_config() -> ml_collections.ConfigDict:
    """ResNet-50 on ImageNet, the Goyal et al. (2017) recipe with a cosine schedule."""
    c = ml_collections.ConfigDict()
    c.model = "resnet50"
    c.model_options = ml_collections.ConfigDict()  # constructor options, e.g. aux_logits
    # 'demo', 'folder:/path', 'tfds:NAME' or 'synthetic' (see data/sources.py)
    c.dataset = "demo"
    c.data_dir = ""                  # TFDS data_dir for 'tfds:' datasets; '' = TFDS's default
    c.image_size = 224               # train resolution (unless progressive_resize is on)
    c.eval_image_size = 0            # eval resolution; 0 = image_size
    # Progressive resizing (FFCV): the train resolution ramps linearly from start_size (up
    # to start_epoch) to end_size (from end_epoch on), rounded to a multiple of `step`;
    # each distinct size compiles the step once. start_size = 0: off.
    c.progressive_resize = ml_collections.ConfigDict({
        "start_size": 0, "end_size": 0, "start_epoch": 0.0, "end_epoch": 0.0, "step": 32})
    c.batch_size = 256               # global, over all devices and processes
    c.eval_batch_size = 256          # global; the last batch is padded and masked
    c.num_epochs = 90.0
    c.seed = 0

    c.optimizer = "sgd"              # 'sgd', 'rmsprop', 'lars', 'lamb' or 'adamw'
    c.learning_rate = 0.1            # per 256 examples: scaled by batch_size / 256
    c.momentum = 0.9                 # sgd, rmsprop and lars
    c.nesterov = True                # sgd and lars
    c.rmsprop_decay = 0.9            # rmsprop only: decay of the squared-gradient average
    c.rmsprop_epsilon = 1.0          # rmsprop only: Inception-v3 uses 1.0
    c.lars_trust_coefficient = 0.001  # lars only: eta of You et al. (2017)
    c.adam_b1 = 0.9                  # lamb and adamw
    c.adam_b2 = 0.999                # lamb and adamw
    c.adam_epsilon = 1e-6            # lamb and adamw
    c.grad_clip_norm = 0.0           # clip the global gradient norm to this; 0 = off
    # On conv and dense kernels only, never BN or biases (nor do lars and lamb scale those
    # by a trust ratio). sgd and rmsprop add it to the gradient (L2, as PyTorch's SGD);
    # lars and lamb to the update before the trust ratio; adamw decouples it (x lr).
    c.weight_decay = 1e-4
    # Exponential moving average of the weights (and BatchNorm statistics), updated every
    # step; 0 = off. When on, each evaluation also scores the EMA weights ('val_ema').
    c.ema_decay = 0.0
    c.label_smoothing = 0.1
    c.lr_schedule = "cosine"         # 'cosine', 'step', 'exponential', 'poly' or 'constant',
    #                                  after warmup
    c.warmup_epochs = 5.0
    c.lr_decay_epochs = (30, 60, 80)  # 'step': multiply by lr_decay_factor at each epoch here
    c.lr_decay_every_epochs = 2.0    # 'exponential': multiply by lr_decay_factor this often
    c.lr_decay_factor = 0.1
    c.lr_poly_power = 2.0            # 'poly': (1 - t)^power from the peak to lr_poly_end (MLPerf)
    c.lr_poly_end = 1e-4             # 'poly': the final learning rate (absolute, not scaled)
    # Stop at the first evaluation whose top-1 reaches this (0 = train to the end), and log
    # the time-to-accuracy, steps and seconds, to metrics.jsonl ('target').
    c.target_top1 = 0.0

    c.crop_scale = (0.08, 1.0)       # random-resized-crop area fraction
    c.crop_aspect_ratio = (3 / 4, 4 / 3)
    c.eval_crop_ratio = 0.875        # centre crop of this fraction of the short side
    # RandAugment (Cubuk et al. 2019) on the host: "N,M" = N ops of magnitude M (0-30); "" = off.
    c.randaugment = ""
    # Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on the device, one Beta(alpha,
    # alpha) draw per batch mixing it with its reverse; both > 0: either, with even odds.
    # 0 = off. Train top-1 then counts the label with the larger share.
    c.mixup_alpha = 0.0
    c.cutmix_alpha = 0.0

    # Devices along each mesh axis ('data', 'fsdp'); -1 takes every device not used by the
    # other axes. The batch is split over both; parameters over 'fsdp' only (ZeRO-3 style).
    # A smaller mesh runs on the first devices only (1 process).
    # dcn_data: slices (or host groups) the data axis spans over the data-centre network;
    # the mesh's data axis is then dcn_data x data, laid out by the devices' topology.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "dcn_data": 1})
    c.fsdp_min_size = 2**18          # params with fewer elements stay replicated under fsdp
    # Overrides of the fsdp rule, first match wins: (regex searched in the '/'-joined param
    # path, spec) pairs, spec one entry per dim: an axis name, a tuple of them, or None.
    # E.g. (("fc/kernel$", (None, "fsdp")),); (("conv", ()),) replicates every conv.
    c.sharding_rules = ()
    # BatchNorm statistics over groups of this many consecutive examples of the global batch
    # (Goyal et al.: 32); 0 (or a batch no larger) = the whole batch. Independent of the
    # device count: 1 and 8 devices compute the same numbers. The running variance is the
    # whole batch's.
    c.batchnorm_group_examples = 0
    # BN running variance from the unbiased batch variance (x n/(n-1)), as torch does:
    # for fine-tuning torchvision weights exactly as torchvision would.
    c.batchnorm_unbiased_var = False

    # Computation dtype; parameters, optimizer state and BatchNorm statistics stay float32.
    # 'auto': bfloat16 on GPU and TPU, float32 on CPU. 'float16' scales the loss
    # dynamically (GPU option; bfloat16 needs no scaling).
    c.dtype = "auto"
    c.log_every_steps = 100
    c.eval_every_epochs = 1.0
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    # A step with a non-finite loss or gradient norm never changes the state; then
    # 'stop' ends the run (exit code 3) and 'skip' counts it and carries on.
    c.on_nonfinite = "stop"
    c.prefetch_batches = 2           # global batches in flight to the devices
    # On CPUs, compile the steps so that their math rounds alike on every x86 CPU (XLA's
    # rsqrt otherwise differs between AMD and Intel, and training amplifies it): the same
    # figures on any machine with the same core count, for a slower step on CPUs
    # (BENCHMARKS.md, "The demo's figures on other CPUs"). No effect on GPUs and TPUs.
    c.portable_cpu_math = False
    # 'tfds:' datasets: read records in this many reader processes of their own; 0 = in the
    # pipeline's threads, which hold Python's GIL for part of each record and so cap one
    # process's reads whatever its core count (BENCHMARKS.md, "Input at pod scale");
    # -1 = by core count: none below 16 cores (reading in threads is cheaper there), then
    # one per 16 (data/records.py).
    c.tfds_read_processes = -1
    # Where the input pipeline runs (data/service.py): '' in this process; 'local:N' on tf.data
    # service with N worker processes on this host; 'grpc://HOST:PORT' on an external
    # dispatcher's workers (`imagenet-jax data-service`). Batches and order are the same in
    # all three: a batch not delivered within data_service_timeout_s is made in this
    # process instead, and the service's early batches wait in a reorder buffer of
    # data_service_buffer local batches.
    c.data_service = ""
    c.data_service_timeout_s = 60.0
    c.data_service_buffer = 16
    # A failing read of an image or a checkpoint is tried this often, waiting
    # read_retry_delay_s, then twice that, ..., before the image counts as unreadable or
    # the checkpoint as damaged (a few seconds of NFS or Cloud Storage trouble cost nothing).
    c.read_attempts = 4
    c.read_retry_delay_s = 0.5
    # Trace steps [profile_start_step, profile_start_step + profile_num_steps) with
    # jax.profiler into WORKDIR/profile (process 0; view with TensorBoard's profile plugin
    # or xprof). 0 steps = off. Start after compilation and warm-up: step 1 compiles.
    c.profile_start_step = 10
    c.profile_num_steps = 0

    # Fine-tuning (train/init_from.py; docs/training.md, "Fine-tuning").
    # Start from other weights: '' (from scratch), a workdir (PATH: its latest checkpoint;
    # PATH@STEP; the EMA weights where the run kept them, PATH@STEP:raw or PATH@latest:raw
    # for the raw ones) or a torchvision weights file (.safetensors; .pth/.pt with torch).
    # Only a fresh workdir takes it: one with a checkpoint of its own resumes from that.
    c.init_from = ""
    # The classifier (and auxiliary heads) of the source: 'keep' it (same classes),
    # 'reset' it (new weights for this dataset's classes), 'keep_subset' (this dataset's
    # classes are some of the source's, by name: their rows), or 'auto': keep when the
    # class names are the source's, keep_subset when they are some of them, else reset.
    c.init_head = "auto"
    # Parameters fixed for the whole run: a regex searched in each '/'-joined parameter
    # path ('stages/0/0/conv1/conv/kernel'); matched parameters get no update, no weight
    # decay and no optimizer state, and a BatchNorm layer whose scale is matched keeps
    # its statistics too (it normalises with them). '^(?!fc/)' trains only a ResNet's
    # head: a linear probe. '' = everything trains.
    c.freeze = ""
    # ((regex, factor), ...): the learning rate of the parameters whose path the regex
    # matches (first match wins) times factor, e.g. (('^(?!fc/)', 0.1),) for a backbone
    # at a tenth of the head's rate; as a PyTorch parameter group's lr, weight decay
    # included. () = one rate for all.
    c.lr_multipliers = ()
    # Every BatchNorm layer normalises with its running statistics in training too and
    # never updates them (small batches of a new dataset); its scale and bias still train.
    c.batchnorm_frozen = False
    # BiT-HyperRule (Kolesnikov et al. 2020): the run's length, warmup and learning-rate
    # steps, resolution and mixup chosen from the dataset's size and images at run time
    # (train/hyperrule.py), in place of num_epochs, warmup_epochs, lr_schedule,
    # image_size and mixup_alpha.
    c.bit_hyperrule = False
    return c


# The ResNet family's recipes (configs/resnet.py:ARCH); they differ only
# in the architecture.
RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                "resnext50_32x4d", "wide_resnet50_2")


def resnet_recipe(model: str) -> ml_collections.ConfigDict:
    """The Goyal et al. (2017) recipe (configs/resnet.py's docstring tells it) for `model`,
    one of RESNET_ARCHS; ConfigError names the valid ones for any other."""
    if model not in RESNET_ARCHS:
        given = f"unknown ResNet architecture {model!r}" if model else "no ResNet architecture"
        raise ConfigError(f"{given}; valid: {', '.join(RESNET_ARCHS)} "
                          "(e.g. --config=configs/resnet.py:resnet101)")
    c = base_config()
    c.model = model
    c.dataset = "folder:~/data/imagenet"
    c.batch_size = 1024
    c.eval_batch_size = 1000
    c.num_epochs = 90.0
    c.learning_rate = 0.1
    c.warmup_epochs = 5.0
    c.weight_decay = 1e-4
    c.label_smoothing = 0.1
    c.batchnorm_group_examples = 32  # Goyal et al.'s per-worker batch
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000
    return c


def finetune_recipe() -> ml_collections.ConfigDict:
    """ResNet-50 fine-tuned from weights onto a folder by BiT-HyperRule (configs/finetune.py's
    docstring tells it); configs/linear_probe.py freezes all but its classifier."""
    c = base_config()
    c.model = "resnet50"
    c.dataset = "folder:~/data/my_classes"
    c.init_from = "resnet50.safetensors"
    c.init_head = "auto"
    c.bit_hyperrule = True           # steps, warmup, lr steps, resolution, mixup
    c.batch_size = 512
    c.eval_batch_size = 512
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.nesterov = False
    c.learning_rate = 0.003 * 256 / 512   # 0.003 at batch 512
    c.weight_decay = 0.0
    c.label_smoothing = 0.0
    c.crop_scale = (0.75, 1.0)
    c.eval_crop_ratio = 1.0
    c.log_every_steps = 50
    c.checkpoint_every_steps = 500
    return c


# Fields older versions wrote that no longer exist, and why reading them back may drop them:
# config_from_json serves evaluation, prediction and export, which they do not affect.
RETIRED_FIELDS = {
    # BatchNorm groups of N devices, replaced by batchnorm_group_examples (device-count
    # independent); training statistics only.
    "batchnorm_group_size",
}


def config_from_json(values: dict) -> ml_collections.ConfigDict:
    """A run's config again from the "config" of its WORKDIR/config.json: the fields JSON
    turned into lists become tuples again where the base config has tuples."""
    config = base_config()
    for name, value in values.items():
        if name in RETIRED_FIELDS:
            continue
        if name not in config:
            raise ConfigError(f"config.json has an unknown field {name!r} (written by another "
                              "version of imagenet_jax?)")
        default = config[name]
        if isinstance(default, ml_collections.ConfigDict):
            # Merged into the defaults: a field added since (mesh.dcn_data) keeps its default.
            config[name] = ml_collections.ConfigDict({**default.to_dict(), **value})
        elif isinstance(default, tuple):
            config[name] = _as_tuples(value)
        else:
            config[name] = value
    return config


def set_field(config: ml_collections.ConfigDict, name: str, value) -> None:
    """Sets field `name` ('image_size', or dotted: 'mesh.data') of `config`."""
    parent, _, field = name.rpartition(".")
    for part in filter(None, parent.split(".")):
        config = config[part]
    config[field] = value


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class Derived:
    """What a run computes from its config, its dataset and its devices."""

    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    steps_per_epoch: int
    num_train_steps: int
    warmup_steps: int
    eval_every_steps: int
    peak_learning_rate: float
    num_devices: int            # in the mesh
    num_processes: int
    mesh_shape: dict            # axis sizes; 'data' spans all dcn_data slices
    compute_dtype: str          # config.dtype with 'auto' resolved for the platform
    dcn_data: int = 1           # slices (or host groups) the data axis spans


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """The mesh's axis sizes {'data', 'fsdp'} from config.mesh, its -1 resolved against
    `num_devices`; 'data' spans all dcn_data slices. Raises ConfigError if it cannot fit."""
    sizes = {axis: size for axis, size in config.mesh.items() if axis != "dcn_data"}
    dcn_data = config.mesh.get("dcn_data", 1)
    bad_names = [axis for axis in sizes if axis not in MESH_AXES]
    if bad_names:
        raise ConfigError(f"mesh {sizes}: unknown axis {bad_names[0]!r}; valid axes: "
                          f"{', '.join(MESH_AXES)} and dcn_data")
    if not isinstance(dcn_data, int) or dcn_data < 1:
        raise ConfigError(f"mesh.dcn_data must be a positive integer, got {dcn_data!r}")
    unknown = [axis for axis, size in sizes.items() if size == -1]
    if len(unknown) > 1:
        raise ConfigError(f"mesh {sizes}: at most one axis may be -1")
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ConfigError(f"mesh {sizes}: sizes must be positive or -1")
    fixed = math.prod(size for size in sizes.values() if size != -1) * dcn_data
    if unknown:
        if num_devices % fixed:
            raise ConfigError(f"mesh {sizes} over dcn_data={dcn_data} slices: {num_devices} "
                              f"devices do not divide by {fixed}")
        sizes[unknown[0]] = num_devices // fixed
    sizes[DATA_AXIS] = sizes.get(DATA_AXIS, 1) * dcn_data
    if math.prod(sizes.values()) > num_devices:
        raise ConfigError(f"mesh {sizes} needs {math.prod(sizes.values())} devices; "
                          f"{num_devices} are available")
    if dcn_data > 1 and math.prod(sizes.values()) != num_devices:
        raise ConfigError(f"mesh {sizes} with dcn_data={dcn_data} must span all "
                          f"{num_devices} devices")
    return sizes


def validate(config: ml_collections.ConfigDict, *, model_names: list[str], num_devices: int,
             num_processes: int = 1) -> None:
    """Raises ConfigError for the first field that cannot run."""
    def check(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    check(config.model in model_names,
          f"unknown model {config.model!r}; valid models: {', '.join(model_names)}")
    try:
        parse_dataset(config.dataset)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    shape = mesh_shape(config, num_devices)
    mesh_devices = math.prod(shape.values())
    check(num_processes == 1 or mesh_devices == num_devices,
          f"mesh {shape} must span all {num_devices} devices when running on several processes")
    for name in ("batch_size", "eval_batch_size"):
        value = config[name]
        check(isinstance(value, int) and value > 0,
              f"{name} must be a positive integer, got {value!r}")
        check(value % mesh_devices == 0,
              f"{name}={value} is not divisible by the number of devices ({mesh_devices}); "
              f"use a multiple of {mesh_devices}")
        check(value % num_processes == 0,
              f"{name}={value} is not divisible by the number of processes ({num_processes})")
    check(config.num_epochs > 0, f"num_epochs must be positive, got {config.num_epochs}")
    check(config.image_size > 0, f"image_size must be positive, got {config.image_size}")
    check(config.learning_rate > 0, f"learning_rate must be positive, got {config.learning_rate}")
    check(config.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {config.warmup_epochs}")
    check(config.dtype in DTYPES, f"unknown dtype {config.dtype!r}; valid: {', '.join(DTYPES)}")
    check(config.lr_schedule in SCHEDULES,
          f"unknown lr_schedule {config.lr_schedule!r}; valid: {', '.join(SCHEDULES)}")
    check(config.optimizer in OPTIMIZERS,
          f"unknown optimizer {config.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    check(isinstance(config.portable_cpu_math, bool),
          f"portable_cpu_math must be True or False, got {config.portable_cpu_math!r}")
    check(config.on_nonfinite in ON_NONFINITE,
          f"unknown on_nonfinite {config.on_nonfinite!r}; valid: {', '.join(ON_NONFINITE)}")
    check(config.grad_clip_norm >= 0, f"grad_clip_norm must be >= 0, got {config.grad_clip_norm}")
    check(0 < config.crop_scale[0] <= config.crop_scale[1] <= 1,
          f"crop_scale must satisfy 0 < min <= max <= 1, got {tuple(config.crop_scale)}")
    check(0 < config.eval_crop_ratio <= 1,
          f"eval_crop_ratio must be in (0, 1], got {config.eval_crop_ratio}")
    for name in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        check(config[name] > 0, f"{name} must be positive, got {config[name]}")
    check(config.eval_every_epochs > 0,
          f"eval_every_epochs must be positive, got {config.eval_every_epochs}")
    check(isinstance(config.tfds_read_processes, int) and config.tfds_read_processes >= -1,
          "tfds_read_processes must be -1 (by core count), 0 (in the pipeline's threads) or "
          f"a number of processes, got {config.tfds_read_processes!r}")
    try:
        parse_data_service(config.data_service)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check(config.data_service_timeout_s > 0,
          f"data_service_timeout_s must be positive, got {config.data_service_timeout_s}")
    check(isinstance(config.data_service_buffer, int) and config.data_service_buffer >= 1,
          f"data_service_buffer must be a positive integer, got {config.data_service_buffer!r}")
    check(not config.data_service or not config.dataset.startswith("synthetic"),
          "data_service: synthetic batches are made on the devices, with no input pipeline "
          "to serve; use data_service='' with a synthetic dataset")
    check(isinstance(config.read_attempts, int) and config.read_attempts >= 1,
          f"read_attempts must be a positive integer, got {config.read_attempts!r}")
    check(config.read_retry_delay_s >= 0,
          f"read_retry_delay_s must be >= 0, got {config.read_retry_delay_s}")
    check(config.profile_start_step >= 1,
          f"profile_start_step must be >= 1, got {config.profile_start_step}")
    check(config.profile_num_steps >= 0,
          f"profile_num_steps must be >= 0, got {config.profile_num_steps}")
    check(isinstance(config.batchnorm_unbiased_var, bool),
          f"batchnorm_unbiased_var must be true or false, got {config.batchnorm_unbiased_var!r}")
    validate_recipe(config)
    validate_fine_tuning(config)
    validate_sharding(config, shape)


def validate_recipe(config: ml_collections.ConfigDict) -> None:
    """The large-batch recipe's fields: EMA, augmentation, resolution, BN groups, target."""
    def check(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    check(0 <= config.ema_decay < 1, f"ema_decay must be in [0, 1) (0 = off), got "
          f"{config.ema_decay}")
    for name in ("mixup_alpha", "cutmix_alpha"):
        check(config[name] >= 0, f"{name} must be >= 0 (0 = off), got {config[name]}")
    check(0 <= config.target_top1 <= 1,
          f"target_top1 must be in [0, 1] (0 = off), got {config.target_top1}")
    check(config.eval_image_size >= 0,
          f"eval_image_size must be >= 0 (0 = image_size), got {config.eval_image_size}")
    check(config.lr_poly_power > 0, f"lr_poly_power must be positive, got {config.lr_poly_power}")
    check(config.lr_poly_end >= 0, f"lr_poly_end must be >= 0, got {config.lr_poly_end}")
    check(config.lars_trust_coefficient > 0,
          f"lars_trust_coefficient must be positive, got {config.lars_trust_coefficient}")
    check(0 <= config.adam_b1 < 1 and 0 <= config.adam_b2 < 1,
          f"adam_b1 and adam_b2 must be in [0, 1), got {config.adam_b1}, {config.adam_b2}")
    check(config.adam_epsilon > 0, f"adam_epsilon must be positive, got {config.adam_epsilon}")
    try:
        parse_randaugment(config.randaugment)
    except ValueError as e:
        raise ConfigError(f"randaugment: {e}") from None
    group = config.batchnorm_group_examples
    check(isinstance(group, int) and group >= 0
          and (group == 0 or config.batch_size <= group or config.batch_size % group == 0),
          f"batchnorm_group_examples={group!r} must be 0 (the whole batch) or divide "
          f"batch_size={config.batch_size} (a batch no larger than a group is one group)")
    validate_progressive_resize(config.progressive_resize)


HEAD_MODES = ("auto", "keep", "reset", "keep_subset")


def validate_fine_tuning(config: ml_collections.ConfigDict) -> None:
    """init_from, init_head, freeze, lr_multipliers and batchnorm_frozen, as far as they
    can be checked without the parameters (their regexes are matched against them when the
    run is planned) or the source (read when the run starts)."""
    if not isinstance(config.init_from, str):
        raise ConfigError(f"init_from must be a path (a workdir or a weights file) or '', got "
                          f"{config.init_from!r}")
    if config.init_head not in HEAD_MODES:
        raise ConfigError(f"unknown init_head {config.init_head!r}; valid: "
                          f"{', '.join(HEAD_MODES)}")
    patterns = [("freeze", config.freeze)] if config.freeze else []
    form = "lr_multipliers is ((regex, factor), ...) with factors >= 0, e.g. (('^(?!fc/)', 0.1),)"
    for entry in config.lr_multipliers:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], (int, float)) and entry[1] >= 0):
            raise ConfigError(f"{form}; got {entry!r}")
        patterns.append(("lr_multipliers", entry[0]))
    for name, pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{name}: bad regex {pattern!r}: {e}") from None
    for name in ("batchnorm_frozen", "bit_hyperrule"):
        if not isinstance(config[name], bool):
            raise ConfigError(f"{name} must be True or False, got {config[name]!r}")


def validate_progressive_resize(schedule: ml_collections.ConfigDict) -> None:
    if not schedule.start_size:
        return
    form = (f"progressive_resize {schedule.to_dict()}: needs 0 < start_size <= end_size, "
            "0 <= start_epoch <= end_epoch and step >= 1 (start_size = 0: off)")
    if not (0 < schedule.start_size <= schedule.end_size and schedule.step >= 1
            and 0 <= schedule.start_epoch <= schedule.end_epoch):
        raise ConfigError(form)


def train_image_size(config: ml_collections.ConfigDict, epoch: int) -> int:
    """The training resolution of `epoch` (0-based): image_size, or FFCV's progressive
    schedule: start_size until start_epoch, end_size from end_epoch, in between the linear
    ramp rounded to a multiple of `step`."""
    schedule = config.progressive_resize
    if not schedule.start_size:
        return config.image_size
    if epoch <= schedule.start_epoch:
        return schedule.start_size
    if epoch >= schedule.end_epoch:
        return schedule.end_size
    fraction = (epoch - schedule.start_epoch) / (schedule.end_epoch - schedule.start_epoch)
    size = schedule.start_size + fraction * (schedule.end_size - schedule.start_size)
    return int(round(size / schedule.step)) * schedule.step


def train_image_sizes(config: ml_collections.ConfigDict, num_epochs: int) -> tuple[int, ...]:
    """train_image_size of epochs 0 .. num_epochs - 1 (a run's last, partial epoch included)."""
    return tuple(train_image_size(config, epoch) for epoch in range(num_epochs))


def eval_image_size(config: ml_collections.ConfigDict) -> int:
    return config.eval_image_size or config.image_size


def validate_sharding(config: ml_collections.ConfigDict, shape: dict[str, int]) -> None:
    """fsdp_min_size and sharding_rules against the resolved mesh.

    Whether a rule's spec fits its parameters' shapes is checked when the state is built
    (parallel/sharding.py), where the shapes are known.
    """
    del shape  # the rules' specs are checked against it with the parameters' shapes
    size = config.fsdp_min_size
    if not isinstance(size, int) or size < 0:
        raise ConfigError(f"fsdp_min_size must be a non-negative integer, got {size!r}")
    for rule in config.sharding_rules:
        validate_sharding_rule(rule)


def validate_sharding_rule(rule) -> None:
    """A rule is (regex, spec); spec entries are None, an axis name, or a tuple of names."""
    form = ("each sharding_rules entry is (regex, spec) with spec a tuple of None, "
            f"axis names or tuples of axis names; valid axes: {', '.join(MESH_AXES)}")
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
            and isinstance(rule[1], (tuple, list))):
        raise ConfigError(f"sharding rule {rule!r}: {form}")
    try:
        re.compile(rule[0])
    except re.error as e:
        raise ConfigError(f"sharding rule {rule!r}: bad regex: {e}") from None
    for entry in rule[1]:
        names = entry if isinstance(entry, (tuple, list)) else (entry,)
        if entry is not None and not all(name in MESH_AXES for name in names):
            raise ConfigError(f"sharding rule {rule!r}: {form}")


def steps_per_epoch(num_train_examples: int, global_batch_size: int) -> int:
    """Full global batches in one pass over the training set: the remainder of each epoch
    is dropped, so that every step has a whole batch and an epoch's images one size."""
    return num_train_examples // global_batch_size


def compute_dtype(dtype: str, platform: str) -> str:
    """config.dtype for `platform` ('cpu', 'gpu', 'tpu'): 'auto' is bfloat16 where the
    matrix units run it natively, float32 on CPUs, where it would only be emulated."""
    if dtype != "auto":
        return dtype
    return "float32" if platform == "cpu" else "bfloat16"


def derive(config: ml_collections.ConfigDict, *, num_classes: int, num_train_examples: int,
           num_eval_examples: int, num_devices: int, num_processes: int,
           platform: str = "cpu") -> Derived:
    shape = mesh_shape(config, num_devices)
    epoch_steps = steps_per_epoch(num_train_examples, config.batch_size)
    if epoch_steps == 0:
        raise ConfigError(f"batch_size={config.batch_size} is larger than the training split "
                          f"({num_train_examples} examples)")
    return Derived(
        num_classes=num_classes,
        num_train_examples=num_train_examples,
        num_eval_examples=num_eval_examples,
        steps_per_epoch=epoch_steps,
        # (Rounded first: a length given in steps, as epochs (hyperrule.py), is that many.)
        num_train_steps=max(1, math.ceil(round(config.num_epochs * epoch_steps, 6))),
        warmup_steps=round(config.warmup_epochs * epoch_steps),
        eval_every_steps=max(1, round(config.eval_every_epochs * epoch_steps)),
        peak_learning_rate=config.learning_rate * config.batch_size / 256,
        num_devices=math.prod(shape.values()),
        num_processes=num_processes,
        mesh_shape=shape,
        compute_dtype=compute_dtype(config.dtype, platform),
        dcn_data=config.mesh.get("dcn_data", 1),
    )
