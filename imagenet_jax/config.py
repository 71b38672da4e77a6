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

from imagenet_jax.data.spec import parse_dataset

DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "step", "exponential", "constant")
OPTIMIZERS = ("sgd", "rmsprop")
ON_NONFINITE = ("stop", "skip")
# The mesh axes, as parallel/mesh.py names them: the batch is split over both, parameters
# over 'fsdp' only.
MESH_AXES = ("data", "fsdp")


class ConfigError(ValueError):
    """A config that cannot run; the message says what is wrong and what is valid."""


def base_config() -> ml_collections.ConfigDict:
    """ResNet-50 on ImageNet, the Goyal et al. (2017) recipe with a cosine schedule."""
    c = ml_collections.ConfigDict()
    c.model = "resnet50"
    c.model_options = ml_collections.ConfigDict()  # constructor options, e.g. aux_logits
    # 'demo', 'folder:/path', 'tfds:NAME' or 'synthetic' (see data/sources.py)
    c.dataset = "demo"
    c.data_dir = ""                  # TFDS data_dir for 'tfds:' datasets; '' = TFDS's default
    c.image_size = 224               # train and eval resolution
    c.batch_size = 256               # global, over all devices and processes
    c.eval_batch_size = 256          # global; the last batch is padded and masked
    c.num_epochs = 90.0
    c.seed = 0

    c.optimizer = "sgd"              # 'sgd' or 'rmsprop'
    c.learning_rate = 0.1            # per 256 examples: scaled by batch_size / 256
    c.momentum = 0.9
    c.nesterov = True                # sgd only
    c.rmsprop_decay = 0.9            # rmsprop only: decay of the squared-gradient average
    c.rmsprop_epsilon = 1.0          # rmsprop only: Inception-v3 uses 1.0
    c.grad_clip_norm = 0.0           # clip the global gradient norm to this; 0 = off
    c.weight_decay = 1e-4            # on conv and dense kernels only, not BN or biases
    c.label_smoothing = 0.1
    c.lr_schedule = "cosine"         # 'cosine', 'step', 'exponential' or 'constant', after warmup
    c.warmup_epochs = 5.0
    c.lr_decay_epochs = (30, 60, 80)  # 'step': multiply by lr_decay_factor at each epoch here
    c.lr_decay_every_epochs = 2.0    # 'exponential': multiply by lr_decay_factor this often
    c.lr_decay_factor = 0.1

    c.crop_scale = (0.08, 1.0)       # random-resized-crop area fraction
    c.crop_aspect_ratio = (3 / 4, 4 / 3)
    c.eval_crop_ratio = 0.875        # centre crop of this fraction of the short side

    # Devices along each mesh axis ('data', 'fsdp'); -1 takes every device not used by the
    # other axes. The batch is split over both; parameters over 'fsdp' only (ZeRO-3 style).
    # A smaller mesh runs on the first devices only (1 process).
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    c.fsdp_min_size = 2**18          # params with fewer elements stay replicated under fsdp
    # Overrides of the fsdp rule, first match wins: (regex searched in the '/'-joined param
    # path, spec) pairs, spec one entry per dim: an axis name, a tuple of them, or None.
    # E.g. (("fc/kernel$", (None, "fsdp")),); (("conv", ()),) replicates every conv.
    c.sharding_rules = ()
    c.batchnorm_group_size = 0       # BN statistics over groups of N batch devices; 0 = global
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
    return c


def config_from_json(values: dict) -> ml_collections.ConfigDict:
    """A run's config again from the "config" of its WORKDIR/config.json: the fields JSON
    turned into lists become tuples again where the base config has tuples."""
    config = base_config()
    for name, value in values.items():
        if name not in config:
            raise ConfigError(f"config.json has an unknown field {name!r} (written by another "
                              "version of imagenet_jax?)")
        default = config[name]
        if isinstance(default, ml_collections.ConfigDict):
            config[name] = ml_collections.ConfigDict(value)
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
    mesh_shape: dict
    compute_dtype: str          # config.dtype with 'auto' resolved for the platform


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolves config.mesh's -1 against `num_devices`; raises ConfigError if it cannot fit."""
    sizes = dict(config.mesh)
    bad_names = [axis for axis in sizes if axis not in MESH_AXES]
    if bad_names:
        raise ConfigError(f"mesh {sizes}: unknown axis {bad_names[0]!r}; valid axes: "
                          f"{', '.join(MESH_AXES)}")
    unknown = [axis for axis, size in sizes.items() if size == -1]
    if len(unknown) > 1:
        raise ConfigError(f"mesh {sizes}: at most one axis may be -1")
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ConfigError(f"mesh {sizes}: sizes must be positive or -1")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if unknown:
        if num_devices % fixed:
            raise ConfigError(f"mesh {sizes}: {num_devices} devices do not divide by {fixed}")
        sizes[unknown[0]] = num_devices // fixed
    if math.prod(sizes.values()) > num_devices:
        raise ConfigError(f"mesh {sizes} needs {math.prod(sizes.values())} devices; "
                          f"{num_devices} are available")
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
    validate_sharding(config, shape)


def validate_sharding(config: ml_collections.ConfigDict, shape: dict[str, int]) -> None:
    """fsdp_min_size, sharding_rules and batchnorm_group_size against the resolved mesh.

    Whether a rule's spec fits its parameters' shapes is checked when the state is built
    (parallel/sharding.py), where the shapes are known.
    """
    mesh_devices = math.prod(shape.values())
    size = config.fsdp_min_size
    if not isinstance(size, int) or size < 0:
        raise ConfigError(f"fsdp_min_size must be a non-negative integer, got {size!r}")
    for rule in config.sharding_rules:
        validate_sharding_rule(rule)
    group = config.batchnorm_group_size
    if not isinstance(group, int) or group < 0 or (group and mesh_devices % group):
        divisors = [n for n in range(1, mesh_devices + 1) if mesh_devices % n == 0]
        raise ConfigError(
            f"batchnorm_group_size={group!r} must be 0 (global statistics) or divide the "
            f"{mesh_devices} devices of mesh {shape}: one of {divisors}")


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
    steps_per_epoch = num_train_examples // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size={config.batch_size} is larger than the training split "
                          f"({num_train_examples} examples)")
    return Derived(
        num_classes=num_classes,
        num_train_examples=num_train_examples,
        num_eval_examples=num_eval_examples,
        steps_per_epoch=steps_per_epoch,
        num_train_steps=max(1, math.ceil(config.num_epochs * steps_per_epoch)),
        warmup_steps=round(config.warmup_epochs * steps_per_epoch),
        eval_every_steps=max(1, round(config.eval_every_epochs * steps_per_epoch)),
        peak_learning_rate=config.learning_rate * config.batch_size / 256,
        num_devices=math.prod(shape.values()),
        num_processes=num_processes,
        mesh_shape=shape,
        compute_dtype=compute_dtype(config.dtype, platform),
    )
