"""Residual-stream rotation folded into the weights offline (QuaRot / SpinQuant's R1; nothing at run time).

With the residual stream rotated, h -> h Q for an orthogonal Q, a weight-free RMSNorm commutes with Q
(rms(h Q) = rms(h)). So once each RMSNorm's weight is folded into the linears that read it, the model computes
the same function with
    embeddings E -> E Q,   readers (q/k/v, gate/up, head) W -> W diag(g) Q,   writers (o, down) W -> Q^T W,
and every norm weight set to 1. vLLM runs the result as an ordinary checkpoint. A random Hadamard Q spreads
each outlier channel over all channels, so the residual-stream activations and the readers' weight columns
lose the outliers that per-channel int4 weights and per-token int8 activations handle worst.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from vllm_aser_offline.model.experts import UnfusedExperts
from vllm_aser_offline.model.model_structure import DecoderStack, UnsupportedModelError

logger = logging.getLogger("vllm_aser_offline.transform.rotation")

# The norms whose outputs the block's linears read, and the alternatives for those linears (the first one a block
# has is used): Llama/Qwen/Mistral q/k/v and gate/up, Phi-3's fused qkv_proj and gate_up_proj; MoE blocks have
# the router and every expert's gate/up instead (found from the unfused experts, offline/model/experts.py).
NORMS = ("input_layernorm", "post_attention_layernorm")
ATTENTION_READERS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.qkv_proj",))
MLP_READERS = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.gate_up_proj",))
ATTN_OUT, MLP_OUT = "self_attn.o_proj", "mlp.down_proj"  # the writers into the residual stream
LAYOUT_HELP = ("rotation knows Llama-style blocks (input_layernorm -> q/k/v_proj or qkv_proj, post_attention_layernorm "
               "-> gate/up_proj, gate_up_proj or a router and its experts; o_proj and down_proj writing the residual)")


@dataclass
class BlockLayout:
    readers: dict[str, list[str]]  # norm -> the modules (a 2-D `weight` over the hidden size) reading its output
    writers: list[str]  # linears adding into the residual stream
    value: str  # the linear whose last rows are the attention values (v_proj, or a fused qkv_proj)
    value_fused: bool = False  # True: `value` is a fused qkv_proj
    attn_out: str = ATTN_OUT


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i), chi the quadratic character mod the prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(n: int) -> torch.Tensor | None:
    """Paley I (n = q + 1, q = 3 mod 4) or Paley II (n = 2 (q + 1), q = 1 mod 4), q prime."""
    q = n - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return s + torch.eye(n, dtype=torch.float64)
    q = n // 2 - 1
    if n % 2 == 0 and _is_prime(q) and q % 4 == 1:
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, one) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)
    return None


@lru_cache(maxsize=16)
def hadamard_matrix(n: int) -> torch.Tensor | None:
    """A +-1 matrix H with H H^T = n I (Sylvester doubling, Paley I/II, Kronecker products), or None when
    none of these constructions reaches n (n not 1, 2 or a multiple of 4 has none at all)."""
    if n in (1, 2):
        return torch.tensor([[1.0]] if n == 1 else [[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if n % 4:
        return None
    paley = _paley(n)
    if paley is not None:
        return paley
    half = hadamard_matrix(n // 2)
    if half is not None:
        return torch.kron(hadamard_matrix(2), half)
    for a in range(4, int(n**0.5) + 1, 4):
        if n % a == 0 and (n // a) % 4 == 0:
            left, right = hadamard_matrix(a), hadamard_matrix(n // a)
            if left is not None and right is not None:
                return torch.kron(left, right)
    return None


@dataclass
class ResidualRotation:
    matrix: torch.Tensor  # [hidden, hidden] float64, orthogonal
    kind: str  # "hadamard", or "orthogonal" where no Hadamard matrix of that order is constructed
    head: torch.Tensor | None = None  # [head_dim, head_dim]: rotates each head's values and o_proj's input


def random_orthogonal(n: int, gen: torch.Generator) -> tuple[torch.Tensor, str]:
    """diag(random signs) H / sqrt(n) (a random Hadamard rotation), or a random orthogonal matrix (QR of a
    Gaussian) where no Hadamard construction reaches n."""
    h = hadamard_matrix(n)
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
        return signs[:, None] * h / n**0.5, "hadamard"
    logger.warning("no Hadamard matrix of order %d is constructed here: rotating by a random orthogonal matrix", n)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(r.diagonal())[None, :], "orthogonal"


def residual_rotation(hidden: int, seed: int, head_dim: int | None = None) -> ResidualRotation:
    """The residual-stream rotation and, with `head_dim`, the per-head value rotation (both seeded)."""
    gen = torch.Generator().manual_seed(seed)
    matrix, kind = random_orthogonal(hidden, gen)
    head = random_orthogonal(head_dim, gen)[0] if head_dim else None
    return ResidualRotation(matrix, kind, head)


def _plain_rmsnorm_weight(norm: nn.Module, name: str) -> torch.Tensor:
    """The weight g of a norm computing g * x / rms(x); anything else (LayerNorm's mean and bias, Gemma's
    (1 + g)) does not commute with a rotation and is refused."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.is_meta:
        raise UnsupportedModelError(f"--rotate: {name} has no materialized 1-D weight (not an RMSNorm)")
    weight = weight.detach()
    x = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)) * 4 + 1
    with torch.no_grad():
        got = norm(x.to(weight.dtype)).double()
    expected = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True)) * weight.double()
    if not torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * float(weight.abs().max())):
        raise UnsupportedModelError(
            f"--rotate: {name} ({type(norm).__name__}) does not compute weight * x / rms(x), so a rotation of "
            "the residual stream would change the model; quantize this family with --rotate none"
        )
    return weight.float()


def _get(module: nn.Module, name: str, where: str) -> nn.Module:
    try:
        return module.get_submodule(name)
    except AttributeError:
        raise UnsupportedModelError(
            f"--rotate: {where} has no {name}; {LAYOUT_HELP}: quantize this family with --rotate none"
        ) from None


def _first_present(block: nn.Module, alternatives, where: str) -> list[str]:
    for names in alternatives:
        if all(_has(block, n) for n in names):
            return list(names)
    _get(block, alternatives[0][0], where)  # raises, naming the usual layout
    raise AssertionError


def _has(block: nn.Module, name: str) -> bool:
    try:
        block.get_submodule(name)
    except AttributeError:
        return False
    return True


def block_layout(block: nn.Module, where: str) -> BlockLayout:
    """Which modules read each norm's output and which write the residual stream; every linear of the block must
    be one of them (anything else is refused by name: a rotation that missed it would change the model)."""
    attention = _first_present(block, ATTENTION_READERS, where)
    experts = [(n, m) for n, m in block.named_modules() if isinstance(m, UnfusedExperts)]
    if experts:
        name, collection = experts[0]
        router = name.rpartition(".")[0] + ".gate"
        weight = getattr(block.get_submodule(router), "weight", None) if _has(block, router) else None
        if len(experts) > 1 or weight is None or weight.shape[0] != collection.num_experts:
            raise UnsupportedModelError(f"--rotate: {where}.{name}: no router {router} beside the experts; "
                                        f"{LAYOUT_HELP}: quantize this family with --rotate none")
        groups = collection.groups(name)
        mlp, writers = [router, *(n for g in groups[0::2] for n in g)], [n for g in groups[1::2] for n in g]
    else:
        mlp, writers = _first_present(block, MLP_READERS, where), [MLP_OUT]
    layout = BlockLayout(dict(zip(NORMS, (attention, mlp))), [ATTN_OUT, *writers], attention[-1], len(attention) == 1)
    covered = {n for names in layout.readers.values() for n in names} | set(layout.writers)
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and name not in covered:
            raise UnsupportedModelError(f"--rotate: {where}.{name} neither reads a norm's output nor writes the "
                                        f"residual stream; {LAYOUT_HELP}: quantize this family with --rotate none")
    return layout


def _set(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        linear.weight.copy_(weight.to(linear.weight.dtype))
        if bias is not None:
            linear.bias.copy_(bias.to(linear.bias.dtype))


def rotate_block(block: nn.Module, where: str, rotation: ResidualRotation) -> None:
    """Fold the block's norm weights into its readers and rotate readers and writers, in place."""
    q = rotation.matrix.float()  # float32 products: ~1e-7 relative, half the time of float64 on large models
    layout = block_layout(block, where)
    for norm_name, readers in layout.readers.items():
        norm = _get(block, norm_name, where)
        gain = _plain_rmsnorm_weight(norm, f"{where}.{norm_name}")
        for name in readers:
            linear = _get(block, name, where)
            _set(linear, (linear.weight.float() * gain[None, :]) @ q)
        with torch.no_grad():
            norm.weight.fill_(1.0)
    for name in layout.writers:
        linear = _get(block, name, where)
        bias = None if linear.bias is None else linear.bias.float() @ q
        _set(linear, q.t() @ linear.weight.float(), bias)
    if rotation.head is not None:
        _rotate_heads(_get(block, layout.value, where), _get(block, layout.attn_out, where), rotation.head.float(),
                      layout.value_fused)


def _rotate_heads(value: nn.Linear, attn_out: nn.Linear, r: torch.Tensor, fused: bool = False) -> None:
    """Each head's values v_h -> v_h R (v_proj rows R^T W_h, bias b_h R); attention mixes value rows, so each
    head's output turns by R too, undone in o_proj's columns (W_o,h R). GQA: one R for every head. A fused
    qkv_proj holds the values in its last rows: as many as its rows beyond o_proj's input, halved (k and v)."""
    hd = r.shape[0]
    w = value.weight.detach().float().clone()
    bias = None if value.bias is None else value.bias.detach().float().clone()
    rows = (w.shape[0] - attn_out.weight.shape[1]) // 2 if fused else w.shape[0]
    heads = rows // hd
    w[-rows:] = torch.einsum("ji,hjk->hik", r, w[-rows:].reshape(heads, hd, -1)).reshape(rows, -1)
    if bias is not None:
        bias[-rows:] = (bias[-rows:].reshape(heads, hd) @ r).reshape(-1)
    _set(value, w, bias)
    o = attn_out.weight.float()
    _set(attn_out, (o.reshape(o.shape[0], -1, hd) @ r).reshape(o.shape))


def head_dim(block: nn.Module) -> int | None:
    """The attention's head size, where the module says it (the value rotation is skipped otherwise)."""
    size = getattr(block.get_submodule("self_attn"), "head_dim", None)
    return size if isinstance(size, int) and size > 0 else None


def _final_norm(model: nn.Module, stack: DecoderStack) -> tuple[nn.Module, str]:
    """The norm after the decoder stack (`<stack's parent>.norm`) and its name."""
    parent_name = stack.prefix.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    return _get(parent, "norm", parent_name or type(model).__name__), f"{parent_name}.norm".lstrip(".")


def check_rotatable(model: nn.Module, stack: DecoderStack) -> None:
    """Refuse, by name, what rotate_block / rotate_outside could not rotate exactly (before any block is read)."""
    block = stack.layers[0]
    for name in NORMS:
        _get(block, name, f"{stack.prefix}.0")
    block_layout(block, f"{stack.prefix}.0")
    extra_norms = [n for n, m in block.named_children() if "norm" in type(m).__name__.lower() and n not in NORMS]
    if extra_norms:
        raise UnsupportedModelError(
            f"--rotate: {stack.prefix}.0 has norms besides {' and '.join(NORMS)} ({', '.join(extra_norms)}): a "
            "norm on a sublayer's output before the residual add (Gemma's sandwich norms) does not commute with a "
            "rotation of the residual stream; quantize this family with --rotate none"
        )
    _plain_rmsnorm_weight(*_final_norm(model, stack))
    if not isinstance(model.get_input_embeddings(), nn.Embedding) or model.get_output_embeddings() is None:
        raise UnsupportedModelError("--rotate: the model needs an nn.Embedding input and a linear head")


def rotate_outside(model: nn.Module, stack: DecoderStack, rotation: ResidualRotation) -> bool:
    """Rotate the embeddings, fold the final norm into the head and rotate it. Returns True when tied
    embeddings had to be untied: the head is E diag(g) Q and the embedding E Q, one matrix only when g = 1."""
    q = rotation.matrix.float()
    final_norm, name = _final_norm(model, stack)
    gain = _plain_rmsnorm_weight(final_norm, name)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is embed.weight
    untie = tied and not bool((gain == 1).all())
    with torch.no_grad():
        source = embed.weight.detach().float()
        new_head = (head.weight.detach().float() * gain[None, :]) @ q
        embed.weight.copy_((source @ q).to(embed.weight.dtype))
        if untie:
            head.weight = nn.Parameter(new_head.to(embed.weight.dtype), requires_grad=False)
            model.config.tie_word_embeddings = False
        elif not tied:
            head.weight.copy_(new_head.to(head.weight.dtype))
        final_norm.weight.fill_(1.0)
    return untie
