"""An estimate of a run's peak memory on its device, from the model's architecture alone (no weights loaded): what
`qlora check` prints before anyone rents a GPU.

It estimates what torch itself allocates (`torch.cuda.max_memory_allocated` on a GPU), as a sum of parts:

- weights: linear layers in NF4 (half a byte per weight, plus the block constants: one byte per 64 weights with
  double quantization, four without) or 8-bit; everything else (embeddings, norms, the head) in float32 once peft's
  `prepare_model_for_kbit_training` has upcast it, or in the compute dtype for an unquantized model;
- the LoRA matrices (float32), and a second copy of each module trained in full (peft's `modules_to_save`);
- gradients of the trainable parameters, and the optimizer's state (two float32 moments per parameter for 32-bit
  AdamW, two bytes for the 8-bit optimizers);
- activations kept for backward, counted tensor by tensor for one decoder layer (the residual stream in float32
  after k-bit preparation, projections in the compute dtype, LoRA's float32 dropout copy of each input) times the
  layers, or, with gradient checkpointing, one saved input per layer plus one layer recomputed (PyTorch's fused
  attention kernels keep no attention matrix, on CPU as on GPUs);
- a workspace: bitsandbytes dequantizes the largest quantized weight for its matmul.

What this leaves out: the CUDA context and allocator overhead (`CUDA_OVERHEAD_BYTES` and `FRAGMENTATION` are added
before the estimate is compared with a GPU's memory), and anything a library does that this list does not name.
scripts/check_memory_estimate.py measures each part on the tiny model on CPU and prints the ratios; the README says
which parts that checks and which it cannot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

CUDA_OVERHEAD_BYTES = 600 * 2**20  # CUDA context + cuBLAS workspace, outside torch's allocator; a common figure
FRAGMENTATION = 1.1  # torch reserves more than it allocates: the share added before comparing with a GPU's memory
LORA_PREFIX = "lora_"
SAVED_COPY = "modules_to_save"  # peft's trained copy of a module trained in full
NOT_QUANTIZED = ("score", "classifier", "pooler", "lm_head")  # heads, BERT's pooler, the LM head: kept in full


@dataclass(frozen=True)
class Architecture:
    """The dimensions the estimate reads from a transformers config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    decoder: bool  # Llama/Qwen-style (RMSNorm, SwiGLU, rotary) or BERT-style encoder (LayerNorm, GELU, dropouts)

    @classmethod
    def of(cls, config: Any, decoder: bool) -> Architecture:
        heads = int(config.num_attention_heads)
        hidden = int(config.hidden_size)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        return cls(
            layers=int(config.num_hidden_layers),
            hidden=hidden,
            intermediate=int(config.intermediate_size),
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=head_dim,
            vocab=int(config.vocab_size),
            decoder=decoder,
        )


@dataclass(frozen=True)
class Workload:
    """What runs: quantization, dtypes, batch, length, training settings."""

    quantization: str  # "4bit", "8bit" or "none"
    double_quant: bool
    compute_bytes: int  # 2 for bfloat16 / float16, 4 for float32
    device: str  # "cuda" or "cpu"
    batch: int
    length: int  # tokens of the longest batch (padded), at most max_length
    training: bool
    gradient_checkpointing: bool = False
    optimizer: str = "adamw_torch"
    lora_dropout: float = 0.0
    lm_label: bool = False


@dataclass
class Estimate:
    parts: dict[str, int] = field(default_factory=dict)  # bytes per part, in the order printed
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def needed_on_gpu(peak: int) -> int:
    """What a GPU must hold for a `peak` of torch allocations: with allocator headroom, plus the CUDA context."""
    return int(peak * FRAGMENTATION) + CUDA_OVERHEAD_BYTES


def quantized_linear_bytes(weights: int, out_features: int, quantization: str, double_quant: bool) -> int:
    """Bytes bitsandbytes holds for one quantized linear layer of `weights` weights."""
    if quantization == "8bit":
        return weights + 4 * out_features  # int8 weights + a float32 scale per row
    blocks = math.ceil(weights / 64)  # NF4 block size
    if double_quant:  # uint8 block constants, quantized in groups of 256 with float32 absmax + a 256-entry code
        return math.ceil(weights / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 * 16
    return math.ceil(weights / 2) + 4 * blocks + 4 * 16


def optimizer_bytes_per_parameter(name: str) -> int:
    if "8bit" in name:
        return 2  # two 8-bit moments (plus block constants, negligible)
    if name.startswith("sgd"):
        return 4  # momentum
    if "adafactor" in name:
        return 0  # factored second moments: small next to the rest
    return 8  # two float32 moments (AdamW, paged or not)


def weight_parts(model: Any, work: Workload) -> tuple[dict[str, int], list[Any], int]:
    """Bytes of quantized weights, other weights, LoRA and trained copies; the trainable parameters; and the size of
    the largest quantized weight (the dequantization workspace). `model` is built on the meta device (peft-wrapped
    for training): only shapes are read."""
    import torch

    quantized = work.quantization != "none"
    other_bytes = 4 if quantized else work.compute_bytes  # k-bit preparation upcasts every unquantized parameter
    in_linear: dict[int, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and quantized and _quantizable(name):
            in_linear[id(module.weight)] = module
    parts = {"weights_quantized": 0, "weights_other": 0, "lora": 0, "trained_copies": 0}
    trainable, largest = [], 0
    for name, param in model.named_parameters():
        count = param.numel()
        if param.requires_grad:
            trainable.append(param)
        if LORA_PREFIX in name:
            parts["lora"] += count * 4
        elif SAVED_COPY in name:
            parts["trained_copies"] += count * 4  # trained in float32 (training.lora.use_training_precision)
        elif id(param) in in_linear:
            module = in_linear[id(param)]
            parts["weights_quantized"] += quantized_linear_bytes(
                count, module.out_features, work.quantization, work.double_quant
            )
            largest = max(largest, count)
        else:
            parts["weights_other"] += count * other_bytes
    return parts, trainable, largest


def _quantizable(name: str) -> bool:
    """Linear layers bitsandbytes quantizes: all but the head, the pooler, the LM head and LoRA's own layers."""
    pieces = name.split(".")
    return not any(p in NOT_QUANTIZED or p.startswith(LORA_PREFIX) or p == SAVED_COPY for p in pieces)


def estimate(
    model: Any, arch: Architecture, work: Workload, targets: list[str] | None = None, rank: int = 0
) -> Estimate:
    """Peak bytes for `work` on a model of `arch` (`model` on the meta device). `targets`: the LoRA target modules'
    last names (their inputs add LoRA activations), `rank` the LoRA rank."""
    parts, trainable, largest = weight_parts(model, work)
    result = Estimate(dict(parts))
    tokens = work.batch * work.length
    if work.training:
        count = sum(p.numel() for p in trainable)
        result.parts["gradients"] = count * 4
        result.parts["optimizer_state"] = count * optimizer_bytes_per_parameter(work.optimizer)
        result.parts["activations"] = tokens * _training_activations_per_token(arch, work, targets or [], rank)
    else:
        result.parts["activations"] = tokens * _inference_activations_per_token(arch, work)
    result.parts["activations"] += _mask_and_outputs(arch, work)
    if work.quantization != "none":
        result.parts["dequantization_workspace"] = largest * work.compute_bytes * (2 if work.training else 1)
    return result


def _widths(arch: Architecture) -> tuple[int, int, int, int]:
    return arch.hidden, arch.intermediate, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim


# Activations kept in mixed precision (a 2-byte compute dtype under autocast) relative to the float32 inventory below:
# measured on the tiny model on CPU (bfloat16 autocast, the tensors autograd saves, scripts/check_memory_estimate.py).
# With k-bit quantization the residual stream stays float32 (peft upcasts the embeddings and bitsandbytes returns
# its input's dtype), so less is saved in 2 bytes than for an unquantized model.
MIXED_PRECISION_SHARE = {"quantized": 0.78, "none": 0.68}


def _layer_bytes(arch: Architecture, work: Workload, targets: list[str], rank: int) -> int:
    """Bytes per token one layer keeps for backward. The float32 inventory of a decoder layer, as autograd saves it
    (counted on the tiny Qwen3 model): each RMSNorm's input, normalized value and output (6 x hidden); q and k with
    their rotated halves, the rotated q and k, k and v repeated to every head, the attention output and its
    contiguous copy (5 x q width + 4 x kv width); gate, SiLU(gate), up and their product (4 x intermediate); the two
    norms' 1/rms. LoRA adds, per adapted layer, its dropout's float32 copy of the input and the rank-wide A output."""
    h, i, hq, hkv = _widths(arch)
    if arch.decoder:
        kept = 4 * (6 * h + 5 * hq + 4 * hkv + 4 * i + 2)
    else:  # BERT-style, not measured: q, k, v, context and its copy, dense output, LayerNorms, GELU in and out, masks
        kept = 4 * (5 * hq + 6 * h + 2 * i) + 3 * h + arch.heads * work.length
    widths = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": hq, "gate_proj": h, "up_proj": h, "down_proj": i}
    widths.update({"query": h, "key": h, "value": h, "dense": hq})
    for target in targets:
        kept += (4 * widths.get(target, h) if work.lora_dropout > 0 else 0) + 4 * rank
    if work.compute_bytes == 4:
        return kept
    return int(kept * MIXED_PRECISION_SHARE["quantized" if work.quantization != "none" else "none"])


def _training_activations_per_token(arch: Architecture, work: Workload, targets: list[str], rank: int) -> int:
    h, i, _, _ = _widths(arch)
    stream = 4 if work.quantization != "none" else work.compute_bytes
    layer = _layer_bytes(arch, work, targets, rank)
    transient = (2 * i + 2 * h) * work.compute_bytes  # gradients of one layer's activations in flight
    if work.gradient_checkpointing:  # each layer's input kept; one layer recomputed at a time in backward
        return arch.layers * h * stream + layer + transient
    return arch.layers * layer + transient


def _inference_activations_per_token(arch: Architecture, work: Workload) -> int:
    """One layer's tensors alive at once in a no-grad forward, plus the residual stream and the output."""
    h, i, hq, hkv = _widths(arch)
    c = work.compute_bytes
    return 3 * h * c + (hq + 2 * hkv + 3 * i) * c


def _mask_and_outputs(arch: Architecture, work: Workload) -> int:
    """The 4-D attention mask (one byte per pair), the final norm's output, and lm_label's logits at the last token."""
    mask = work.batch * work.length * work.length
    final = work.batch * work.length * arch.hidden * 4 * 2
    logits = work.batch * arch.vocab * 4 * 2 if work.lm_label else 0
    return mask + final + logits


def gib(count: int) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


# ---- measuring what the estimate predicts (scripts/check_memory_estimate.py, tests) ---------------------------


def measured_weight_parts(model: Any) -> dict[str, int]:
    """Bytes a loaded (peft-wrapped) model holds, in the estimate's parts: bitsandbytes' quantized weights with their
    quantization state, LoRA matrices, trained copies, and every other parameter and buffer."""
    import torch

    parts = {"weights_quantized": 0, "weights_other": 0, "lora": 0, "trained_copies": 0}
    quantized: set[int] = set()
    for module in model.modules():
        # bitsandbytes' layers only (peft's LoRA wrappers share the class names and hand out the same weight)
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt") and id(module.weight) not in quantized:
            weight = module.weight
            quantized.add(id(weight))
            tensors = [weight.data]
            state = getattr(weight, "quant_state", None)
            if state is not None:
                tensors += [state.absmax, state.code]
                if state.nested:
                    tensors += [state.state2.absmax, state.state2.code]
            tensors += [t for t in (getattr(weight, "SCB", None),) if isinstance(t, torch.Tensor)]
            parts["weights_quantized"] += sum(t.numel() * t.element_size() for t in tensors)
    for name, param in model.named_parameters():
        size = param.numel() * param.element_size()
        if id(param) in quantized:
            continue
        if LORA_PREFIX in name:
            parts["lora"] += size
        elif SAVED_COPY in name:
            parts["trained_copies"] += size
        else:
            parts["weights_other"] += size
    parts["weights_other"] += sum(b.numel() * b.element_size() for b in model.buffers())
    return parts


def measure_training_step(model: Any, inputs: dict[str, Any], labels: Any, logits_fn: Any, autocast: Any = None) -> int:
    """Peak bytes allocated on the CPU beyond the model's own weights during one training step (forward, loss,
    backward, a float32 AdamW step), from torch's profiler memory timeline: activations, temporaries, gradients and
    optimizer state, as `torch.cuda.max_memory_allocated` would count them on a GPU."""
    import contextlib
    import gzip
    import json
    import tempfile
    import warnings
    from pathlib import Path

    import torch
    from torch.profiler import ProfilerActivity, profile

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        with autocast or contextlib.nullcontext():
            logits = logits_fn(model, inputs)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the timeline export is deprecated in favour of CUDA's
        path = Path(folder) / "memory.raw.json.gz"
        prof.export_memory_timeline(str(path), device="cpu")
        events = json.loads(gzip.decompress(path.read_bytes()))
    live = peak = 0
    for _, action, size, _ in sorted(events, key=lambda event: event[0]):
        if action == 1:  # PREEXISTING: the weights and inputs, counted apart
            continue
        live += size  # CREATE (+), DESTROY and version changes (-)
        peak = max(peak, live)
    model.zero_grad(set_to_none=True)
    return peak
