"""The one typed config of the pipeline: a section per stage, loaded from YAML with dotted overrides.

Every field says what it does and what it trades. Unknown keys are errors (`extra="forbid"`) and
closed choices are Literals or StrEnums, so a misspelled knob or value fails at load time, naming the
key and the allowed values, instead of being silently ignored or failing deep inside a stage.
transformers and torch are never imported at module level: the CLI loads the config before them.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from finetune.core.errors import PermanentError


class ConfigError(PermanentError, ValueError):
    """A config file or override that cannot be used; the message names the key and what to do."""


# transformers OptimizerNames values that suit adapter training; tests/test_config.py checks each
# against transformers. Left out: optimizers that need extra packages (torchao, galore, apollo),
# extra arguments (lomo) or other accelerators (xla, npu).
Optimizer = Literal[
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "adafactor",
    "sgd",
    "lion_32bit",
    "lion_8bit",
    "paged_lion_32bit",
    "paged_lion_8bit",
]

# bitsandbytes optimizers that exist to save GPU memory, so a CPU run gets less than the name says:
# paging is CUDA unified memory (bitsandbytes 0.50 on a CPU silently runs unpaged), and its 8-bit
# AdamW step took ~4x adamw_torch's time on a CPU. lion_32bit is plain Lion and runs fine there.
CUDA_OPTIMIZERS = frozenset(
    {"adamw_8bit", "adamw_bnb_8bit", "paged_adamw_32bit", "paged_adamw_8bit"}
    | {"lion_8bit", "paged_lion_32bit", "paged_lion_8bit"}
)

# transformers SchedulerType values that take no scheduler_specific_kwargs.
Scheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)
    # Fields that change where a stage reports, never what it builds: left out of stage keys.
    not_in_key: ClassVar[frozenset[str]] = frozenset()


class LossOn(StrEnum):
    response = "response"  # loss on the response and EOS only; prompt tokens are masked
    full = "full"  # loss on the whole templated text, as the seed recipe did


class OverLength(StrEnum):
    reject = "reject"  # drop the example and list it with its file and line
    truncate = "truncate"  # cut the response to fit; the prompt is never cut


class Conflicts(StrEnum):
    reject = "reject"  # reject every row of the conflict, each naming the others' file:line
    keep_first = "keep_first"  # train on the first in file order, leave the others out (counted)
    keep_all = "keep_all"  # train on every response


class ComputeDtype(StrEnum):
    auto = "auto"  # bf16 where the hardware has it, fp16 on GPUs without bf16, else fp32
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class HalfDtype(StrEnum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class PathsConfig(Section):
    """Where things are. Paths are not part of any stage key: only the content they point to is."""

    raw_dir: Path | None = Field(
        Path("data/raw"),
        description="Folder of training pairs (see README: Data); read, never written. Not read when data.sources is set "
        "(list the folder there too to keep it); null with data.sources only.",
    )
    heldout_path: Path = Field(
        Path("data/eval/heldout.jsonl"),
        description="Held-out pairs used only for evaluation, never trained on.",
    )
    processed_dir: Path = Field(
        Path("data/processed"), description="Outputs of prepare and tokenize, one folder per stage key."
    )
    output_dir: Path = Field(
        Path("outputs"), description="Outputs of resolve_model, train, evaluate and merge, one folder per key."
    )
    runs_dir: Path = Field(Path("runs"), description="One record folder per flow run: run.json, config, reports.")
    models_dir: Path = Field(
        Path("models"),
        description="The champion: `champion` (a link to the promoted merged model) and `champion.json` (its "
        "record and the history of promotions). It points into output_dir: keep both on the same disk.",
    )


class DataSource(Section):
    """One place training pairs come from (an entry of data.sources): `url` or `dataset`."""

    url: str | None = Field(
        None,
        description="A folder of data files, read as paths.raw_dir is, or an object-storage prefix whose every object "
        "is a data file: s3://bucket/prefix (the .[s3] extra: s3fs), gs://bucket/prefix (gcsfs), az://container/prefix "
        "(adlfs). Objects are keyed by their ETags and sizes: an unchanged bucket is served from cache unread.",
    )
    dataset: str | None = Field(
        None,
        description="A dataset read through datasets.load_dataset: a hub id (owner/name; token from model.token_secret "
        "or HF_TOKEN) or a local dataset repository folder (data files and a README.md dataset card naming configs "
        "and splits). Keyed by the hub commit the revision resolves to, or the folder's content.",
    )
    name: str | None = Field(None, description="With dataset: its config name (the card's configs), if it has several.")
    split: str = Field("train", description="With dataset: the split to train on.")
    revision: str | None = Field(
        None, description="With a hub dataset: a branch, tag or commit; pin a commit so a retrain reads what it read."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="With an object-storage url: fsspec options that are not secrets, such as endpoint_url for an "
        "S3-compatible server or anon: true for a public bucket.",
    )
    credentials_secret: str | None = Field(
        None,
        description="With an object-storage url: a Prefect Secret block holding a JSON object of fsspec options (for "
        "S3: key and secret), merged into storage_options at run time; null: the machine's own credentials "
        "(AWS_ACCESS_KEY_ID and the like, or an instance role). Never logged, written or part of a key.",
    )

    @model_validator(mode="after")
    def _one_place(self) -> DataSource:
        if (self.url is None) == (self.dataset is None):
            raise ValueError("give either url (a folder or s3://, gs://, az:// prefix) or dataset (a hub id or a dataset folder)")
        return self


class DataConfig(Section):
    sources: list[DataSource] = Field(
        default_factory=list,
        description="Where the training pairs come from, read in order: folders, object-storage prefixes, datasets. "
        "Empty: paths.raw_dir alone. Not part of the prepare key as written: each source enters it by its content "
        "(folders' bytes, objects' ETags, a dataset's resolved commit).",
    )
    heldout_source: DataSource | None = Field(
        None,
        description="Held-out pairs from a source instead of paths.heldout_path: a folder, an object-storage prefix or "
        "a dataset's split (a hub dataset's test split, say), listed and keyed as data.sources are.",
    )
    topics: list[str] | None = Field(
        None,
        description="Allowed topics; rows with another topic (or none) are rejected. None accepts any topic, "
        "so data without a topic column works; a list catches mislabelled rows.",
    )
    min_chars: int = Field(
        1, ge=1, description="Shortest instruction or response kept, in characters after trim; higher drops stubs."
    )
    max_chars: int = Field(
        4000, ge=1, description="Longest instruction or response kept, in characters; longer rows are rejected."
    )
    max_reject_share: float = Field(
        0.05, ge=0, le=1, description="Fail the run if more than this share of rows is rejected: higher tolerates "
        "dirtier data, lower catches a wrong file or format sooner.",
    )
    min_rows: int = Field(16, ge=1, description="Fail the run if fewer training rows than this remain.")
    conflicts: Conflicts = Field(
        Conflicts.reject,
        description="Rows with the same instruction (case and spaces aside, after the same earlier turns) and "
        "different responses: reject names every place; keep_first trains on the first in file order; keep_all on "
        "all of them. The data report lists them either way.",
    )
    near_duplicate_similarity: float = Field(
        0.7, gt=0, le=1, description="Training instructions at least this similar to a held-out one (Jaccard "
        "similarity of their character 4-grams, case and spaces aside) are listed in the data report as possible "
        "leaks; lower lists more. Exact matches (case and spaces aside) are rejected whatever this is.",
    )
    exclude: list[str] = Field(
        [".*"],
        description="Name globs of files in paths.raw_dir that are not data (hidden files by default). Every other "
        "file must be readable, so that no data is left out without a word.",
    )

    not_in_key: ClassVar[frozenset[str]] = frozenset({"sources", "heldout_source"})

    @model_validator(mode="after")
    def _chars_in_order(self) -> DataConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(
                f"data.min_chars={self.min_chars} exceeds data.max_chars={self.max_chars}, which would reject "
                "every row; lower data.min_chars or raise data.max_chars"
            )
        return self


class TokenizeConfig(Section):
    template: str = Field(
        "### HUMAN:\n{instruction}\n\n### RESPONSE:\n",
        description="Prompt template; the response and the tokenizer's EOS follow it. Must contain {instruction}.",
    )
    max_length: int = Field(
        512, ge=8, description="Longest example in tokens; memory grows with it, shorter drops or cuts more examples."
    )
    overlength: OverLength = Field(
        OverLength.reject, description="reject: drop longer examples, listed by file:line; truncate: cut their response."
    )
    loss_on: LossOn = Field(
        LossOn.response, description="response: learn the answers only (default); full: the whole text (seed)."
    )

    @field_validator("template")
    @classmethod
    def _has_instruction(cls, value: str) -> str:
        if "{instruction}" not in value:
            raise ValueError("must contain the placeholder {instruction}")
        return value


class ModelConfig(Section):
    base: str = Field(
        "builtin:smollm2-135m-instruct",
        description="builtin:smollm2-135m-instruct (embedded, no hub), a hub id such as "
        "meta-llama/Llama-2-7b-chat-hf (token from HF_TOKEN), or a local model folder.",
    )
    revision: str | None = Field(
        None, description="Hub revision; pin a commit hash so a retrain cannot pick up a changed model."
    )
    token_secret: str | None = Field(
        None,
        description="Name of a Prefect Secret block holding the hub token (for gated models such as Llama 2), read "
        "by the worker at run time; None takes HF_TOKEN from the environment. The token is never logged or written.",
    )


class QuantConfig(Section):
    load_in_4bit: bool = Field(True, description="QLoRA: keep the frozen base in 4 bits. False trains plain LoRA.")
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4",
        description="nf4 (QLoRA paper): levels placed for normally distributed weights, lower error; "
        "fp4: plain 4-bit float, same memory, usually a little worse.",
    )
    double_quant: bool = Field(
        True, description="Quantize the quantization constants too: ~0.4 bit/param saved for a little compute."
    )
    compute_dtype: ComputeDtype = Field(
        ComputeDtype.auto,
        description="Dtype of the matmuls on dequantized weights: bf16 is fast and range-safe but needs Ampere+ "
        "on GPUs and bf16 instructions on CPUs (emulated, it is far slower than fp32), fp16 can overflow, fp32 is "
        "exact; auto picks from the hardware.",
    )


class LoraConfig(Section):
    r: int = Field(8, ge=1, description="Adapter rank: higher fits more, costs memory and overfits small data.")
    alpha: int = Field(
        32, ge=1, description="Scale of the update is alpha / r: larger learns faster, like a higher learning rate."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input; regularizes small data.")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Linear layers that get adapters; adding the MLP (gate/up/down_proj) fits more, costs more.",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none",
        description="Biases trained besides the adapters: none (QLoRA) keeps the base exact when the adapter is "
        "off; all or lora_only fit slightly more, but the adapter then also changes the base's biases.",
    )


class TrainConfig(Section):
    epochs: float = Field(3, gt=0, description="Passes over the training split: more fits closer, and overfits sooner.")
    batch_size: int = Field(1, ge=1, description="Examples per micro-batch; memory grows with it.")
    grad_accum: int = Field(4, ge=1, description="Micro-batches per optimizer step; effective batch = product.")
    learning_rate: float = Field(
        2e-4, gt=0, description="Peak learning rate of the adapters: higher learns faster, too high diverges (NaN loss)."
    )
    lr_scheduler: Scheduler = Field(
        "constant_with_warmup",
        description="Learning rate after warmup: constant_with_warmup (the seed's) keeps the peak, linear/cosine/"
        "polynomial decay it for a steadier end, inverse_sqrt decays slowly; constant has no warmup.",
    )
    warmup_ratio: float = Field(
        0.03, ge=0, lt=1, description="Share of the steps spent warming up: steadier start, fewer steps at the peak."
    )
    max_grad_norm: float = Field(0.3, gt=0, description="Gradient clipping; QLoRA's 0.3 keeps 4-bit training stable.")
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay on the adapters: regularizes, and shrinks what they learn."
    )
    optim: Optimizer = Field(
        "adamw_torch",
        description="transformers optimizer: adamw_torch runs anywhere; adamw_torch_fused is faster; *_8bit keep "
        "the state in 8 bits (~75% less memory); paged_* (the seed's paged_adamw_32bit) page it to CPU on memory "
        "spikes, and both need CUDA; adafactor and sgd keep less state but need "
        "more tuning; lion keeps one state and wants a ~3-10x lower learning rate.",
    )
    recipe: Literal["fast", "seed"] = Field(
        "fast",
        description="How each optimizer step is computed; both optimize the same thing (the same examples per step, "
        "the loss over the same tokens, the same steps). fast: one micro-batch of batch_size x grad_accum examples, "
        "no recomputation: packed in one row (attention kept inside each example), or on a CUDA GPU padded to one "
        "static shape and replayed as a CUDA graph; long examples are packed through the variable-length attention "
        "kernel where there is one (varlen_attention), else go one per micro-batch. seed: the seed "
        "recipe's loop as written, grad_accum padded micro-batches of batch_size, with gradient checkpointing.",
    )
    cuda_graphs: bool = Field(
        True,
        description="fast recipe on a CUDA GPU: capture the forward and backward once and replay them (short "
        "examples, one micro-batch per step); several times faster where kernel launches bound the step. false: "
        "eager steps (a model whose forward cannot be captured also falls back to them, with a warning).",
    )
    varlen_attention: bool = Field(
        True,
        description="fast recipe on a CUDA GPU with torch 2.10+ in bf16 or fp16: a step's examples are packed end to "
        "end in rows of up to max_row_tokens, attention kept inside each example by torch's variable-length kernel "
        "(memory grows with the tokens, not their square); long examples then train about twice as fast as one "
        "per micro-batch. false: packed rows only where they are short, through a block-diagonal mask.",
    )
    max_row_tokens: int = Field(
        8192,
        ge=512,
        description="With varlen_attention: the most tokens packed in one row; a step's examples go in as few rows as "
        "divide them evenly within it. Activation memory grows with it (7B shape, no checkpointing: about 55 GiB at "
        "8,192 tokens), fewer rows are faster: lower it to fit a smaller GPU. Not part of the train key: the steps "
        "and the loss are the same, only how a step is split.",
    )
    fused_kernels: bool = Field(
        False,
        description="On a CUDA GPU: Liger-Kernel's fused Triton kernels for RMSNorm, rotary embeddings and the SwiGLU "
        "MLP (the .[fused] extra installs liger-kernel), through the Trainer's use_liger_kernel. Less memory for "
        "activations and fewer kernel launches; the same steps and loss up to rounding. Ignored on the CPU.",
    )
    dequantized_base: bool = Field(
        False,
        description="On a CUDA GPU: dequantize the frozen 4-bit base once into the compute dtype after loading, "
        "instead of at every forward and backward (what bitsandbytes does for a batch of rows): the same computation up "
        "to rounding, 1.19x the long workload's tokens/s on an H200 (7B shape), and the frozen weights in 16-bit "
        "memory (13.5 GB for a 7B model against 3.9). An opt-in trade of memory for speed; ignored on the CPU and "
        "without quant.load_in_4bit.",
    )
    compiled_layers: bool | Literal["auto"] = Field(
        "auto",
        description="On a CUDA GPU, eager steps (not cuda_graphs' replays): compile the decoder layers but the first "
        "with torch.compile, one graph a layer with the attention kernel inside, fusing the norms, rotary embeddings, "
        "activation, dropout and residuals into fewer kernels. Compiling takes the first two steps (counted in the "
        "run's time; the compiler caches it on disk for later runs). The same steps and loss up to rounding. Measured "
        "on an H200 (7B shape, the long workload's 500 steps, the defaults): 13,775 tokens/s (38.2% MFU) at 35.4 GiB "
        "against the eager step's 9,342 at 62.7, 16.8 s of it compiling (README: Training speed). auto: on for the fast recipe "
        "without gradient_checkpointing on a CUDA GPU where Triton and a C compiler are installed, else off (decided "
        "before the run, and the train key holds the decision). true: stop before any stage where they are missing.",
    )
    activation_memory_budget: float = Field(
        0.9,
        gt=0,
        le=1,
        description="With compiled_layers: the share of the activations the compiler would keep for the backward pass "
        "that it may keep (torch.compile's activation_memory_budget); below 1 it recomputes the cheapest of the rest "
        "in the backward. Measured on an H200 (7B shape, the long workload's 500 steps): 0.9 took the peak from 42.7 "
        "GiB (at 1.0) to 35.4 at about 0.96x the steady tokens/s. With cuda_graphs false and no "
        "gradient_checkpointing, 0.05 is a faster low-memory mode: on the seed workload 5.0-5.5x the seed loop at "
        "1.03x its peak (compiler cache warm), against 3.5x for gradient_checkpointing. "
        "Not part of the train key: the same computation.",
    )
    data_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="Processes that collate the next micro-batches while the GPU computes (the Trainer's "
        "dataloader_num_workers), into pinned memory copied without waiting: the GPU does not sit idle while the host "
        "lays out the next rows. auto: 2 for the fast recipe on a CUDA GPU, 0 (collated in the training process) on "
        "the CPU, where workers would take cores from the computation, and for the seed recipe, which keeps the "
        "seed's loop. Not part of the train key: the same batches.",
    )
    gradient_checkpointing: bool | None = Field(
        None,
        description="Recompute activations in the backward pass: less memory, slower. null: the recipe's own (seed: "
        "on, fast: off); true with recipe fast is the low-memory mode for small GPUs.",
    )
    num_gpus: int | Literal["auto"] = Field(
        1,
        description="GPUs of this machine to train on, as data-parallel ranks started by accelerate launch (each "
        "holds its own 4-bit base); auto: all it has. The global batch and the steps stay batch_size x grad_accum "
        "and the config's, so batch_size x grad_accum must divide among them. Not part of the train key.",
    )
    save_every_steps: int = Field(
        13, ge=1, description="Checkpoint interval in optimizer steps: a crash loses at most this many "
        "(13 steps: under a minute of the default run on a 2-core CPU). Each save costs a little time and disk.",
    )
    save_total_limit: int = Field(
        3, ge=2, description="Checkpoints kept, older ones deleted; at least 2, so a damaged newest has a fallback."
    )
    seed: int = Field(42, description="Seeds data order, dropout and adapter init; change it to measure run-to-run noise.")
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="Experiment trackers the trainer also logs to (install the extra of the same name): tensorboard "
        "writes under outputs/train/<key>.checkpoints/runs/, mlflow to MLFLOW_TRACKING_URI (./mlruns by default). "
        "Not part of the train key: turning it on does not retrain, and a cached train stage logs nothing new.",
    )

    not_in_key: ClassVar[frozenset[str]] = frozenset(
        {"report_to", "num_gpus", "max_row_tokens", "activation_memory_budget", "data_workers"}
    )

    @model_validator(mode="after")
    def _warmup_is_used(self) -> TrainConfig:
        # transformers' get_scheduler drops num_warmup_steps for "constant" without a word.
        if self.lr_scheduler == "constant" and self.warmup_ratio > 0:
            raise ValueError(
                f"train.warmup_ratio={self.warmup_ratio} is ignored by train.lr_scheduler=constant; "
                "use constant_with_warmup, or set train.warmup_ratio=0"
            )
        return self


class EvalConfig(Section):
    max_new_tokens: int = Field(
        96, ge=1, description="Generation limit per held-out prompt; an answer still going at it fails format."
    )
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Prompts generated together: larger is faster (32 vs 8 halved evaluate on a 2-core CPU); "
        "memory grows with it. auto: 32 on a CPU; on a GPU as many as the model's cache and logits for the longest "
        "held-out example fit in 30% of the GPU's memory (at most 512).",
    )
    bootstrap_samples: int = Field(
        2000, ge=100, description="Bootstrap draws behind each 95% interval of a base-to-tuned difference: more "
        "steadies the interval's ends, costs milliseconds.",
    )
    seed: int = Field(0, description="Seed of the bootstrap draws: the same seed gives the same intervals on a rerun.")


class MergeConfig(Section):
    dtype: HalfDtype = Field(
        HalfDtype.bfloat16,
        description="Precision the base is loaded in and the merged model saved in: bfloat16 and float16 halve "
        "the size of float32; bfloat16 keeps float32's range but needs Ampere+ on GPUs, float16 can overflow.",
    )
    parity_max_new_tokens: int = Field(
        32, ge=1, description="Tokens of base+adapter's greedy answer to each held-out prompt on which the merge "
        "check compares the merged model's logits: more catches later drift, costs generation time.",
    )


class ExportConfig(Section):
    gguf: list[Literal["f32", "f16", "bf16", "q8_0"]] = Field(
        [],
        description="GGUF files of the merged model for llama.cpp / Ollama / LM Studio, one per type, each read back "
        "and checked; the Modelfile uses the first. [] (default) exports nothing. bf16 keeps the merged weights "
        "(about 2 bytes a parameter), q8_0 about half of that. Needs the `export` extra.",
    )
    min_token_agreement: float = Field(
        0.95, gt=0, le=1, description="Share of next-token predictions (teacher-forced on the merged model's held-out "
        "answers) on which a file must agree with the merged model when its type rounds the merged weights (q8_0; "
        "bf16 of a float32 merge); a type that holds them exactly (bf16 of a bfloat16 merge, f32) must agree on all.",
    )
    check_max_new_tokens: int = Field(
        48, ge=1, description="Length of the merged model's greedy held-out answers that the check compares against.",
    )


class PromoteConfig(Section):
    rule: Literal["interval", "point"] = Field(
        "interval", description="How a candidate beats the champion on the same held-out prompts. interval: the "
        "paired 95% interval of its loss gain (champion - candidate, per response token, bootstrap over prompts) "
        "lies above promote.min_loss_gain, and its format adherence is not clearly lower (Newcombe's interval "
        "of the paired difference not wholly below 0): a gain inside the noise keeps the champion. point: the "
        "gain itself reaches min_loss_gain and format adherence is not lower.",
    )
    min_loss_gain: float = Field(
        0.0,
        ge=0,
        description="The margin (nats per response token) the loss gain must clear: its interval's lower end "
        "must be above it (rule interval), or the gain must reach it (rule point). 0 with the interval rule: "
        "promote any improvement the held-out set shows clearly.",
    )


class FinetuneConfig(Section):
    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    model: ModelConfig = ModelConfig()
    quant: QuantConfig = QuantConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    merge: MergeConfig = MergeConfig()
    export: ExportConfig = ExportConfig()
    promote: PromoteConfig = PromoteConfig()


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.learning_rate=1e-4` -> ("train.learning_rate", 1e-4); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set lora.r=16")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    tree: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from error
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data:, train:, ...) at the top")
        tree = loaded or {}
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    try:
        return FinetuneConfig.model_validate(tree)
    except ValidationError as error:
        source = str(path) if path is not None else "config"
        lines = []
        for item in error.errors():
            key = ".".join(str(p) for p in item["loc"])
            message = "unknown key (check the spelling; see configs/default.yaml)" if item["type"] == "extra_forbidden" else item["msg"]
            lines.append(f"{source}: {key}: {message}")
        raise ConfigError("\n".join(lines)) from None


def dump_config(config: FinetuneConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
