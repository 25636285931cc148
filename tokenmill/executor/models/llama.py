"""The Llama-family decoder: Llama 2/3, Mistral, Qwen2 (QKV bias), Qwen3 (q/k norm), SmolLM.

Written for one flat batch of tokens (no padding, no batch axis): [tokens, hidden] in,
[tokens, hidden] out, with attention reading the paged KV cache. Q/K/V and gate/up are
each one fused matmul. Weight names follow Hugging Face's, so HF and GGUF checkpoints
(renamed by the loader) load through the same `load_weights`. The output projection is
always its own layer, also when the checkpoint ties it to the embedding: the copy costs
vocab x hidden values and makes batch-1 logits about twice as fast on CPU. With quantized
weights (`quant`) every projection is int8 or int4 except the output one, which is int8 in
both cases (see LM_HEAD_QUANT); the embedding and the norms stay float.

Under tensor parallelism (`tp`) the model is one rank's share, built from the config of that
share (ModelConfig.tensor_parallel_share): Q/K/V and gate/up hold their heads' and columns'
output rows (column-parallel), O and down the matching inputs (row-parallel, their outputs summed
over ranks by an all-reduce), the embedding and the output head their part of the vocabulary
(the logits gathered from every rank). `load_weights` cuts each checkpoint tensor to this rank's
part as it arrives.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import ModelConfig, WeightQuant
from tokenmill.executor.kernels import lowbit
from tokenmill.executor.layers.attention import AttentionMetadata, paged_attention
from tokenmill.executor.layers.embedding import VocabParallelEmbedding
from tokenmill.executor.layers.kv_cache import KVCache
from tokenmill.executor.layers.linear import LinearBase, make_linear
from tokenmill.executor.layers.rotary import RotaryEmbedding
from tokenmill.executor.parallel import TensorParallel
from tokenmill.weight_formats import dense, part

# The output projection of a quantized model. It is the largest matrix of a small model (SmolLM2-135M:
# 28M of 135M weights, 49k x 576), so leaving it float would cost most of the speed; int8 keeps next-token
# distributions far closer than int4 does (benchmarks/quant_quality.py).
LM_HEAD_QUANT = WeightQuant("int8")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (ops := cpu_ops(x)) is not None:
            return ops.rms_norm(x, self.weight, self.eps)
        # Spelled out: F.rms_norm adds two dtype round trips per call, a cost at batch 1.
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def cpu_ops(x: torch.Tensor):
    """tokenmill's C++ operators where they run this tensor (float32 on CPU, kernels built), else None.
    Every row-wise operation then takes them, so a token gets the same bits in every kind of step."""
    return lowbit() if x.dtype == torch.float32 and x.device.type == "cpu" else None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, quant: WeightQuant | None, prefix: str,
                 tp: TensorParallel):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = make_linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.attention_bias, quant,
                                    _names(prefix, "q_proj", "k_proj", "v_proj"), "column", tp.world)
        self.o_proj = make_linear(self.q_size, cfg.hidden_size, False, quant, _names(prefix, "o_proj"), "row", tp.world)
        self.tp = tp
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = rotary
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x, cos_sin, meta: AttentionMetadata, cache: KVCache):
        tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        # q|k as one [T, heads + kv_heads, head_dim] view: normed and rotated together, in place,
        # so that k|v stay adjacent in qkv and go to the cache as one [T, 2, kv_heads, head_dim].
        qk = qkv[:, : self.q_size + self.kv_size].view(tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            qk.copy_(torch.cat([self.q_norm(qk[:, : self.num_heads]), self.k_norm(qk[:, self.num_heads:])], dim=1))
        if (ops := cpu_ops(qk)) is not None:
            ops.rope_(qk, cos_sin[0].view(tokens, -1), cos_sin[1].view(tokens, -1))
        else:
            qk.copy_(self.rotary.apply(qk, cos_sin))
        q = qk[:, : self.num_heads]
        kv = qkv[:, self.q_size:].view(tokens, 2, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, kv, cache, meta, self.scale)
        return self.tp.all_reduce(self.o_proj(out))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: WeightQuant | None, prefix: str, tp: TensorParallel):
        super().__init__()
        self.gate_up_proj = make_linear(cfg.hidden_size, 2 * cfg.intermediate_size, False, quant,
                                        _names(prefix, "gate_proj", "up_proj"), "column", tp.world)
        self.down_proj = make_linear(cfg.intermediate_size, cfg.hidden_size, False, quant, _names(prefix, "down_proj"),
                                     "row", tp.world)
        self.tp = tp

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        if (ops := cpu_ops(gate_up)) is not None:
            return self.tp.all_reduce(self.down_proj(ops.silu_mul(gate_up)))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.tp.all_reduce(self.down_proj(F.silu(gate) * up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, quant: WeightQuant | None, index: int,
                 tp: TensorParallel):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rotary, quant, f"model.layers.{index}.self_attn", tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, quant, f"model.layers.{index}.mlp", tp)

    def forward(self, x, cos_sin, meta, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, meta, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    # HF tensor name part -> (fused parameter, shard index) for the fused projections.
    FUSED = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }
    # Tensor parallel: checkpoint weights cut by output rows (their biases too; the vocabulary's rows
    # for the embedding and output head) and by inputs. The rest (norms) every rank holds whole.
    COLUMN_PARALLEL = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head"}
    ROW_PARALLEL = {"o_proj", "down_proj"}

    def __init__(self, cfg: ModelConfig, max_positions: int, quant: WeightQuant | None = None,
                 tp: TensorParallel | None = None):
        super().__init__()
        self.cfg = cfg
        self.tp = tp = tp or TensorParallel()
        self.rotary = RotaryEmbedding(cfg, max_positions)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.rotary, quant, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = make_linear(cfg.hidden_size, cfg.vocab_size // tp.world, False, LM_HEAD_QUANT if quant else None,
                                   ("lm_head.weight",), "column", tp.world)
        self.requires_grad_(False)

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches) -> torch.Tensor:
        """Hidden states [tokens, hidden] before the final norm."""
        x = self.embed_tokens(input_ids)
        cos_sin = self.rotary.cos_sin(positions)
        rb = meta.row_batch
        if rb is not None and rb.whole and (params := self._fused_params(kv_caches)) is not None:
            c = self.cfg
            return lowbit().step_layers(
                x, params, cos_sin[0].view(x.shape[0], -1), cos_sin[1].view(x.shape[0], -1), meta.slot_mapping,
                rb.tables, rb.lens, meta.block_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size,
                c.rms_norm_eps, meta.sliding_window or 0, c.head_dim ** -0.5)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, cos_sin, meta, cache)
        return x

    def _fused_params(self, kv_caches) -> list[torch.Tensor] | None:
        """What step_layers takes, 12 tensors a layer, or None where the fused step cannot run this model
        (float weights, q/k norms, an 8-bit or non-float32 cache, tensor parallelism: the fused step has no
        all-reduce between its layers' halves): then each layer runs op by op."""
        if self.tp.world > 1:
            return None
        key = id(kv_caches)
        if getattr(self, "_fused_key", None) != key:
            self._fused_key, self._fused = key, _fused_layer_params(self.layers, kv_caches)
        return self._fused

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab]; under tensor parallelism every rank takes part and gets them all."""
        return self.tp.all_gather(self.lm_head(self.norm(hidden)))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (HF name, tensor) pairs; every weight (and fused shard) must be loaded once."""
        names = self._weight_names()
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            tensor = self._share(name, tensor)
            if name == "embed_tokens.weight" and self.cfg.tie_word_embeddings:
                self.lm_head.load("weight", tensor)
                loaded.add("lm_head.weight")
            elif name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue  # tied: some checkpoints store the copy anyway
            module_name, kind = name.rsplit(".", 1)
            module_parts = module_name.split(".")
            shard = self.FUSED.get(module_parts[-1])
            offset = 0
            if shard is not None:
                module_parts[-1] = shard[0]
                offset = self._shard_offset(shard[0], shard[1])
            target = ".".join(module_parts)
            key = f"{target}.{kind}"
            if key not in names:
                raise KeyError(f"unexpected weight {name!r} in checkpoint")
            module = self.get_submodule(target)
            if isinstance(module, LinearBase):
                module.load(kind, tensor, offset)
            else:
                param = getattr(module, kind)
                if param.shape != tensor.shape:
                    raise ValueError(f"weight {name}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(param.shape)}")
                param.data.copy_(dense(tensor))
            loaded.add(key if shard is None else f"{key}#{shard[1]}")
        missing = sorted(self._expected_keys(names) - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:5]}")

    def _share(self, name: str, tensor):
        """This rank's part of a checkpoint tensor (all of it without tensor parallelism)."""
        module = name.rsplit(".", 2)[-2]
        if self.tp.world == 1 or module not in self.COLUMN_PARALLEL | self.ROW_PARALLEL:
            return tensor
        return part(tensor, 0 if module in self.COLUMN_PARALLEL else 1, self.tp.rank, self.tp.world)

    def _weight_names(self) -> set[str]:
        """Every parameter, and the weight of every linear layer (quantized ones hold it as buffers)."""
        names = {name for name, _ in self.named_parameters()}
        names.update(f"{name}.weight" for name, module in self.named_modules() if isinstance(module, LinearBase))
        return names

    def _expected_keys(self, names: set[str]) -> set[str]:
        shards = {"qkv_proj": 3, "gate_up_proj": 2}
        expected = set()
        for pname in names:
            module = pname.rsplit(".", 1)[0].rsplit(".", 1)[-1]
            if module in shards:
                expected.update(f"{pname}#{i}" for i in range(shards[module]))
            else:
                expected.add(pname)
        return expected

    def _shard_offset(self, target: str, shard: int) -> int:
        c = self.cfg
        if target == "qkv_proj":
            return [0, c.num_heads * c.head_dim, (c.num_heads + c.num_kv_heads) * c.head_dim][shard]
        return shard * c.intermediate_size


def _names(prefix: str, *projections: str) -> tuple[str, ...]:
    """The checkpoint (Hugging Face) names of the weights a projection is made of."""
    return tuple(f"{prefix}.{p}.weight" for p in projections)


def _fused_layer_params(layers, kv_caches) -> list[torch.Tensor] | None:
    params: list[torch.Tensor] = []
    for layer, cache in zip(layers, kv_caches):
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if (attn.q_norm is not None or cache.data.dtype != torch.float32
                or any(getattr(m, "kernel_weight", None) is None for m in linears)):
            return None
        qkv, o, gate_up, down = (m.kernel_weight for m in linears)
        bias = attn.qkv_proj.bias if attn.qkv_proj.bias is not None else torch.empty(0)
        params += [layer.input_layernorm.weight, qkv.codes, qkv.scales, bias, o.codes, o.scales,
                   layer.post_attention_layernorm.weight, gate_up.codes, gate_up.scales, down.codes, down.scales,
                   cache.data]
    return params
