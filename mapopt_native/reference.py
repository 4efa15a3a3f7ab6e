"""Pure-PyTorch implementation of every op, written from MATH.md independently of the kernels.

It is the test oracle, the benchmark baseline, and the path for what the kernels don't serve
(forward-mode AD, double backward)."""

import math

import torch
from torch import Tensor

__all__ = ["gate", "gru_cell", "lstm_cell", "rnn", "activation", "activation_second_derivative",
           "hessian_term", "hessian_norm_linear", "hessian_norm_conv",
           "activation_with_hessian_norm", "kd_loss", "mapping_distance"]


def gate(name: str, z: Tensor) -> Tensor:
    """g(z) of the gate family `name` (MATH.md §1)."""
    if name == "sigmoid":
        return torch.sigmoid(z)
    if name == "gaussian":
        return torch.exp(-0.5 * z * z)
    if name == "trig":
        return 0.5 * (1.0 + torch.sin(z))
    raise ValueError(f"gate must be one of 'sigmoid', 'gaussian', 'trig', got {name!r}")


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.nn.functional.linear(x, w, b)


def gru_cell(input: Tensor, hx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
             bias_ih: Tensor | None = None, bias_hh: Tensor | None = None,
             gate_name: str = "sigmoid") -> Tensor:
    """GRU step, gate order r, z, n (PyTorch's convention)."""
    gi_r, gi_z, gi_n = _linear(input, weight_ih, bias_ih).chunk(3, dim=-1)
    gh_r, gh_z, gh_n = _linear(hx, weight_hh, bias_hh).chunk(3, dim=-1)
    r = gate(gate_name, gi_r + gh_r)
    z = gate(gate_name, gi_z + gh_z)
    n = torch.tanh(gi_n + r * gh_n)
    return (1 - z) * n + z * hx


def lstm_cell(input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
              bias_ih: Tensor | None = None, bias_hh: Tensor | None = None,
              gate_name: str = "sigmoid") -> tuple[Tensor, Tensor]:
    """LSTM step, gate order i, f, g, o; returns (h', c')."""
    a = _linear(input, weight_ih, bias_ih) + _linear(hx, weight_hh, bias_hh)
    a_i, a_f, a_c, a_o = a.chunk(4, dim=-1)
    i, f, o = gate(gate_name, a_i), gate(gate_name, a_f), gate(gate_name, a_o)
    cy = f * cx + i * torch.tanh(a_c)
    return o * torch.tanh(cy), cy


def rnn(kind: str, input: Tensor, states: tuple[Tensor, ...], weights: list[tuple],
        gate_name: str = "sigmoid", bidirectional: bool = False,
        lengths: Tensor | None = None, cell=None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """A multi-layer GRU ("gru") or LSTM ("lstm") as a Python loop of the reference cells.

    input (T, B, I); states: (h0,) or (h0, c0), each (layers*directions, B, H); weights: per
    (layer, direction) in that order, (w_ih, w_hh, b_ih, b_hh). With `lengths`, sequence b runs
    over its first lengths[b] steps only (as a packed sequence does): its state stops there (or,
    in reverse, starts there) and its outputs past the end are zero. Returns (output (T, B, D*H),
    final states). `cell` replaces the reference cell functions (benchmarks pass compiled ones)."""
    T = input.shape[0]
    cell = cell or (gru_cell if kind == "gru" else lstm_cell)
    D = 2 if bidirectional else 1
    finals = [[] for _ in states]
    x = input
    for layer in range(len(weights) // D):
        outs = []
        for d in range(D):
            k = layer * D + d
            w = weights[k]
            st = tuple(s[k] for s in states)
            out = [None] * T
            for t in (reversed(range(T)) if d else range(T)):
                new = cell(x[t], *st, *w, gate_name)
                new = new if isinstance(new, tuple) else (new,)
                if lengths is None:
                    st, out[t] = new, new[0]
                    continue
                active = (t < lengths).to(input.device).unsqueeze(1)
                st = tuple(torch.where(active, n, s) for n, s in zip(new, st))
                out[t] = torch.where(active, new[0], torch.zeros_like(new[0]))
            outs.append(torch.stack(out))
            for f, s in zip(finals, st):
                f.append(s)
        x = torch.cat(outs, dim=-1)
    return x, tuple(torch.stack(f) for f in finals)


# ---------------------------------------------------------------- Hessian-norm importance (§2)


def activation(name: str, z: Tensor, negative_slope: float = 0.01, alpha: float = 1.0) -> Tensor:
    """φ(z) by torch.nn.functional."""
    F = torch.nn.functional
    fns = {
        "tanh": torch.tanh, "sigmoid": torch.sigmoid, "softplus": F.softplus, "silu": F.silu,
        "gelu": F.gelu, "elu": lambda t: F.elu(t, alpha), "relu": F.relu,
        "leaky_relu": lambda t: F.leaky_relu(t, negative_slope), "identity": lambda t: t,
    }
    return fns[name](z)


def activation_second_derivative(name: str, z: Tensor, alpha: float = 1.0) -> Tensor:
    """φ''(z) of a smooth activation, the table of MATH.md §2.1."""
    if name == "tanh":
        t = torch.tanh(z)
        return -2 * t * (1 - t * t)
    s = torch.sigmoid(z)
    if name == "sigmoid":
        return s * (1 - s) * (1 - 2 * s)
    if name == "softplus":
        return s * (1 - s)
    if name == "silu":
        return s * (1 - s) * (2 + z * (1 - 2 * s))
    if name == "gelu":
        return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * (2 - z * z)
    if name == "elu":
        return torch.where(z < 0, alpha * torch.exp(z), torch.zeros_like(z))
    raise ValueError(f"no exact second derivative for {name!r}")


def hessian_term(name: str, z: Tensor, s: Tensor, sigma: float | None = None,
                 negative_slope: float = 0.01, alpha: float = 1.0) -> Tensor:
    """‖∇²f‖_F² of each element: φ''(z)² s² (§2.1), or for relu / leaky_relu / identity the
    Gaussian-smoothed k² ϕ(z/τ)² s² / τ², τ = σ sqrt(s), k = 1, 1 - a, 0 (§2.2)."""
    if name not in ("relu", "leaky_relu", "identity"):
        return (activation_second_derivative(name, z, alpha) * s) ** 2
    kink = {"relu": 1.0, "leaky_relu": 1.0 - negative_slope, "identity": 0.0}[name]
    s = s.expand_as(z)
    tau = sigma * torch.sqrt(s)
    pdf = torch.exp(-0.5 * (z / tau) ** 2) / math.sqrt(2 * math.pi)
    return torch.where(s > 0, kink ** 2 * pdf ** 2 * s ** 2 / tau ** 2, torch.zeros_like(z))


def hessian_norm_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None,
                        activation: str = "tanh", sigma: float | None = None,
                        negative_slope: float = 0.01, alpha: float = 1.0,
                        reduction: str = "mean") -> Tensor:
    """I_k = ‖w_k‖⁴ mean_rows φ''(z_k)² (§2.1); input (..., in) with leading dims as rows."""
    x = input.reshape(-1, weight.shape[1])
    z = torch.nn.functional.linear(x, weight, bias)
    term = hessian_term(activation, z, (weight * weight).sum(1), sigma, negative_slope, alpha)
    total = term.sum(0)
    return total / x.shape[0] if reduction == "mean" else total


def hessian_norm_conv(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1,
                      padding=0, dilation=1, groups: int = 1, activation: str = "tanh",
                      sigma: float | None = None, negative_slope: float = 0.01,
                      alpha: float = 1.0, reduction: str = "mean") -> Tensor:
    """I_c = mean_batch Σ_p φ''(z_{c,p})² s_{c,p}², s = conv(ones, w²) (§2.1); conv1d or conv2d
    by the weight's rank."""
    conv = torch.nn.functional.conv1d if weight.dim() == 3 else torch.nn.functional.conv2d
    z = conv(input, weight, bias, stride, padding, dilation, groups)
    s = conv(torch.ones_like(input[:1]), weight * weight, None, stride, padding, dilation, groups)
    term = hessian_term(activation, z, s, sigma, negative_slope, alpha)
    total = term.sum(0).flatten(1).sum(1)
    return total / input.shape[0] if reduction == "mean" else total


def activation_with_hessian_norm(z: Tensor, s: Tensor, activation_name: str,
                                 sigma: float | None = None, negative_slope: float = 0.01,
                                 alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """(φ(z), Σ over dim 0 of the per-element term): what the fused op returns and adds."""
    term = hessian_term(activation_name, z, s, sigma, negative_slope, alpha)
    return activation(activation_name, z, negative_slope, alpha), term.sum(0)
def kd_loss(student: Tensor, teacher: Tensor, target: Tensor | None = None, alpha: float = 0.5,
            distance: str = "l2", temperature: float = 1.0, ignore_index: int = -100,
            reduction: str = "mean") -> Tensor:
    """L = (1 - α)·CE + α·D over the samples whose target is not ignore_index (MATH.md §3), as
    separate ATen passes; logits (..., C). target None: L = D."""
    C = student.shape[-1]
    s, t = student.reshape(-1, C), teacher.detach().reshape(-1, C)
    if distance == "l2":
        dist = (s - t).pow(2).sum(-1)
    elif distance == "kl":
        T = temperature
        log_p, log_q = torch.log_softmax(t / T, -1), torch.log_softmax(s / T, -1)
        dist = T * T * (log_p.exp() * (log_p - log_q)).sum(-1)
    else:
        raise ValueError(f"distance must be 'l2' or 'kl', got {distance!r}")
    if target is None:
        rows, kept = dist, torch.ones_like(dist, dtype=torch.bool)
    else:
        y = target.reshape(-1)
        kept = y != ignore_index
        ce = torch.nn.functional.cross_entropy(s, y, ignore_index=ignore_index, reduction="none")
        rows = torch.where(kept, (1 - alpha) * ce + alpha * dist, torch.zeros_like(dist))
    if reduction == "none":
        return rows.reshape(student.shape[:-1])
    return rows.sum() if reduction == "sum" else rows.sum() / kept.sum()


def mapping_distance(students, teachers, weights=None, reduction: str = "mean") -> Tensor:
    """D_j = (1/B_j) Σ_b ‖s_j[b] - t_j[b]‖² per pair (0 for an empty batch), a Python loop;
    then weighted, and summed ("sum"), averaged over pairs ("mean") or not ("none")."""
    d = torch.stack([(s - t.detach()).pow(2).sum() / max(s.shape[0], 1)
                     for s, t in zip(students, teachers)])
    if weights is not None:
        d = d * torch.as_tensor(weights, dtype=d.dtype, device=d.device)
    if reduction == "none":
        return d
    return d.sum() if reduction == "sum" else d.mean()
