"""The Hessian-norm importance of any sub-mapping, estimated without forming a Hessian (MATH.md §2.3),
and exactly (per-sample torch.func.hessian) for small inputs: the oracle the estimator is tested
against.

Forward-mode AD does not pass through the native ops (they register a backward only), so a
sub-mapping is evaluated through pure PyTorch: for the recurrent layers, mapopt_native.reference's
cells with the layer's own weights."""

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.func import hessian, jvp, vmap

from .. import reference
from ..nn.layers import GatedGRU, GatedLSTM


@dataclass
class Estimate:
    """Per-unit importance I_k (mean over the samples) and its standard error (from the probes;
    zero for the exact computation)."""
    value: Tensor
    stderr: Tensor


def _batches(inputs) -> Iterable:
    return (inputs,) if isinstance(inputs, (Tensor, tuple)) else inputs


def _check_batch(x) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"hessian_norm: inputs must be (B, n) tensors (or an iterable of them), "
                         f"got {got}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"hessian_norm: inputs must have a floating dtype, got {x.dtype}")


def _second_directional(f: Callable, x: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """uᵀ H_k(x_b) v for every sample b and unit k: D²f(x)[u, v], forward over forward. f treats
    samples independently, so per-sample probes stacked along the batch give per-sample values."""
    def df_v(y):
        return jvp(f, (y,), (v,))[1]
    return jvp(df_v, (x,), (u,))[1]


def _probes(kind: str, shape, like: Tensor, generator) -> Tensor:
    if kind == "rademacher":
        bits = torch.randint(0, 2, shape, generator=generator, device="cpu")
        return (bits * 2 - 1).to(like)
    return torch.randn(shape, generator=generator, device="cpu", dtype=like.dtype).to(like.device)


def hessian_norm(submap: Callable, inputs, *, probes: int = 32, exact: bool = False,
                 probe: str = "rademacher", chunk: int = 8,
                 generator: torch.Generator | None = None) -> Estimate:
    """I_k = mean over samples of ‖∇²f_k(x)‖_F² for a sub-mapping f: (B, n) -> (B, m).

    submap: a module or callable that treats samples independently (BatchNorm in eval mode).
    inputs: a (B, n) tensor or an iterable of them (streamed: nothing of size data x units kept).
    A batch may also be a tuple (x, *held): submap(x, *held) is called and the held tensors
    (one row per sample, e.g. an LSTM's cell state) are inputs the Hessian is not taken over.
    probes: independent probe pairs (u, v) per sample; the estimate (uᵀH_k v)² is unbiased
    because u and v are independent (u = v is biased, MATH.md §2.3). The standard error is the
    probes' (how far the estimate may be from the exact value on these inputs).
    exact: per-sample torch.func.hessian instead (memory m·n² per sample: small n only).
    chunk: probe pairs evaluated together (vmap), a memory/speed trade."""
    if probe not in ("rademacher", "normal"):
        raise ValueError(f"hessian_norm: probe must be 'rademacher' or 'normal', got {probe!r}")
    if not exact and probes < 2:
        raise ValueError(f"hessian_norm: probes must be >= 2 (the standard error needs two), "
                         f"got {probes}")
    total = sq_var = None
    count = 0
    for batch in _batches(inputs):
        x, *held = batch if isinstance(batch, tuple) else (batch,)
        _check_batch(x)
        x, held = x.detach(), [t.detach() for t in held]
        if exact:
            def single(y, *h):
                return submap(y.unsqueeze(0), *(t.unsqueeze(0) for t in h)).squeeze(0)
            h = vmap(hessian(single))(x, *held)              # (B, m, n, n)
            per_sample = h.pow(2).sum(dim=(-2, -1))          # (B, m)
            batch_total, batch_var = per_sample.sum(0), torch.zeros_like(per_sample[0])
        else:
            values = []
            for start in range(0, probes, chunk):
                p = min(chunk, probes - start)
                u = _probes(probe, (p, *x.shape), x, generator)
                v = _probes(probe, (p, *x.shape), x, generator)
                def f(y):
                    return submap(y, *held)
                values.append(vmap(lambda a, b: _second_directional(f, x, a, b))(u, v).pow(2))
            e = torch.cat(values)                            # (P, B, m)
            batch_total = e.mean(0).sum(0)
            # Variance of each sample's probe mean: var_probes / P, summed over the samples.
            batch_var = (e.var(0, unbiased=True) / probes).sum(0)
        total = batch_total if total is None else total + batch_total
        sq_var = batch_var if sq_var is None else sq_var + batch_var
        count += x.shape[0]
    if count == 0:
        raise ValueError("hessian_norm: inputs held no samples")
    return Estimate((total / count).detach(), (sq_var.sqrt() / count).detach())


_RECURRENT = (nn.GRU, nn.LSTM, GatedGRU, GatedLSTM)


def _layer_weights(rnn: nn.Module, layer: int, direction: int) -> tuple:
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    return tuple(getattr(rnn, n + suffix, None) for n in names)


def _gate_name(rnn: nn.Module) -> str:
    return getattr(rnn, "gate", "sigmoid")


def _is_lstm(rnn: nn.Module) -> bool:
    return isinstance(rnn, (nn.LSTM, GatedLSTM))


def recurrent_step_inputs(rnn: nn.Module, input: Tensor, layer: int, direction: int,
                          lengths: Tensor | None = None) -> tuple[Tensor, ...]:
    """Every step's (x_t, h_{t-1}[, c_{t-1}]) of one layer and direction of a GRU/LSTM run on
    `input` (padded, (T, B, I) or batch_first per the module), zero initial state, as rows
    (steps x batch, ...). Steps past a sequence's length (`lengths`) are dropped."""
    with torch.no_grad():
        x = input.transpose(0, 1) if rnn.batch_first else input
        if x.dim() != 3:
            raise ValueError(f"recurrent inputs must be 3-D (padded, batched), got {list(input.shape)}")
        D = 2 if rnn.bidirectional else 1
        T, B = x.shape[:2]
        for k in range(layer):  # the layer's input: the previous layers' output
            weights = [_layer_weights(rnn, k, d) for d in range(D)]
            zeros = x.new_zeros(D, B, rnn.hidden_size)
            states = (zeros, zeros) if _is_lstm(rnn) else (zeros,)
            x, _ = reference.rnn("lstm" if _is_lstm(rnn) else "gru", x, states, weights,
                                 _gate_name(rnn), rnn.bidirectional, lengths)
        w = _layer_weights(rnn, layer, direction)
        h = x.new_zeros(B, rnn.hidden_size)
        c = torch.zeros_like(h)
        rows = []
        for t in (reversed(range(T)) if direction else range(T)):
            active = torch.ones(B, dtype=torch.bool) if lengths is None else (t < lengths.cpu())
            active = active.to(x.device)
            rows.append((x[t][active], h[active], c[active]))
            if _is_lstm(rnn):
                h_new, c_new = reference.lstm_cell(x[t], h, c, *w, _gate_name(rnn))
                c = torch.where(active.unsqueeze(1), c_new, c)
            else:
                h_new = reference.gru_cell(x[t], h, *w, _gate_name(rnn))
            h = torch.where(active.unsqueeze(1), h_new, h)
        n = 3 if _is_lstm(rnn) else 2
        return tuple(torch.cat([r[i] for r in rows]) for i in range(n))


def recurrent_cell_mapping(rnn: nn.Module, layer: int, direction: int):
    """The cell mapping (x_t, h_{t-1}) -> h_t of one layer and direction as a function of the
    concatenated row [x_t, h_{t-1}] (MATH.md §2.3). For an LSTM it takes the cell state c_{t-1}
    as a second argument, held fixed: the mapping's input is (x_t, h_{t-1}) only."""
    w = _layer_weights(rnn, layer, direction)
    split = w[0].shape[1]
    gate_name = _gate_name(rnn)

    if _is_lstm(rnn):
        def f(xh, c):
            return reference.lstm_cell(xh[:, :split], xh[:, split:], c, *w, gate_name)[0]
        return f
    return lambda xh: reference.gru_cell(xh[:, :split], xh[:, split:], *w, gate_name)


def recurrent_hessian_norm(rnn: nn.Module, inputs, layer: int = 0, *, probes: int = 32,
                           exact: bool = False, max_rows: int | None = 4096,
                           lengths: Tensor | None = None,
                           generator: torch.Generator | None = None, **options) -> Estimate:
    """Per hidden unit of `layer`: I_k of the cell mapping (x_t, h_{t-1}) -> h_t averaged over
    every step of every sequence in `inputs` (padded tensors, or an iterable of them; `lengths`:
    the valid steps of each sequence of a single padded tensor), summed over
    both directions when bidirectional (the directions' unit k are pruned together). max_rows caps
    the (step, sequence) rows used per batch (a random subset; None: all)."""
    if not isinstance(rnn, _RECURRENT):
        raise TypeError(f"recurrent_hessian_norm needs an nn.GRU, nn.LSTM, GatedGRU or GatedLSTM, "
                        f"got {type(rnn).__name__}")
    if not 0 <= layer < rnn.num_layers:
        raise ValueError(f"layer must be in [0, {rnn.num_layers}), got {layer}")
    if getattr(rnn, "proj_size", 0):
        raise ValueError("recurrent_hessian_norm: LSTMs with proj_size are not supported")
    D = 2 if rnn.bidirectional else 1
    value = stderr_sq = 0
    for d in range(D):
        est_total = var_total = None
        count = 0
        for x in _batches(inputs):
            steps = recurrent_step_inputs(rnn, x, layer, d, lengths)
            if max_rows is not None and steps[0].shape[0] > max_rows:
                pick = torch.randperm(steps[0].shape[0], generator=generator)[:max_rows]
                steps = tuple(s[pick.to(s.device)] for s in steps)
            xh = torch.cat(steps[:2], dim=1)
            batch = (xh, *steps[2:])  # an LSTM's cell state is held, not differentiated
            est = hessian_norm(recurrent_cell_mapping(rnn, layer, d), batch, probes=probes,
                               exact=exact, generator=generator, **options)
            n = xh.shape[0]
            est_total = est.value * n if est_total is None else est_total + est.value * n
            var_total = (est.stderr * n) ** 2 if var_total is None else var_total + (est.stderr * n) ** 2
            count += n
        value = value + est_total / count
        stderr_sq = stderr_sq + var_total / count ** 2
    return Estimate(value, stderr_sq.sqrt() if isinstance(stderr_sq, Tensor) else torch.tensor(0.0))
