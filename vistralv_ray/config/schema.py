"""The one typed config tree of a vistralv-ray run: model, data, training, scaling and run settings.

Every field has a default so that a recipe YAML only states what differs. `Literal` types are the
allowed values of a field; the loader checks them and names the key when a value is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Stage = Literal["align", "finetune"]
LrRule = Literal["linear", "sqrt", "none"]

# LLaVA-1.5's reference global batches (REFERENCE.md): the learning rates of its recipes are
# tuned for these, and the scaling rule rescales from them.
REFERENCE_BATCH = {"align": 256, "finetune": 128}

VISTRAL_LM = "Viet-Mistral/Vistral-7B-Chat"
SIGLIP_TOWER = "google/siglip-base-patch16-256-multilingual"
# model.init_projector_from: a finetune that starts from a freshly initialised projector, said explicitly.
RANDOM_PROJECTOR = "random"

# Input size limits (docs/RELIABILITY.md says why these values). A 256 px model sees 65,536 pixels of
# any image; 25 Mpx passes a 24 Mpx (6000x4000) camera frame whole and bounds one decode to ~75 MB of
# RGB, where PIL's own 89 Mpx would let a single record take ~270 MB per decoding actor.
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000
# Characters: ~8k tokens a message and ~32k a record, far above any max_length (the token check that
# decides), and far above the longest LLaVA / Vista turns (a few thousand characters); they bound the
# work and memory one record can cost before it is tokenized.
DEFAULT_MAX_MESSAGE_CHARS = 32_768
DEFAULT_MAX_RECORD_CHARS = 131_072


@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    # Linear layers of the language model that get adapters (Mistral names).
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class ModelConfig:
    language_model: str = VISTRAL_LM
    vision_tower: str = SIGLIP_TOWER
    # LLaVA-1.5's Linear-GELU-Linear: what transformers' Llava projector is, so exports load anywhere.
    projector: Literal["mlp2x_gelu"] = "mlp2x_gelu"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["full", "default"] = "full"
    # None: take the vision tower's own image size.
    image_size: int | None = None
    aspect: Literal["resize", "pad"] = "pad"
    template: Literal["vistral", "plain", "native"] = "vistral"
    # None: the template's default (Vistral-V's Vietnamese system prompt for `vistral`).
    system_prompt: str | None = None
    max_length: int = 2048
    lora: LoraSettings = field(default_factory=LoraSettings)
    # An align run (directory, checkpoint or run name under run.storage) whose projector starts finetune,
    # or a projector.safetensors file; `random` (RANDOM_PROJECTOR) starts a finetune from a fresh projector
    # on purpose. A finetune without it does not start (see `loader.check_projector_start`).
    init_projector_from: str | None = None
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"


@dataclass
class DataConfig:
    # Parquet shard URIs or directories, local or s3://.
    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    per_device_batch: int = 8
    # pack: several samples per row, attention confined to each; pad: one sample per row, padded.
    batching: Literal["pack", "pad"] = "pack"
    # Token budget of one packed row (>= model.max_length); None: the whole micro-batch in one row.
    pack_length: int | None = None
    shuffle: bool = True
    # Shuffling: each preprocessing call reads this many row groups (64 rows each), drawn in a new random
    # order every epoch from all shards, and interleaves their rows at random; the trainer's local buffer
    # (shuffle_buffer rows per worker) mixes further. More row groups: closer to a global permutation,
    # and more raw rows held per preprocessing actor (row groups x 64 x the mean encoded image size).
    shuffle_row_groups: int = 16
    shuffle_buffer: int = 256
    # Images above this many pixels are rejected (too_many_pixels); above PIL's 89 Mpx, decompression_bomb.
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    preprocess_actors: int = 1
    preprocess_cpus_per_actor: float = 1.0
    # Custom resources the preprocessing actors ask for (e.g. {"cpu_node": 0.01} to keep them off GPU nodes).
    preprocess_resources: dict[str, float] = field(default_factory=dict)
    prefetch_batches: int = 2
    # Records per preprocessing call.
    map_batch_size: int = 32
    # Largest Ray Data block (MB) the pipeline makes. Ray's default, 128 MB, is ~650 preprocessed
    # 256 px samples in one object: a few of them filled a 256 MB object store and spilled to disk.
    max_block_mb: int = 8
    # Ray Data's own progress bars (progress log lines when not on a terminal); the training loop
    # reports steps, throughput and data wait itself, so they are off unless asked for.
    progress_bars: bool = False
    # A record with a longer message (characters), or longer messages in all, is rejected (text_too_long).
    max_message_chars: int = DEFAULT_MAX_MESSAGE_CHARS
    max_record_chars: int = DEFAULT_MAX_RECORD_CHARS


# What `train.benchmark.name` may be: the benchmarks of `vistralv-ray eval --benchmark` that read a
# published layout (evaluation/benchmarks.py; a unit test keeps the two lists equal).
TrainBenchmarkName = Literal["vivqa", "openvivqa", "evjvqa", "viocrvqa", "vitextvqa", "mtvqa", "uit-viic", "ktvic"]


@dataclass
class TrainBenchmark:
    """A benchmark subset the training run answers greedily every few steps (off while `name` is null)."""

    name: TrainBenchmarkName | None = None
    data: str | None = None  # the benchmark's file, in its published layout (local; read by the driver)
    images: str | None = None  # its image folder (default: the data file's folder, then its images/)
    # Every this many steps, and at the last step; null: at the last step only.
    every_steps: int | None = None
    max_questions: int = 64  # the first questions of the file (those with an image)
    max_new_tokens: int = 32


@dataclass
class TrainConfig:
    stage: Stage = "align"
    epochs: int = 1
    # Overrides epochs when set.
    max_steps: int | None = None
    grad_accum: int = 1
    base_lr: float = 1e-3
    lr_rule: LrRule = "linear"
    # None: LLaVA's reference batch for the stage (256 align, 128 finetune).
    reference_batch: int | None = None
    # Projector LR as a multiple of the effective LR in finetune (Vistral-V: 0.1, LLaVA LoRA: 2e-5/2e-4).
    projector_lr_scale: float = 1.0
    warmup_ratio: float = 0.03
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    zero_stage: Literal[2, 3] = 2
    # ZeRO-3 keeps parameters of at most this many elements whole on every rank instead of partitioning
    # them (fewer gathers, more memory). None: 1e6 on GPU, 1e4 on CPU.
    zero3_persistence_threshold: int | None = None
    offload_optimizer: bool = False
    offload_params: bool = False
    # auto: bf16 on GPU, fp32 on CPU.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int | None = None
    log_every: int = 10
    seed: int = 42
    benchmark: TrainBenchmark = field(default_factory=TrainBenchmark)


@dataclass
class ScalingSettings:
    # The target worker count; with min_workers set, the most the run grows to.
    workers: int = 1
    # None: a fixed-size run. Set: Ray Train's elastic mode, the group runs with as many workers between
    # min_workers and workers as the cluster holds, and restarts at a new size when that changes.
    min_workers: int | None = None
    # Elastic runs: how often Ray Train checks whether more workers fit (a grow); a shrink is a failure
    # and restarts at once (it counts against max_failures).
    resize_interval_s: float = 60.0
    # What a resize means. keep_global_batch: grad accumulation absorbs the change, the global batch (and
    # so the LR) stay as planned, the nearest batch when not divisible. rescale_lr: accumulation fixed,
    # the global batch follows the worker count and train.lr_rule re-derives the LR from it.
    elastic_policy: Literal["keep_global_batch", "rescale_lr"] = "keep_global_batch"
    # auto: GPUs when the cluster has them.
    use_gpu: Literal["auto", True, False] = "auto"
    cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    max_failures: int = 0


@dataclass
class RunSettings:
    # None: derived from stage and seed, e.g. "align-seed42"; stable so that a rerun resumes.
    name: str | None = None
    storage: str = "~/vistralv-runs"
    wandb: Literal["off", "offline", "online"] = "off"
    wandb_project: str = "vistralv-ray"
    wandb_group: str | None = None
    # A step progress bar from rank 0, drawn by the driver when it writes to a terminal.
    progress_bar: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    run: RunSettings = field(default_factory=RunSettings)

    @property
    def run_name(self) -> str:
        return self.run.name or f"{self.train.stage}-seed{self.train.seed}"

    @property
    def reference_batch(self) -> int:
        return self.train.reference_batch or REFERENCE_BATCH[self.train.stage]

    @property
    def global_batch(self) -> int:
        return self.scaling.workers * self.data.per_device_batch * self.train.grad_accum
