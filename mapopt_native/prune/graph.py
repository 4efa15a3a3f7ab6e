"""Which units of a model can be scored and removed: the prunable unit groups (MATH.md §2.5).

A unit group is the set of output units of one producer (a Linear / Conv1d / Conv2d's output
rows, or one layer's hidden units of an nn.GRU / nn.LSTM / GatedGRU / GatedLSTM), together with
what follows it up to the layers that read those units:

    producer -> [BatchNorm] -> [activation] -> [dropout / pooling / flatten / getitem ...] -> consumers

The model is traced with torch.fx (recurrent modules stay leaves). A group whose units reach
anything else (a residual add, a concatenation, the model's output) is `coupled`: it can still be
scored (its activation input is what the criterion needs) but removing its units alone would
break the model, so prune_units leaves it to a dependency-graph pruner (Torch-Pruning, with our
importance: mapopt_native.prune.torch_pruning)."""

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn.layers import GatedGRU, GatedLSTM

RECURRENT = (nn.GRU, nn.LSTM, GatedGRU, GatedLSTM)
PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d) + RECURRENT
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)

# Modules and functions that leave the unit (channel / feature) axis as it is.
_PASS_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.MaxPool1d, nn.MaxPool2d,
                 nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten)
_PASS_FUNCTIONS = {F.dropout, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d,
                   F.adaptive_max_pool2d, torch.flatten, torch.unsqueeze, torch.squeeze,
                   operator.getitem}
_PASS_METHODS = {"flatten", "contiguous", "unsqueeze", "squeeze", "view", "reshape"}
# Flattening conv channels into features: a consumer Linear then reads `spatial` columns per unit.
_FLATTENS = (nn.Flatten, torch.flatten, "flatten", "view", "reshape")

_ACTIVATION_MODULES = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu", nn.ReLU: "relu",
                       nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.GELU: "gelu",
                       nn.Softplus: "softplus", nn.Identity: "identity"}
_ACTIVATION_FUNCTIONS = {torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid",
                         F.sigmoid: "sigmoid", F.silu: "silu", torch.relu: "relu", F.relu: "relu",
                         F.leaky_relu: "leaky_relu", F.elu: "elu", F.gelu: "gelu",
                         F.softplus: "softplus"}
_ACTIVATION_METHODS = {"tanh": "tanh", "sigmoid": "sigmoid", "relu": "relu"}


@dataclass
class Activation:
    """An activation as the Hessian-norm ops name it, with its parameters; `site` is the fx node
    that applies it (its input is the pre-activation)."""
    name: str
    options: dict = field(default_factory=dict)
    site: fx.Node | None = None


@dataclass
class UnitGroup:
    name: str                    # the scores key: module name, or "<name>.l<k>" for a recurrent layer
    module: nn.Module            # the producer
    layer: int | None = None     # recurrent layer index
    batch_norm: nn.Module | None = None
    activation: Activation | None = None
    residual: bool = False       # an add between the producer (and its BatchNorm) and the activation
    consumers: list = field(default_factory=list)   # (module name, module) reading the units
    flattened: bool = False      # the units reach a consumer Linear through a flatten
    coupled: str | None = None   # why the units can't be removed alone (None: they can)

    @property
    def kind(self) -> str:
        if isinstance(self.module, RECURRENT):
            return "recurrent"
        return {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d"}[type(self.module)]

    @property
    def units(self) -> int:
        m = self.module
        if isinstance(m, RECURRENT):
            return m.hidden_size
        return m.out_features if isinstance(m, nn.Linear) else m.out_channels


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, RECURRENT) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types for untraceable Python control flow
        raise TypeError(
            f"{type(model).__name__} can't be traced by torch.fx ({type(e).__name__}: {e}); "
            "score/prune its layers with the ops in mapopt_native.ops, or prune it with "
            "Torch-Pruning and mapopt_native.prune.torch_pruning.HessianNormImportance") from e
    return fx.GraphModule(model, graph)


def _activation(node: fx.Node, modules: dict) -> Activation | None:
    if node.op == "call_module":
        m = modules[node.target]
        name = _ACTIVATION_MODULES.get(type(m))
        if name is None or isinstance(m, nn.Identity):
            return None
        options = {}
        if isinstance(m, nn.LeakyReLU):
            options["negative_slope"] = m.negative_slope
        elif isinstance(m, nn.ELU):
            options["alpha"] = m.alpha
        elif isinstance(m, nn.GELU) and m.approximate != "none":
            return None
        elif isinstance(m, nn.Softplus) and (m.beta != 1 or m.threshold < 20):
            return None
        return Activation(name, options, node)
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        name = _ACTIVATION_FUNCTIONS[node.target]
        options = {}
        extra = list(node.args[1:])
        if name == "leaky_relu":
            options["negative_slope"] = node.kwargs.get("negative_slope", extra[0] if extra else 0.01)
        elif name == "elu":
            options["alpha"] = node.kwargs.get("alpha", extra[0] if extra else 1.0)
        elif name == "gelu" and node.kwargs.get("approximate", "none") != "none":
            return None
        elif name == "softplus" and (node.kwargs.get("beta", 1) != 1 or extra):
            return None
        return Activation(name, options, node)
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS:
        return Activation(_ACTIVATION_METHODS[node.target], {}, node)
    return None


def _passes(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS
    if node.op == "call_method":
        return node.target in _PASS_METHODS
    return False


def _is_flatten(node: fx.Node, modules: dict) -> bool:
    target = modules[node.target] if node.op == "call_module" else node.target
    return isinstance(target, nn.Flatten) or target in _FLATTENS


def _follow(group: UnitGroup, start: fx.Node, modules: dict) -> None:
    """Walks from the producer's output to the layers that read its units, filling the group's
    BatchNorm, activation, consumers and `coupled` (the first reason found)."""
    stack = [(user, start) for user in start.users]  # (node, the node its units come from)
    seen = set()
    before_activation = True
    while stack:
        node, source = stack.pop()
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, PRODUCERS):  # every edge into a consumer is checked
            others = []
            fx.node.map_arg((node.args[1:], node.kwargs), others.append)
            if node.args[:1] != (source,) or source in others:
                # e.g. a recurrent module's initial state: not the columns of its input
                group.coupled = group.coupled or (
                    f"its units reach {node.target} other than as its input")
            elif (node.target, module) not in group.consumers:
                group.consumers.append((node.target, module))
            continue
        if node in seen:
            continue
        seen.add(node)
        if (before_activation and isinstance(module, _BATCH_NORMS) and group.batch_norm is None
                and group.activation is None and not group.residual):
            group.batch_norm = module
            stack.extend((user, node) for user in node.users)
            continue
        act = _activation(node, modules)
        if act is not None and group.activation is None:
            group.activation = act
            before_activation = False
            stack.extend((user, node) for user in node.users)
            continue
        if node.op == "call_function" and node.target in (operator.add, torch.add) and before_activation:
            # A residual add: the units are scored with the other summand held fixed, but their
            # channels are tied to the other branch, so they can't be removed alone.
            group.residual = True
            group.coupled = group.coupled or f"its output is added to another branch ({node.name})"
            stack.extend((user, node) for user in node.users)
            continue
        if _passes(node, modules):
            if _is_flatten(node, modules):
                group.flattened = True
            stack.extend((user, node) for user in node.users)
            continue
        what = "the model's output" if node.op == "output" else f"{node.op} {node.target}"
        group.coupled = group.coupled or f"its units reach {what}"


def unit_groups(model: nn.Module) -> list[UnitGroup]:
    """Every unit group of `model`, in forward order (coupled ones included, see UnitGroup)."""
    gm = trace(model)
    modules = dict(gm.named_modules())
    calls = Counter(node.target for node in gm.graph.nodes if node.op == "call_module")
    groups, seen = [], set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], PRODUCERS):
            continue
        if node.target in seen:
            continue  # called again: one group per module, coupled below
        seen.add(node.target)
        module = modules[node.target]
        if isinstance(module, RECURRENT):
            last = module.num_layers - 1
            new = []
            for layer in range(module.num_layers):
                g = UnitGroup(f"{node.target}.l{layer}", module, layer=layer)
                if layer == last:
                    _follow(g, node, modules)
                else:
                    g.consumers.append((node.target, module))
                new.append(g)
        else:
            g = UnitGroup(node.target, module)
            _follow(g, node, modules)
            if not g.consumers and g.coupled is None:
                g.coupled = "nothing reads its units"
            new = [g]
        for g in new:
            # A module called twice shares its weights between calls whose other ends differ.
            shared = [name for name, m in g.consumers if calls[name] > 1 and m is not module]
            if calls[node.target] > 1:
                g.coupled = g.coupled or f"{node.target} is called more than once"
            elif shared:
                g.coupled = g.coupled or f"its consumer {shared[0]} is called more than once"
        groups += new
    return groups
