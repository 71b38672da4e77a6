"""Global batches on the devices, as the train loop and the evaluator consume them.

For files (a folder, TFDS) each process runs its tf.data pipeline, the slices become
global arrays with `jax.make_array_from_process_local_data`, and `prefetch_batches`
transfers stay in flight ahead of the step. For `synthetic` the batches are made on
the devices. Either way the loop sees one iterator of global batches, and
`take_report()` lists the unreadable images skipped since the last call.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import jax
import ml_collections
import tensorflow as tf
from jax.sharding import Mesh

from imagenet_jax.config import eval_image_size, train_image_sizes
from imagenet_jax.data import order, pipeline, repair, service, synthetic
from imagenet_jax.data.feeding import make_global_batch, prefetch_to_device
from imagenet_jax.data.sources import Source
from imagenet_jax.spec import parse_randaugment

_ENDLESS = 2**40  # past any run's last step


class DeviceBatches(Iterator[dict]):
    """Global batches, and the report of the examples skipped on the way."""

    def __init__(self, batches: Iterator[dict],
                 host: repair.SkippingBatches | service.OrderedBatches | None):
        self._batches, self._host = batches, host

    def __next__(self) -> dict:
        return next(self._batches)

    def take_report(self) -> dict[int, str]:
        """This process's unreadable examples since the last report: index -> where."""
        return self._host.take_report() if self._host else {}

    @property
    def service_counts(self) -> service.Counts | None:
        """Batches the data service delivered and those made here instead; None without it."""
        return self._host.counts if isinstance(self._host, service.OrderedBatches) else None

    def close(self) -> None:
        """Ends the input now (tearing a tf.data pipeline down can take seconds: here, not
        whenever it is collected); `take_report` still answers."""
        self._batches = iter(())
        if self._host is not None:
            self._host.close()


def process_batch_slice(global_batch_size: int) -> order.BatchSlice:
    """This process's part of each global batch."""
    return order.BatchSlice(global_batch_size, jax.process_index(), jax.process_count())


def read_retry(config: ml_collections.ConfigDict) -> repair.ReadRetry:
    return repair.ReadRetry(config.read_attempts, config.read_retry_delay_s)


def _to_devices(batches: Iterator[dict], mesh: Mesh, prefetch: int) -> Iterator[dict]:
    return prefetch_to_device(batches, prefetch, functools.partial(make_global_batch, mesh=mesh))


def train_spec(config: ml_collections.ConfigDict) -> pipeline.TrainSpec:
    """The train pipeline's parameters from `config`: crops, the resolution of each epoch
    (progressive resizing), RandAugment."""
    num_epochs = math.ceil(config.num_epochs)
    return pipeline.TrainSpec(config.image_size, config.seed, tuple(config.crop_scale),
                              tuple(config.crop_aspect_ratio),
                              image_sizes=train_image_sizes(config, num_epochs),
                              randaugment=parse_randaugment(config.randaugment))


def train_batches(source: Source, config: ml_collections.ConfigDict, mesh: Mesh,
                  start_step: int = 0, data_service: service.Service | None = None,
                  stop_step: int = _ENDLESS) -> DeviceBatches:
    """Global training batches of steps [start_step, stop_step) (endless by default), made
    in this process or by `data_service`'s workers (the same batches either way)."""
    if isinstance(source, synthetic.SyntheticSource):
        spec, epoch_steps = train_spec(config), order.steps_per_epoch(source, config.batch_size)
        return DeviceBatches(synthetic.train_batches(
            source, mesh, config.batch_size, lambda step: spec.size_of(step // epoch_steps),
            config.seed, start_step), None)
    host = host_train_batches(source, config, start_step, stop_step, data_service)
    return DeviceBatches(_to_devices(host, mesh, config.prefetch_batches), host)


def host_train_batches(source: Source, config: ml_collections.ConfigDict, start_step: int,
                       stop_step: int, data_service: service.Service | None = None, *,
                       timeout_s: float | None = None
                       ) -> repair.SkippingBatches | service.OrderedBatches:
    """This process's slices of the batches of steps [start_step, stop_step), in host
    memory: made here, or by `data_service`'s workers within `timeout_s` (default
    config.data_service_timeout_s)."""
    batch_slice, retry = process_batch_slice(config.batch_size), read_retry(config)
    spec = train_spec(config)

    def here(step: int, repairs: repair.Repairs) -> repair.SkippingBatches:
        return pipeline.skipping_train_batches(source, batch_slice, spec, step, retry, repairs)

    if data_service is None:
        return here(start_step, repair.Repairs())
    return _in_order(
        lambda step, repairs: pipeline.keyed_train_dataset(source, batch_slice, spec, step,
                                                           stop_step, repairs),
        here, start_step, stop_step, config, data_service, timeout_s)


def eval_batches(source: Source, config: ml_collections.ConfigDict, mesh: Mesh,
                 split: str = "val", data_service: service.Service | None = None
                 ) -> DeviceBatches:
    """Every example of `split` once, in whole global batches with a mask."""
    if isinstance(source, synthetic.SyntheticSource):
        return DeviceBatches(synthetic.eval_batches(
            source, mesh, config.eval_batch_size, eval_image_size(config), config.seed), None)
    batch_slice, retry = process_batch_slice(config.eval_batch_size), read_retry(config)
    image_size, crop_ratio = eval_image_size(config), config.eval_crop_ratio

    def here(batch: int, repairs: repair.Repairs) -> repair.SkippingBatches:
        return pipeline.skipping_eval_batches(source, batch_slice, split=split,
                                              image_size=image_size, crop_ratio=crop_ratio,
                                              start_batch=batch, retry=retry, repairs=repairs)

    if data_service is None:
        host = here(0, repair.Repairs())
    else:
        num_batches = order.num_eval_batches(source, split, config.eval_batch_size)
        host = _in_order(
            lambda batch, repairs: pipeline.keyed_eval_dataset(
                source, batch_slice, split=split, image_size=image_size, crop_ratio=crop_ratio,
                start_batch=batch, stop_batch=num_batches, repairs=repairs),
            here, 0, num_batches, config, data_service)
    return DeviceBatches(_to_devices(host, mesh, config.prefetch_batches), host)


def _in_order(keyed: Callable[[int, repair.Repairs], tf.data.Dataset],
              here: Callable[[int, repair.Repairs], repair.SkippingBatches], start: int,
              stop: int, config: ml_collections.ConfigDict, data_service: service.Service,
              timeout_s: float | None = None) -> service.OrderedBatches:
    """Positions [start, stop) made by `data_service`'s workers from `keyed` (the keyed
    batches from a position on), in order, each made `here` when the service fails it."""
    return service.OrderedBatches(
        lambda position, repairs: service.distribute(keyed(position, repairs),
                                                     data_service.target),
        here, start, stop, timeout_s=timeout_s or config.data_service_timeout_s,
        buffer_size=config.data_service_buffer)
