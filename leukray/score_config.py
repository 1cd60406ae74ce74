"""configs/score.yaml as a typed object: what a scoring run reads, writes, runs on and how it commits (leukray.score)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from .config import StorageOptions, StrictModel

class ScoreConfig(StrictModel):
    """configs/score.yaml. Unknown keys are rejected by name."""

    input: str | None = None
    """Archive prefix: local folder or s3://bucket/prefix; searched recursively for jpg/jpeg/jpe/jfif/png/tif/tiff/bmp/
    webp/gif (any case); other files are counted in the run's record (`not_images`), not read."""
    output: str | None = None
    """The results Delta table (local folder or s3://bucket/prefix), created by the first run."""
    model: str | None = None
    """Registry reference: a package folder (model_card.json) or a model folder (LATEST → that version)."""
    storage: StorageOptions = StorageOptions()
    """Object storage (endpoint_url for S3-compatible stores; key/secret are masked in every dump)."""
    batch_size: int = 64
    """Images per model call of a CPU actor."""
    gpu_batch_size: int = 1024
    """Images per model call of a GPU actor. MobileNetV2 in bf16 is launch-bound at 32-64 images per call and
    reaches its throughput (~30 000 img/s on one H100/H200) only at ~1 000 per call."""
    decode: Literal["auto", "actor", "tasks"] = "auto"
    """Where files are read and decoded. actor: inside each model actor, in decode_threads threads beside the model
    (no decoded image enters the object store; fastest on CPU-only clusters). tasks: in Ray Data CPU tasks spread
    over every CPU of the cluster, the model actors only run the model (a GPU runs ~15x faster than one core
    decodes JPEGs). auto: tasks when the actors run on GPUs, else actor."""
    decode_batch_size: int = 16
    """Files per read+decode chunk in the actor's decode thread pool (one s3fs request per chunk on S3)."""
    files_per_block: int = 64
    """Rows of the file table per input block (and files per decode task with decode=tasks)."""
    num_actors: int = 1
    """Model actors (the Ray Data `concurrency` of the scoring stage)."""
    num_cpus_per_actor: float = 1.0
    """CPUs reserved per model actor (the inference backend may use more threads, see intra_op_threads)."""
    num_gpus_per_actor: float = 1.0
    """GPUs per model actor, used only when the cluster has GPUs (and device is auto or cuda)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda actors when the cluster has GPUs, else CPU actors."""
    backend: Literal["auto", "onnx", "openvino", "torch"] = "auto"
    """auto: torch (bf16 autocast, channels_last) on CUDA, OpenVINO on CPU. onnx: ONNX Runtime fp32 on CPU (the
    reference: probabilities within 1e-4 of the PyTorch model)."""
    cpu_precision: Literal["auto", "f32", "bf16"] = "f32"
    """OpenVINO inference precision. f32 matches PyTorch within 1e-4. bf16 (AMX / AVX512-BF16 CPUs; auto = bf16
    where the CPU has it) is ~2x faster, but its logits differ from fp32 by up to ~0.5-2.4 on trained models,
    which moves uncertain images' probabilities by up to 0.3 and flips some classes, so it is guarded
    (`_Scorer._guard_bf16`): images whose bf16 margin could hide such a change are scored again in f32, and the
    run goes f32 when most would be — as it did for every trained Taleqani model (docs/scoring.md). ONNX Runtime
    runs f32 only."""
    intra_op_threads: int = 0
    """Inference threads per CPU actor; 0 = the CPUs of the node divided by num_actors. OpenVINO runs one
    single-threaded stream per thread."""
    cpu_request_images: int = 2
    """Images per OpenVINO inference request: a batch is cut into requests that the streams run side by side;
    small requests keep MobileNetV2's activations in cache (2 was fastest on the 2-core machine, docs/scoring.md)."""
    decode_threads: int = 2
    """Read+decode threads per model actor (PIL releases the GIL); they decode the next batch while the model runs."""
    tta: Literal["package", "none", "flips4", "dihedral8", "adaptive"] = "package"
    """Test-time augmentation (`leukray.tta`): package = the mode the model's temperature was fitted with (card
    `tta`; the default recipe's: adaptive); adaptive = one pass per image, the 8 dihedral views only for images
    below the package's cascade threshold (needs a package with the cascade in its card: trained with `tta:
    adaptive`, or `leukray calibrate --tta adaptive`); dihedral8 = 8 passes per
    image; none = one pass. An adaptive package carries the temperatures of none and dihedral8 too; other
    packages use their temperature as it is for another mode (refit it with `leukray calibrate --tta MODE`)."""
    review_threshold: float = 0.8
    """needs_review = calibrated confidence < review_threshold (`leukray evaluate` reports what it catches)."""
    benign_malignant_threshold: float = 0.9
    """needs_review also when the calibrated probability of the row's side of benign vs malignant is below this:
    doubt about the benign ↔ malignant call goes to review even when the predicted class clears review_threshold;
    0 = off."""
    max_file_bytes: int = 256 * 1024 * 1024
    """Files larger than this are error rows without being read (decompression bombs are caught by pixel count)."""
    object_store_limit_mb: int = 256
    """Ray Data object store budget of the run (only file rows and output rows pass through it now that decoding
    happens inside the model actor); 0 = Ray's default (a share of the object store)."""
    max_rows_per_file: int = 10_000
    """Rows per data file a worker writes (the unit a commit can include: keep it well below what the actors score
    in commit_every_minutes)."""
    commit_every_files: int = 200_000
    """Commit the rows written so far after this many more input files (each commit atomic: a driver that dies
    loses at most the rows since the last commit, and the rerun scores only those)."""
    commit_every_minutes: float = 10.0
    """…or after this many minutes since the last commit, whichever comes first."""
    vacuum_after_run: bool = True
    """After the run, delete files no commit references that are older than vacuum_retention_hours."""
    vacuum_retention_hours: float = 168.0
    """Age a stray file must reach before a vacuum deletes it. Must exceed the time between a worker writing a file
    and its run committing it (commit_every_minutes plus a file's write time) for every run that may be writing
    the table: lower it only when no run is in flight."""
    delta_options: dict[str, str] = {}
    """Extra deltalake storage options for the table (e.g. `conditional_put: none` plus a DynamoDB commit lock,
    `AWS_S3_LOCKING_PROVIDER: dynamodb`, for an S3 store without conditional put). Credentials belong in storage."""
    run_date: str | None = None
    """Partition date YYYY-MM-DD; default: the UTC date the run started (set it for backfills)."""
    limit: int | None = None
    """Score at most this many new files (smoke tests); the rest wait for the next run."""
    ray_address: str | None = None
    """Ray cluster address; default: $RAY_ADDRESS (e.g. inside `ray job submit`), else a local Ray on 127.0.0.1."""

    def model_post_init(self, _: Any) -> None:
        if min(self.batch_size, self.gpu_batch_size, self.decode_batch_size, self.files_per_block, self.num_actors, self.decode_threads,
               self.cpu_request_images) < 1:
            raise ValueError("batch_size, gpu_batch_size, decode_batch_size, files_per_block, num_actors, decode_threads and "
                             "cpu_request_images must be >= 1")
        for key in ("review_threshold", "benign_malignant_threshold"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key}={getattr(self, key)} must be in [0, 1]")
        if self.backend in ("onnx", "torch") and self.cpu_precision == "bf16":
            raise ValueError(f"cpu_precision=bf16 needs backend openvino (or auto on CPU); backend={self.backend} "
                             "runs f32 on CPU")
        if self.max_rows_per_file < 1 or self.commit_every_files < 1 or self.commit_every_minutes <= 0:
            raise ValueError("max_rows_per_file and commit_every_files must be >= 1, commit_every_minutes > 0")
        if self.vacuum_retention_hours < 0:
            raise ValueError(f"vacuum_retention_hours={self.vacuum_retention_hours} must be >= 0")
        if self.run_date is not None:
            try:
                dt.date.fromisoformat(self.run_date)
            except ValueError:
                raise ValueError(f"run_date={self.run_date!r} must be a date YYYY-MM-DD") from None


class ScoreError(ValueError):
    """The run cannot start or cannot commit; the message says why and where."""


