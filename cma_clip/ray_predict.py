"""Batch prediction on Ray Data: score a whole catalogue on one machine or a Ray cluster.

    python -m cma_clip.predict --checkpoint C --manifest items.parquet --out preds.parquet --engine ray
    python -m cma_clip.predict ... --engine ray --ray-address auto      # on a cluster's head node

Two stages, so a cluster can give each its own resources: decode actors (CPU: read the
image, letterbox it to uint8 pixels, tokenise the text) and model actors (`map_batches`
with a callable class: the checkpoint loaded once per actor, on a GPU when the cluster has
one). Ray streams batches between them, so decoding and inference overlap. When the model
actors run on CPUs, they decode their own batches by default (`decode_workers=0`), as one
process does: two batches in flight per actor, one decoded by low-priority threads while the
other runs the model (a decode actor beside them takes the same cores: 0.65 to 0.8 of the
backbone's throughput on 2 cores, docs/PERFORMANCE.md). An actor that
dies has its batch retried (`max_restarts`, `max_task_retries`); rows come out in the
manifest's order (`DataContext.execution_options.preserve_order`, checked against a row
index), and the driver streams them into one Parquet or JSONL file. `ray` is an optional
extra: `pip install -r requirements-ray.txt`. How to run it on a cluster: docs/SCALE.md.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .backbones import DualEncoder, TextBatch
from .checkpoint import load_backbone, read_config
from .data import Catalogue, CatalogueError, ImageError, pyarrow_modules
from .errors import CMAClipError
from .features import decoded_pixels
from .predict import Prediction, Predictor, open_for_prediction, output_row
from .runtime import keep_freed_memory, kept_memory_env, lower_thread_priority

OUTPUT_SUFFIXES = (".parquet", ".jsonl")
DECODING_CALLS = 2  # batches in flight in a model actor that decodes: one decoding, one in the model


class RayEngineError(CMAClipError, RuntimeError):
    """Ray is missing, or a Ray run failed for a reason other than the data."""


@dataclass
class RayOptions:
    """How a Ray run is laid out. None for the GPU count: one per model actor when the cluster has GPUs."""

    address: str | None = None  # None: start a local Ray; "auto" or "ray://host:10001": join a cluster
    batch_size: int = 32  # items per batch, and per Ray block (a retried task redoes one batch)
    decode_workers: int | None = None  # CPU actors decoding; 0: the model actors decode; None: 1 with GPUs, else 0
    inference_workers: int = 1  # model actors
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1  # CPUs Ray reserves for each model actor
    threads: int | None = None  # torch threads per model actor on a CPU; None: see _cpu_threads
    crash_once: str | None = None  # fault drill (tests): the first model batch kills its actor, once per marker file
    skip_unreadable: bool = False  # an unreadable image gets a row without labels and an error, instead of stopping


def import_ray() -> Any:
    """The `ray` module, or a clear message: the core install does not need it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RayEngineError("--engine ray needs Ray Data: pip install -r requirements-ray.txt") from exc
    return ray


class _Decode:
    """Stage 1 (CPU): image file -> letterboxed uint8 pixels, text -> token ids and mask. An
    unreadable image gets blank pixels and its message in `error`: the driver decides whether it
    stops the run (a worker's exception would reach the user buried in Ray's tracebacks)."""

    def __init__(self, checkpoint: str, threads: int = 1, backbone: DualEncoder | None = None) -> None:
        config = read_config(checkpoint)
        # its preprocessing and tokenizer: a model actor that decodes lends its own backbone, and
        # decodes at low priority, in the moments its model leaves a core idle
        self.backbone = backbone or load_backbone(checkpoint, config, "cpu")
        self.max_tokens = config.catalogue.max_text_tokens
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode",  # PIL releases the GIL
                                       initializer=lower_thread_priority if backbone is not None else None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded = list(self.pool.map(partial(decoded_pixels, self.backbone), batch["path"]))
        text = self.backbone.tokenize([str(t) for t in batch["text"]], self.max_tokens)
        return {"_row": batch["_row"], "id": batch["id"], "text": batch["text"],
                "pixels": np.stack([pixels for pixels, _ in decoded]),
                "token_ids": text.ids.numpy(), "token_mask": text.mask.numpy(),
                "error": np.array([error for _, error in decoded], dtype=object)}


class _Infer:
    """Stage 2 (GPU when there is one): the checkpoint's model on decoded batches. Up to two
    calls run at once (`DECODING_CALLS`) when the actor decodes its own batches: the decoding of
    the next batch and the output rows of the last overlap the model, which runs one batch at a
    time on one thread of its own (`self.model_thread`), where the model was also loaded.

    One thread, because Ray runs concurrent calls on several threads, and every thread that runs
    torch operators on a CPU gets its own OpenMP thread team: with two teams in one process the
    backbone kept 1.55 to 1.75 of 2 cores busy instead of 1.95, and ran 1.5x slower than in the
    driver (measured on 2 cores, docs/PERFORMANCE.md)."""

    def __init__(self, checkpoint: str, threads: int | None, crash_once: str | None, decode: bool = False) -> None:
        keep_freed_memory()  # where the actor was started without `kept_memory_env` (a no-op otherwise)
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.predictor = self.model_thread.submit(self._load, checkpoint, threads).result()
        self.crash_once = crash_once
        # no decode stage: its batches come undecoded, and are decoded here with the actor's cores
        threads = self.model_thread.submit(torch.get_num_threads).result()  # the model thread's, as set there
        self.decode = _Decode(checkpoint, threads, self.predictor.backbone) if decode else None

    @staticmethod
    def _load(checkpoint: str, threads: int | None) -> Predictor:
        if threads:
            torch.set_num_threads(threads)  # OpenMP's thread count is per calling thread: set it on this one
        return Predictor.from_checkpoint(checkpoint)  # the actor's GPU if Ray gave it one, else the CPU

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.crash_once and not os.path.exists(self.crash_once):
            Path(self.crash_once).touch()
            os._exit(1)  # the drill: the actor dies mid-batch, as an out-of-memory kill would
        if self.decode is not None:
            batch = self.decode(batch)
        preds = self.model_thread.submit(self._predict, batch).result()
        rows = [output_row(p, str(e)) for p, e in zip(preds, batch["error"])]
        columns: dict[str, Any] = {"_row": batch["_row"], "id": batch["id"]}
        columns.update({name: np.array([row[name] for row in rows]) for name in rows[0]})
        return columns

    def _predict(self, batch: dict[str, np.ndarray]) -> list[Prediction]:
        backbone = self.predictor.backbone
        text = TextBatch(torch.from_numpy(batch["token_ids"]), torch.from_numpy(batch["token_mask"]))
        texts = [str(t) for t in batch["text"]]  # an item without text is never auto-accepted, as in one process
        return self.predictor.predict_prepared(backbone.normalise(batch["pixels"]), text, texts=texts)


def predict_manifest_ray(checkpoint: str | Path, manifest: str | Path, out: str | Path,
                         options: RayOptions | None = None, on_finish: Callable[[Any], None] | None = None) -> int:
    """Predict every row of a CSV, JSONL or Parquet manifest on Ray Data into `out` (.parquet or
    .jsonl, written atomically, rows in the manifest's order); `on_finish(dataset)` once it is
    written (its `stats()` say what each stage took). Joins `ray.init` already done by the
    caller, else starts Ray (local, or `options.address`) and stops it at the end."""
    options = options or RayOptions()
    out = Path(out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise CatalogueError(f"--engine ray writes {' or '.join(OUTPUT_SUFFIXES)} files, not {out.name}")
    ray = import_ray()
    checkpoint = str(Path(checkpoint).resolve())
    catalogue = open_for_prediction(read_config(checkpoint), manifest, photos_required=not options.skip_unreadable)
    started = not ray.is_initialized()
    if started:
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False)
    try:
        dataset = prediction_dataset(ray, checkpoint, catalogue, options)
        _write_in_order(dataset, out, len(catalogue), options.skip_unreadable)
        if on_finish is not None:
            on_finish(dataset)
    except ray.exceptions.RayTaskError as exc:
        raise _user_error(exc) from exc
    finally:
        if started:
            ray.shutdown()
    return len(catalogue)


def prediction_dataset(ray: Any, checkpoint: str, catalogue: Catalogue, options: RayOptions) -> Any:
    """The (lazy) dataset of the catalogue's prediction rows, in its order, with their row index
    as `_row`: blocks of one batch, decoded by CPU actors (or by the model actors themselves:
    `decode_workers=0`), predicted by model actors."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.raise_original_map_exception = True  # a worker's CMAClipError reaches the driver as itself
    pa, _ = pyarrow_modules()
    table = pa.table({"_row": np.arange(len(catalogue)), "id": catalogue.item_ids(), "text": catalogue.texts(),
                      "path": [str(p) for p in catalogue.image_paths()]})
    blocks = [table.slice(start, options.batch_size) for start in range(0, table.num_rows, options.batch_size)]
    gpus = options.gpus_per_worker
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    threads = options.threads or (None if gpus else _cpu_threads(options))
    decoders = options.decode_workers if options.decode_workers is not None else (1 if gpus else 0)
    dataset = ray.data.from_arrow(blocks)
    # glibc's memory settings from the actors' start (`runtime.kept_memory_env`): set from inside
    # the actor they came too late, and its model thread faulted its activations back in on every
    # batch (the inference stage 0.50 to 0.62 of the backbone alone)
    environment = {"env_vars": kept_memory_env()}
    # two actor pools with their own resources, so Ray does not fuse the stages; Ray Data restarts
    # a dead actor and resubmits its batch (actor pools default to max_restarts=-1, max_task_retries=-1)
    if decoders:
        dataset = dataset.map_batches(_Decode, fn_constructor_args=(checkpoint, 1, None),
                                      batch_size=options.batch_size,
                                      batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=decoders),
                                      num_cpus=1, runtime_env=environment)
    calls = 1 if decoders else DECODING_CALLS
    pool = ray.data.ActorPoolStrategy(size=options.inference_workers, max_concurrent_calls_per_actor=calls,
                                      enable_true_multi_threading=calls > 1)
    return dataset.map_batches(_Infer, fn_constructor_args=(checkpoint, threads, options.crash_once, not decoders),
                               batch_size=options.batch_size, batch_format="numpy", compute=pool,
                               num_cpus=options.cpus_per_worker, num_gpus=gpus, runtime_env=environment)


def _cpu_threads(options: RayOptions) -> int:
    """torch threads of a model actor on CPUs: on a local Ray, the machine's cores shared by the
    model actors (as one process would use them, the decode workers taking spare cycles, as the
    DataLoader's do); on a cluster, the CPUs Ray reserved for the actor."""
    if options.address is None:
        return max(1, (os.cpu_count() or 1) // options.inference_workers)
    return max(1, int(options.cpus_per_worker))


def _write_in_order(dataset: Any, out: Path, rows: int, skip_unreadable: bool) -> None:
    """Stream the dataset's batches through the driver into `out`, checking each row's index;
    written to a temporary file renamed into place when complete. The first unreadable image
    stops the run with its `ImageError`, unless `skip_unreadable` keeps the rows' `error` column."""
    pa, pq = pyarrow_modules()
    parquet = out.suffix.lower() == ".parquet"
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    expected, writer = 0, None
    try:
        with open(tmp, "w", encoding="utf-8") as lines:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                order = batch.column("_row").to_numpy()
                if not np.array_equal(order, np.arange(expected, expected + len(order))):
                    raise RayEngineError(f"rows came back out of order at row {expected}")
                expected += len(order)
                if not skip_unreadable:
                    errors = [error for error in batch.column("error").to_pylist() if error]
                    if errors:
                        raise ImageError(errors[0])
                batch = batch.drop_columns(["_row"] if skip_unreadable else ["_row", "error"])
                if parquet:
                    writer = writer or pq.ParquetWriter(tmp, batch.schema)
                    writer.write_table(batch.cast(writer.schema))
                else:
                    lines.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in batch.to_pylist())
        if writer is not None:
            writer.close()
        if expected != rows:
            raise RayEngineError(f"{expected} of {rows} rows came back")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _user_error(exc: Exception) -> Exception:
    """A worker's CMAClipError with its own message, without Ray's traceback; anything else as a
    RayEngineError."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, CMAClipError):
        return type(cause)(*cause.args)
    return RayEngineError(f"the Ray run failed: {exc}")
