"""Distiller: trains a student to approach a frozen teacher's mapping (MATH.md §3) on its outputs
and, optionally, on intermediate features."""

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..ops.distill import kd_loss, mapping_distance


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or DataParallel) wrapper."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel,
                                              nn.DataParallel)) else model


def _make_adapter(student_feature: torch.Tensor, teacher_feature: torch.Tensor,
                  name: str) -> nn.Module:
    """A learned map from the student's feature width to the teacher's: a 1x1 convolution for
    (B, C, H, W) maps, a Linear over the last dimension otherwise."""
    s, t = student_feature.shape, teacher_feature.shape
    if len(s) == 4 and len(t) == 4 and s[2:] == t[2:]:
        layer = nn.Conv2d(s[1], t[1], kernel_size=1)
    elif len(s) == len(t) and len(s) != 4 and s[:-1] == t[:-1]:
        layer = nn.Linear(s[-1], t[-1])
    else:
        raise ValueError(
            f"feature {name!r}: no adapter maps the student's shape {list(s)} to the teacher's "
            f"{list(t)} (supported: (B, ..., F) by a Linear, (B, C, H, W) with equal H, W by a "
            "1x1 convolution)")
    return layer.to(device=student_feature.device, dtype=student_feature.dtype)


class _Capture:
    """Forward hooks that keep the latest output of named submodules."""

    def __init__(self, model: nn.Module, names: Sequence[str], role: str):
        modules = dict(model.named_modules())
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in names:
            if name not in modules:
                raise ValueError(f"{role} has no submodule named {name!r}")
            self.handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(_module, _inputs, output):
            self.outputs[name] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def take(self, names: Sequence[str]) -> list[torch.Tensor]:
        try:
            return [self.outputs.pop(n) for n in names]
        except KeyError as e:
            raise RuntimeError(f"submodule {e.args[0]!r} did not run in the forward pass") from e


class _Trainable(nn.Module):
    """The student and its feature adapters: everything that trains, behind one forward so that
    DistributedDataParallel averages the gradients of all of it."""

    def __init__(self, student: nn.Module, names: Sequence[str], adapters):
        super().__init__()
        self.student = student
        self.names = list(names)
        self.auto = adapters == "auto"
        self.adapters = nn.ModuleDict(
            {} if adapters in ("auto", None) else {k.replace(".", "/"): v
                                                    for k, v in dict(adapters).items()})
        self.capture = _Capture(_unwrap(student), self.names, "student")

    def forward(self, x, teacher_features: Sequence[torch.Tensor]):
        logits = self.student(x)
        features = []
        for name, f, t in zip(self.names, self.capture.take(self.names), teacher_features):
            key = name.replace(".", "/")  # ModuleDict keys can't hold dots
            if key not in self.adapters and f.shape != t.shape:
                if not self.auto:
                    raise ValueError(
                        f"feature {name!r}: student shape {list(f.shape)} differs from the "
                        f"teacher's {list(t.shape)} and no adapter was given (adapters='auto' "
                        "creates one)")
                self.adapters[key] = _make_adapter(f, t, name)
            features.append(self.adapters[key](f) if key in self.adapters else f)
        return logits, features


class Distiller:
    """Distils `teacher` into `student` (MATH.md §3).

    loss = kd_loss(student(x), teacher(x), y, alpha, distance, temperature)
           + mapping_distance(student features, teacher features, weights=feature_weights,
                              reduction="sum")

    The teacher runs in eval mode under no_grad. `features` maps student submodule names to
    teacher submodule names (as in named_modules()); their outputs are captured by forward hooks.
    When a student feature's width differs from the teacher's, adapters="auto" creates a learned
    adapter on the first batch (a Linear for (B, ..., F) features, a 1x1 Conv2d for (B, C, H, W));
    a dict {student name: module} supplies them instead, and None requires matching shapes.

    The trainable parameters are `parameters()`: the student's and the adapters'. Adapters exist
    only after the first batch: fit() adds them to its optimizer itself; a hand-written loop
    should call prepare(x) on one batch before building its optimizer."""

    def __init__(self, teacher: nn.Module, student: nn.Module, *, alpha: float = 0.5,
                 distance: str = "l2", temperature: float = 1.0,
                 features: Mapping[str, str] | None = None,
                 feature_weights: Sequence[float] | None = None, adapters="auto",
                 ignore_index: int = -100):
        features = dict(features or {})
        if feature_weights is not None and len(feature_weights) != len(features):
            raise ValueError(f"feature_weights must hold one weight per feature pair "
                             f"({len(features)}), got {len(feature_weights)}")
        if not (adapters in ("auto", None) or isinstance(adapters, Mapping)):
            raise ValueError(f"adapters must be 'auto', None or a dict, got {adapters!r}")
        self.teacher = teacher.eval()
        self.alpha, self.distance, self.temperature = alpha, distance, temperature
        self.ignore_index = ignore_index
        self.feature_weights = None if feature_weights is None else list(feature_weights)
        self.teacher_names = list(features.values())
        self.trainable = _Trainable(student, features.keys(), adapters)
        self.teacher_capture = _Capture(teacher, self.teacher_names, "teacher")
        # What forward calls: the trainable module, or its DistributedDataParallel wrapper.
        self.model: nn.Module = self.trainable

    @property
    def student(self) -> nn.Module:
        return _unwrap(self.trainable.student)

    @property
    def adapters(self) -> nn.ModuleDict:
        return self.trainable.adapters

    def parameters(self):
        """The student's and the adapters' parameters (what an optimizer must update)."""
        return self.trainable.parameters()

    def __call__(self, x, y=None):
        """(loss, student logits) for one batch."""
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        teacher_features = self.teacher_capture.take(self.teacher_names)
        logits, features = self.model(x, teacher_features)
        # Under autocast the two models' outputs may differ in precision; the op takes one dtype.
        teacher_logits = teacher_logits.to(logits.dtype)
        loss = kd_loss(logits, teacher_logits, y, self.alpha, distance=self.distance,
                       temperature=self.temperature, ignore_index=self.ignore_index)
        if features:
            dtype = features[0].dtype
            for f in (*features, *teacher_features):  # autocast may leave mixed precisions
                dtype = torch.promote_types(dtype, f.dtype)
            loss = loss + mapping_distance([f.to(dtype) for f in features],
                                           [t.to(dtype) for t in teacher_features],
                                           weights=self.feature_weights, reduction="sum")
        return loss, logits

    def prepare(self, x) -> None:
        """Runs one batch forward without gradients so that adapters="auto" creates its
        adapters (before an optimizer is built over parameters())."""
        with torch.no_grad():
            self(x)

    def fit(self, loader: Iterable, epochs: int = 1, optimizer: torch.optim.Optimizer | None = None,
            *, lr: float = 1e-3, eval_loader: Iterable | None = None,
            device: torch.device | str | None = None, amp: bool | None = None,
            progress: bool = True) -> dict:
        """Trains for `epochs` over `loader` (batches (x, y)); returns the history
        {"loss": per-epoch mean training loss, "accuracy": per-epoch student accuracy on
        eval_loader (only when given)}.

        optimizer: default Adam(parameters(), lr) built after the first batch; a given one gets the
        auto-created adapters added as a parameter group. device: where batches go (default: the
        student's). amp: autocast to float16 with a GradScaler (default: on for CUDA; CUDA only).
        Under torch.distributed (initialised by the caller, one process per rank, each with its
        share of the data) the student and adapters are wrapped in DistributedDataParallel unless
        the student already is, and the reported loss is averaged over ranks."""
        device = torch.device(device) if device is not None else next(
            self.student.parameters()).device
        amp = device.type == "cuda" if amp is None else amp
        if amp and device.type != "cuda":
            raise ValueError("amp=True needs a CUDA device")
        self.teacher.to(device)
        self.trainable.to(device)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        user_ddp = isinstance(self.trainable.student, nn.parallel.DistributedDataParallel)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        history = {"loss": []}
        if eval_loader is not None:
            history["accuracy"] = []
        ready = False
        for epoch in range(epochs):
            self.trainable.train()
            total, batches = torch.zeros((), device=device), 0
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}",
                       disable=not progress or rank != 0, leave=False)
            for x, y in bar:
                x, y = x.to(device), y.to(device)
                if not ready:
                    optimizer = self._setup(x, optimizer, lr, distributed and not user_ddp)
                    ready = True
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    loss, _ = self(x, y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if user_ddp and distributed and len(self.adapters):
                    self._average_adapter_grads()
                scaler.step(optimizer)
                scaler.update()
                total += loss.detach().float()
                batches += 1
                if progress and rank == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            if distributed:
                torch.distributed.all_reduce(total)
                total /= torch.distributed.get_world_size()
            history["loss"].append(total.item() / max(batches, 1))
            if eval_loader is not None:
                history["accuracy"].append(accuracy(self.student, eval_loader, device))
        return history

    def _setup(self, x, optimizer, lr, wrap):
        """Before the first step: create the adapters, give them to the optimizer (or build
        one), and wrap the trainable module for DistributedDataParallel."""
        before = {id(p) for p in self.adapters.parameters()}
        if self.trainable.auto and self.trainable.names:
            self.prepare(x)
        new = [p for p in self.adapters.parameters() if id(p) not in before]
        if optimizer is None:
            optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        elif new:
            optimizer.add_param_group({"params": new})
        if wrap and self.model is self.trainable:
            self.model = nn.parallel.DistributedDataParallel(self.trainable)
        return optimizer

    def _average_adapter_grads(self):
        # The user's DistributedDataParallel covers the student only.
        world = torch.distributed.get_world_size()
        for p in self.adapters.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable, device=None) -> float:
    """Fraction of samples whose argmax of model(x) equals y, in eval mode (the mode is
    restored)."""
    was_training = model.training
    model.eval()
    correct = count = 0
    for x, y in loader:
        if device is not None:
            x, y = x.to(device), y.to(device)
        correct += (model(x).argmax(-1) == y).sum().item()
        count += y.numel()
    model.train(was_training)
    return correct / max(count, 1)
