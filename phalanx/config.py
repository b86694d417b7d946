"""Configuration: OmegaConf structured dataclasses, YAML files plus dotlist overrides.

`load_config(path, overrides)` merges a YAML file and `section.key=value` overrides onto the
schema below in struct mode; `validate_fields(cfg, world_size, model_kinds)` checks every value and
cross-field rule and raises `ConfigError` with a one-line message that quotes the values and the fix
(`phalanx.parallel.validate` is the whole check: these, the model kind and the parallel strategies).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from phalanx import hfconfig
from phalanx.errors import ConfigError
from phalanx.faults import parse_faults


@dataclass
class RunConfig:
    name: str = "default"
    dir: str = "runs"  # the run lives in {dir}/{name}
    seed: int = 0
    resume: bool = True  # relaunching the same command continues from the newest checkpoint
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class MoEConfig:
    """Mixture-of-experts MLPs (`phalanx/models/moe.py`); num_experts=0 keeps every block dense."""

    num_experts: int = 0
    top_k: int = 2
    every_n_layers: int = 1  # block i is MoE when (i + 1) % every_n_layers == 0
    ffn_dim: Optional[int] = None  # each expert's SwiGLU hidden size; None: the dense ffn_dim
    capacity_factor: Optional[float] = None  # None: dropless; else tokens per expert per sequence = cf * T * k / E
    score: str = "softmax"  # softmax | sigmoid (DeepSeek-V3: top-k weights renormalised)
    norm_topk: bool = True  # softmax: renormalise the top-k weights to sum to 1 (Mixtral)
    aux_loss_coef: float = 0.01  # load balancing, Switch/GShard form, per sequence
    z_loss_coef: float = 0.001  # router z-loss (ST-MoE)
    shared_expert: bool = False  # a dense SwiGLU every token also passes through (DeepSeek-MoE)
    kernel: str = "auto"  # auto | grouped_mm | loop: how the experts' matmuls run


@dataclass
class ModelConfig:
    kind: str = "gpt"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: as many as n_heads (MHA); fewer: GQA / MQA
    ffn_dim: Optional[int] = None  # None: SwiGLU's 8/3 * d_model rounded up to multiple_of
    multiple_of: int = 32
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # hf:DIR: a Hugging Face Llama-family model (config.json + *.safetensors) fills this section and the weights
    # of a run that starts fresh (phalanx/hfconfig.py); a resumed run loads its own checkpoint
    init_from: Optional[str] = None
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class DataConfig:
    kind: str = "synthetic"  # synthetic | memmap
    path: Optional[str] = None  # memmap: a `phalanx data prepare` folder (or its index.json), or a .bin of tokens
    dtype: str = "auto"  # memmap token dtype: auto (from index.json or the .json beside the .bin) | uint16 | uint32
    seq_len: int = 128
    val_fraction: float = 0.05  # memmap: trailing share of tokens held out for eval
    noise: float = 0.1  # synthetic: probability that a token breaks the learnable chain


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    implementation: str = "auto"  # auto | fused | foreach | loop


# train.activation_checkpointing: none | full (every block recomputed in backward) | selective (every other block)
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 16  # global: sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8  # sequences per rank per forward; the rest is gradient accumulation
    dtype: str = "fp32"  # fp32 | bf16 (autocast; parameters and optimizer stay fp32)
    compile: bool = False
    activation_checkpointing: str = "none"  # one of ACTIVATION_CHECKPOINTING
    eval_every: int = 0  # 0: no periodic eval
    eval_batches: int = 4


@dataclass
class ParallelConfig:
    dp: Any = "auto"  # an int, or auto: the world size divided by the other degrees
    sp: int = 1
    ep: int = 1  # experts sharded over ep ranks of dp x sp (needs model.moe.num_experts > 0)
    pp: int = 1
    dp_backend: str = "ddp"  # ddp | fsdp | zero
    zero_stage: int = 1  # dp_backend=zero: 1 optimizer state, 2 + gradients, 3 + parameters partitioned
    sp_backend: str = "ulysses"
    ep_backend: str = "alltoall"
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved (interleaved 1F1B, pp_virtual_stages per rank)
    pp_virtual_stages: int = 2  # model chunks per rank under pp_schedule=interleaved
    pp_split: Optional[list[int]] = None  # blocks per stage (pp, or pp * pp_virtual_stages entries); None: balanced
    microbatches: Any = "auto"  # pipeline micro-batches per schedule run; auto: all of a rank's micro-batches
    comm_stats: bool = False  # count bytes and time of every collective per step (phalanx/telemetry/comm.py)
    memory_check: bool = True  # refuse, before any process group, a layout the planner predicts will not fit
    order: str = "pp,dp,sp"  # rank order, outermost first (ranks numbered node by node); auto: `phalanx plan`'s placement


@dataclass
class CheckpointConfig:
    """In-memory snapshots held by a keeper process per node, erasure-coded across nodes, persisted lazily."""

    snapshot_every: int = 1  # steps between in-memory snapshots; 0: only at persist steps
    persist_every: int = 50  # steps between persistent checkpoints (written by the keepers); 0: only at the end
    keep_last: int = 3  # persistent checkpoints kept (>= 2, so a verified one survives the next write); 0 keeps all
    storage: str = ""  # any fsspec URL (s3://..., gs://..., a path); "": {run.dir}/{run.name}/checkpoints
    erasure_k: int = 2  # data blocks per erasure group, on k distinct nodes
    erasure_m: int = 1  # parity blocks per group, on m other nodes; any m lost nodes are rebuilt; 0: no coding
    simulate_nodes: int = 0  # tests and demos: ranks in this many contiguous blocks, one keeper each
    keeper_host: str = "auto"  # address keepers bind; auto: loopback for a local run, else the route to MASTER_ADDR
    keeper_dir: str = ""  # keeper memory and discovery files; "": /dev/shm/phalanx-UID (tmpfs)
    # a keeper a trainer started (torchrun) frees its memory and exits after this long without a trainer;
    # `phalanx ray` holds its nodes' keepers for the whole run (a replacement node may take longer)
    keeper_linger_s: float = 600.0
    # Persisted manifests are signed with a key derived from the run's secret, and a checkpoint not signed by it
    # is refused (README, "Threat model"). The secret: PHALANX_RUN_SECRET, else key_file, else the run folder's.
    sign: bool = True
    key_file: str = ""  # a file holding the run's secret as hex (shared by machines that resume the run)


@dataclass
class FaultConfig:
    """Failure detection and recovery (the Ray controller, `phalanx ray`) and fault injection."""

    collective_timeout_s: float = 300.0  # bound on every torch.distributed wait; a longer one is a hang
    heartbeat_s: float = 1.0  # how often the controller asks every worker where it is
    straggler_factor: float = 2.0  # a rank busier than the median by this factor ...
    straggler_steps: int = 3  # ... for this many steps in a row is reported as a straggler
    max_restarts: int = 3  # recoveries before the controller gives up (naming the newest usable checkpoint)
    wait_for_nodes_s: float = 60.0  # after a node loss, how long to wait for resources for its workers
    # Elastic `phalanx ray`: workers that find no room within wait_for_nodes_s do not end the run; it goes on
    # with fewer (at least min_workers) on the layout the planner ranks best for them (same data-parallel back
    # end, train.batch_size kept), its state resharded from the keepers' memory, and grows back to --workers
    # once Ray has room again.
    elastic: bool = False
    min_workers: int = 1
    # the layouts it may go on as, by the names `phalanx plan` and resize events print ("dp2 ddp mb1"); [] = any
    elastic_layouts: list[str] = field(default_factory=list)
    # Tests and demos: "kill:rank=1:step=5", "hang:rank=1:step=5" (blocks before its next collective),
    # "slow:rank=1:step=3:factor=3" (every step from then on), "node:node=1:step=5" (controller: the node's
    # keeper and workers die), "kill_restoring:rank=0:step=5" (killed while restoring step 5 or later: a failure
    # during recovery). Each fires once per run. A random schedule, "random:kill_per_min=2:node_per_min=1:seed=0":
    # kills of one rank and node losses (as "node") fired by the controller, each a Poisson process in wall time
    # from the run's first step on (recoveries included), times and victims drawn from the seed; set max_restarts
    # above the faults the run will meet.
    inject: list[str] = field(default_factory=list)


@dataclass
class LogConfig:
    every: int = 1  # steps between metric lines
    progress: str = "auto"  # auto (bar on a TTY, lines otherwise) | bar | lines | none
    wandb: str = "offline"  # disabled | offline | online
    wandb_project: str = "phalanx"


@dataclass
class PhalanxConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.run.dir, self.run.name)


# ---------------------------------------------------------------------------------------------
# Loading


def _section_type(path: list[str]) -> Any:
    """The dataclass type at a dotted path of the schema, or None."""
    typ: Any = PhalanxConfig
    for part in path:
        fields = {f.name: f for f in dataclasses.fields(typ)} if dataclasses.is_dataclass(typ) else {}
        if part not in fields:
            return None
        typ = fields[part].type
        typ = globals().get(typ, typ) if isinstance(typ, str) else typ
    return typ if dataclasses.is_dataclass(typ) else None


def _unknown_key_error(full_key: str) -> ConfigError:
    parts = full_key.split(".")
    parent = _section_type(parts[:-1])
    names = [f.name for f in dataclasses.fields(parent)] if parent else []
    prefix = ".".join(parts[:-1])
    close = difflib.get_close_matches(parts[-1], names, n=1, cutoff=0.5)
    if close:
        fix = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'?"
    else:
        fix = f"valid keys{' in ' + prefix if prefix else ''}: {', '.join(names)}"
    return ConfigError(f"unknown config key '{full_key}'; {fix}")


def _omegaconf_error(err: OmegaConfBaseException, source: str) -> ConfigError:
    full_key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    if isinstance(err, ConfigKeyError):
        return _unknown_key_error(str(full_key))
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, ValidationError):
        return ConfigError(f"{full_key}: {msg} (in {source}); give a value of the right type")
    return ConfigError(f"{full_key}: {msg} (in {source})")


def _read_yaml(path: str) -> DictConfig:
    if not os.path.exists(path):
        raise ConfigError(f"config file '{path}' does not exist; pass the path of a YAML file such as configs/tiny.yaml")
    if os.path.isdir(path):
        raise ConfigError(f"config file '{path}' is a directory; pass the path of a YAML file inside it")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends: report where
        first = " ".join(str(err).split())
        raise ConfigError(f"config file '{path}' is not valid YAML: {first}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (run:, model:, ...), not a list")
    return loaded


def _read_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form section.key=value (e.g. train.steps=100)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"could not parse overrides {overrides}: {str(err).splitlines()[0]}") from None


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> PhalanxConfig:
    """Schema defaults <- YAML file <- dotlist overrides, in struct mode, as a `PhalanxConfig`."""
    schema = OmegaConf.structured(PhalanxConfig)
    OmegaConf.set_struct(schema, True)
    merged = schema
    layers = []
    if path is not None:
        layers.append((_read_yaml(path), f"'{path}'"))
    if overrides:
        layers.append((_read_overrides(overrides), "the command-line overrides"))
    for layer, source in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            raise _omegaconf_error(err, source) from None
    if merged.model.init_from:
        merged = _from_hf(merged, layers)
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, "the config") from None
    assert isinstance(cfg, PhalanxConfig)
    return cfg


def _from_hf(merged: DictConfig, layers: list[tuple[DictConfig, str]]) -> DictConfig:
    """The model section filled from `model.init_from`'s config.json; keys the YAML or overrides set must agree."""
    path = hfconfig.folder(merged.model.init_from)
    user_layers = [OmegaConf.to_container(layer.model) for layer, _ in layers if layer.get("model")]
    model = OmegaConf.to_container(merged.model)
    filled = hfconfig.merge(model, user_layers, path, merged.data.seq_len)
    return OmegaConf.merge(merged, {"model": filled})


def to_yaml(cfg: PhalanxConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ---------------------------------------------------------------------------------------------
# Validation


def _one_of(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}; {hint}".rstrip("; ").rstrip())


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    bad = value < 0 if allow_zero else value <= 0
    if bad or (isinstance(value, float) and not math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value} must be {bound}")


def resolve_dp(cfg: PhalanxConfig, world_size: int) -> int:
    """`parallel.dp`, with `auto` filled from the world size and the other degrees."""
    dp = cfg.parallel.dp
    if dp == "auto":
        inner = cfg.parallel.pp * cfg.parallel.sp
        if inner <= 0 or world_size % inner:
            raise ConfigError(
                f"parallel.dp=auto: WORLD_SIZE({world_size}) is not divisible by pp({cfg.parallel.pp}) * "
                f"sp({cfg.parallel.sp}) = {inner}; change pp or sp, or launch a multiple of {inner} processes"
            )
        return world_size // inner
    if isinstance(dp, bool) or not isinstance(dp, int):
        try:
            dp = int(str(dp))
        except ValueError:
            raise ConfigError(f"parallel.dp={dp!r} must be a positive integer or auto") from None
    if dp < 1:
        raise ConfigError(f"parallel.dp={dp} must be a positive integer or auto")
    return dp


def _validate_moe(moe: MoEConfig, n_layers: int) -> None:
    _positive("model.moe.num_experts", moe.num_experts, allow_zero=True)
    if not moe.num_experts:
        return
    if not 1 <= moe.top_k <= moe.num_experts:
        raise ConfigError(f"model.moe.top_k={moe.top_k} must be between 1 and model.moe.num_experts({moe.num_experts})")
    if not 1 <= moe.every_n_layers <= n_layers:
        raise ConfigError(f"model.moe.every_n_layers={moe.every_n_layers} must be between 1 and "
                          f"model.n_layers({n_layers}), or no block would be MoE")
    if moe.ffn_dim is not None:
        _positive("model.moe.ffn_dim", moe.ffn_dim)
    if moe.capacity_factor is not None:
        _positive("model.moe.capacity_factor", moe.capacity_factor)
    _one_of("model.moe.score", moe.score, ("softmax", "sigmoid"))
    _positive("model.moe.aux_loss_coef", moe.aux_loss_coef, allow_zero=True)
    _positive("model.moe.z_loss_coef", moe.z_loss_coef, allow_zero=True)
    _one_of("model.moe.kernel", moe.kernel, ("auto", "grouped_mm", "loop"))


def validate_fields(cfg: PhalanxConfig, world_size: int, model_kinds: tuple[str, ...]) -> int:
    """Check every field and cross-field rule that needs no registry; returns the resolved `parallel.dp`.
    Raises ConfigError. `phalanx.parallel.validate` adds the model and strategy registries' checks and the
    layout's (degrees against the world size, `parallel.order`)."""
    r, m, d, o, t, p = cfg.run, cfg.model, cfg.data, cfg.optim, cfg.train, cfg.parallel
    if not r.name or "/" in r.name or r.name in (".", ".."):
        raise ConfigError(f"run.name={r.name!r} must be a plain directory name such as 'tiny'")
    _one_of("run.device", r.device, ("auto", "cpu", "cuda"))

    _one_of("model.kind", m.kind, tuple(sorted(model_kinds)))
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "multiple_of"):
        _positive(f"model.{key}", getattr(m, key))
    if m.d_model % m.n_heads:
        raise ConfigError(
            f"model.d_model({m.d_model}) is not divisible by model.n_heads({m.n_heads}); "
            f"choose n_heads dividing {m.d_model}"
        )
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(
            f"head dim model.d_model/n_heads = {m.d_model // m.n_heads} must be even for RoPE; change d_model or n_heads"
        )
    kv = m.n_kv_heads if m.n_kv_heads is not None else m.n_heads
    if kv < 1 or m.n_heads % kv:
        raise ConfigError(
            f"model.n_heads({m.n_heads}) is not divisible by model.n_kv_heads({kv}); "
            f"set n_kv_heads to a divisor of {m.n_heads}"
        )
    if m.ffn_dim is not None:
        _positive("model.ffn_dim", m.ffn_dim)
    _positive("model.rope_theta", m.rope_theta)
    _positive("model.norm_eps", m.norm_eps)
    _positive("model.init_std", m.init_std)
    _validate_moe(m.moe, m.n_layers)

    _one_of("data.kind", d.kind, ("synthetic", "memmap"))
    _positive("data.seq_len", d.seq_len)
    if d.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len({d.seq_len}) exceeds model.max_seq_len({m.max_seq_len}); "
            f"lower data.seq_len or raise model.max_seq_len"
        )
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in [0, 1)")
    if not 0.0 <= d.noise <= 1.0:
        raise ConfigError(f"data.noise={d.noise} must be in [0, 1]")
    _one_of("data.dtype", d.dtype, ("auto", "uint16", "uint32"))
    if d.kind == "memmap":
        if not d.path:
            raise ConfigError("data.kind=memmap needs data.path, a folder made by `phalanx data prepare INPUT... "
                              "--out DIR` (or a .bin of tokens)")
        if os.path.isdir(d.path) and not os.path.isfile(os.path.join(d.path, "index.json")):
            raise ConfigError(f"data.path='{d.path}' has no index.json; prepare it with `phalanx data prepare "
                              f"INPUT... --out {d.path}` (an interrupted prepare resumes when rerun)")
        if not os.path.exists(d.path):
            raise ConfigError(
                f"data.path='{d.path}' does not exist; create it with `phalanx data prepare INPUT... --out {d.path}`"
            )

    _positive("optim.lr", o.lr)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.eps", o.eps)
    _positive("optim.grad_clip", o.grad_clip, allow_zero=True)
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            raise ConfigError(f"optim.{key}={getattr(o, key)} must be in [0, 1)")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    _one_of("optim.schedule", o.schedule, ("cosine", "linear", "constant"))
    _one_of("optim.implementation", o.implementation, ("auto", "fused", "foreach", "loop"))

    _positive("train.steps", t.steps)
    _positive("train.batch_size", t.batch_size)
    _positive("train.micro_batch_size", t.micro_batch_size)
    _positive("train.eval_every", t.eval_every, allow_zero=True)
    _positive("train.eval_batches", t.eval_batches)
    _one_of("train.dtype", t.dtype, ("fp32", "bf16"))
    _one_of("train.activation_checkpointing", t.activation_checkpointing, ACTIVATION_CHECKPOINTING)

    for key in ("sp", "ep", "pp"):
        _positive(f"parallel.{key}", getattr(p, key))
    dp = resolve_dp(cfg, world_size)
    per_step = t.micro_batch_size * dp
    if t.batch_size % per_step:
        # the nearest choices: a micro-batch that keeps the global batch (and so a resumed run's trajectory),
        # else the nearest global batches (an explicit change of what each step trains on)
        keep = [m for m in range(t.micro_batch_size, 0, -1) if t.batch_size % (m * dp) == 0][:1]
        lower, upper = (t.batch_size // per_step) * per_step, (t.batch_size // per_step + 1) * per_step
        batches = " or ".join(str(b) for b in (lower, upper) if b > 0)
        raise ConfigError(
            f"train.batch_size({t.batch_size}) is not divisible by train.micro_batch_size({t.micro_batch_size}) * "
            f"dp({dp}) = {per_step}; "
            + (f"set train.micro_batch_size={keep[0]} to keep the batch, or " if keep else "")
            + f"set train.batch_size to a multiple of {per_step} (e.g. {batches})"
        )

    _positive("checkpoint.persist_every", cfg.checkpoint.persist_every, allow_zero=True)
    _positive("checkpoint.keep_last", cfg.checkpoint.keep_last, allow_zero=True)
    c = cfg.checkpoint
    if c.keep_last == 1:
        raise ConfigError("checkpoint.keep_last=1 would delete the only verified checkpoint as soon as the next one "
                          "is written; set checkpoint.keep_last=2 or more (0 keeps all)")
    _positive("checkpoint.snapshot_every", c.snapshot_every, allow_zero=True)
    _positive("checkpoint.erasure_k", c.erasure_k)
    _positive("checkpoint.erasure_m", c.erasure_m, allow_zero=True)
    if c.erasure_k + c.erasure_m > 256:
        raise ConfigError(f"checkpoint.erasure_k({c.erasure_k}) + checkpoint.erasure_m({c.erasure_m}) > 256, the "
                          f"most GF(2^8) Reed-Solomon can code; use smaller groups")
    _positive("checkpoint.simulate_nodes", c.simulate_nodes, allow_zero=True)
    if c.simulate_nodes > world_size:
        raise ConfigError(f"checkpoint.simulate_nodes({c.simulate_nodes}) > WORLD_SIZE({world_size}): every "
                          f"simulated node needs a rank; use at most {world_size}")
    _positive("checkpoint.keeper_linger_s", c.keeper_linger_s)
    _positive("fault.collective_timeout_s", cfg.fault.collective_timeout_s)
    _positive("fault.heartbeat_s", cfg.fault.heartbeat_s)
    _positive("fault.straggler_steps", cfg.fault.straggler_steps)
    _positive("fault.max_restarts", cfg.fault.max_restarts, allow_zero=True)
    _positive("fault.wait_for_nodes_s", cfg.fault.wait_for_nodes_s, allow_zero=True)
    _positive("fault.min_workers", cfg.fault.min_workers)
    if cfg.fault.elastic_layouts and not cfg.fault.elastic:
        raise ConfigError(f"fault.elastic_layouts={list(cfg.fault.elastic_layouts)} is set but fault.elastic=false: "
                          f"set fault.elastic=true, or drop the layouts")
    if cfg.fault.straggler_factor <= 1:
        raise ConfigError(f"fault.straggler_factor={cfg.fault.straggler_factor} must be > 1 (how many times the "
                          f"median busy time makes a straggler), e.g. 2.0")
    parse_faults(list(cfg.fault.inject))
    _positive("log.every", cfg.log.every)
    _one_of("log.progress", cfg.log.progress, ("auto", "bar", "lines", "none"))
    _one_of("log.wandb", cfg.log.wandb, ("disabled", "offline", "online"))
    return dp
