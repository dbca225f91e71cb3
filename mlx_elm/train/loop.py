"""The training loop shared by LoRA fine-tuning and pre-training.

One optimizer step = ``grad_accumulation`` global batches. Each process computes the gradient of
the *summed* masked cross-entropy on its slice, the sums and target-token counts are added over
micro-batches and processes, and the optimizer gets ``sum / tokens``: exactly the mean-loss
gradient of the combined batch. Dropout is seeded from ``(seed, batch number)``, the data order
from ``(seed, epoch)``, so a checkpoint (weights + optimizer state + position) resumes a run
exactly; Ctrl-C saves one before exiting.
"""

from __future__ import annotations

import inspect
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path
from tqdm import tqdm

from mlx_elm.errors import TrainingError
from mlx_elm.train import checkpoint as ckpt
from mlx_elm.train.data import Batcher, Dataset, Position, iterate_eval
from mlx_elm.train.distributed import World, all_sum, init_world
from mlx_elm.train.schedule import build_optimizer


@dataclass
class TrainConfig:
    """Optimization and bookkeeping settings (``iters`` counts optimizer steps)."""

    batch_size: int = 4
    iters: int = 0  # 0: derived from ``epochs``
    epochs: float = 0.0
    learning_rate: Optional[float] = 1e-4  # None: the caller's model-specific default
    warmup_steps: int = 0
    min_lr: float = 0.0
    weight_decay: float = 0.0
    grad_accumulation: int = 1
    grad_clip: float = 0.0
    grad_checkpoint: bool = False
    max_seq_length: int = 2048
    steps_per_eval: int = 100
    val_batches: int = 25
    save_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    resume: bool = False
    compile: bool = True
    progress: bool = True

    def validate(self) -> "TrainConfig":
        """One-line errors for values no run can use (ranges as stated in ``--help``)."""
        for name, lo, hi in (("batch_size", 1, 65536), ("grad_accumulation", 1, 65536), ("iters", 0, 10**9),
                             ("warmup_steps", 0, 10**9), ("max_seq_length", 2, 1 << 20),
                             ("steps_per_eval", 0, 10**9), ("val_batches", -1, 10**9), ("save_every", 0, 10**9),
                             ("seed", 0, 2**32 - 1)):
            value = getattr(self, name)
            if not lo <= value <= hi:
                flag = "--warmup" if name == "warmup_steps" else f"--{name.replace('_', '-')}"
                raise TrainingError(f"{flag} must be in [{lo}, {hi}] (got {value})")
        for name in ("epochs", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise TrainingError(f"--{name.replace('_', '-')} must be a finite number >= 0 (got {value})")
        lr = self.learning_rate
        if lr is None or not math.isfinite(lr) or not 0 < lr <= 10:
            raise TrainingError(f"--learning-rate must be a finite number in (0, 10] (got {lr})")
        return self

    def total_steps(self, batches_per_epoch: int) -> int:
        if self.iters:
            return self.iters
        epochs = self.epochs or 1.0
        return max(1, math.ceil(epochs * batches_per_epoch / self.grad_accumulation))

    def fingerprint(self) -> dict:
        """Settings a resumed run must share with the original to continue it exactly."""
        keys = ("batch_size", "learning_rate", "warmup_steps", "min_lr", "weight_decay", "grad_accumulation",
                "grad_clip", "max_seq_length", "seed")
        return {k: getattr(self, k) for k in keys}


@dataclass
class TrainResult:
    step: int
    total_steps: int
    losses: List[float] = field(default_factory=list)  # mean train loss per optimizer step
    val_losses: List[tuple] = field(default_factory=list)  # (step, loss)
    metrics: List[Dict[str, float]] = field(default_factory=list)  # per optimizer step, from the loss function
    tokens: int = 0
    seconds: float = 0.0
    peak_memory_gb: float = 0.0
    interrupted: bool = False
    checkpoint: Optional[Path] = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        last = f"loss {self.losses[-1]:.3f}, " if self.losses else ""
        return (f"step {self.step}/{self.total_steps}: {last}{self.tokens} tokens in {self.seconds:.1f}s "
                f"({self.tokens_per_second:.0f} tok/s), peak memory {self.peak_memory_gb:.2f} GB")


def masked_loss_sum(model: nn.Module, tokens: mx.array, mask: mx.array):
    """Summed cross-entropy over target tokens, and their number."""
    logits = model(tokens[:, :-1]).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, tokens[:, 1:]) * mask
    return ce.sum(), mask.sum()


def enable_grad_checkpoint(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass (less memory, ~30% more time).

    Swaps the class of each block *instance* for a subclass, so parameter names stay unchanged and
    other models in the process are unaffected.
    """
    made: Dict[type, type] = {}
    for layer in model.layers:
        cls = type(layer)
        if getattr(cls, "_mlx_elm_checkpointed", False):
            continue
        if cls not in made:
            base_call = cls.__call__

            def call(self, *args, _base=base_call, **kwargs):
                def inner(params, *arrays):
                    self.update(params)
                    return _base(self, *arrays, **kwargs)

                if all(isinstance(a, mx.array) for a in args):
                    return mx.checkpoint(inner)(self.trainable_parameters(), *args)
                # non-array arguments (mask strings, caches) are closed over
                return mx.checkpoint(lambda p, x: inner(p, x, *args[1:]))(self.trainable_parameters(), args[0])

            made[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": call, "_mlx_elm_checkpointed": True})
        layer.__class__ = made[cls]


class _InterruptFlag:
    """First Ctrl-C asks the loop to save and stop after the current step; a second one aborts."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handler(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _split_output(out) -> Tuple[mx.array, mx.array, Dict[str, mx.array]]:
    """A loss function returns ``(sum, count)`` or ``(sum, count, metrics)``."""
    if len(out) == 3:
        return out[0], out[1], dict(out[2])
    return out[0], out[1], {}


def _wants_step(loss_fn: Callable) -> bool:
    try:
        return "step" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return False


def evaluate(model: nn.Module, data: Dataset, batch_size: int, world: World, max_batches: int = -1,
             loss_fn: Callable = None) -> float:
    """Mean loss per target over (a prefix of) the validation split, summed over all processes."""
    loss_fn = loss_fn or masked_loss_sum
    was_training = model.training
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    for batch in iterate_eval(data.valid.examples, batch_size, world.rank, world.size, max_batches,
                              data.collate, data.length):
        kwargs = {"step": mx.array(0)} if _wants_step(loss_fn) else {}
        s, n, _ = _split_output(loss_fn(model, *(mx.array(b) for b in batch), **kwargs))
        total, count = total + s, count + n
        mx.eval(total, count)
    total, count = all_sum((total, count), world)
    if was_training:
        model.train()
    return (total / mx.maximum(count, 1)).item()


def _batch_seed(seed: int, micro_step: int) -> int:
    return (seed * 1_000_003 + micro_step) % (2**63)


def _gradient_function(model: nn.Module, loss_fn: Callable, compile_: bool) -> Callable:
    """``(batch arrays, step) -> ((sum, count, metrics), grads)``, compiled when asked."""
    wants_step = _wants_step(loss_fn)

    def objective(model, step, *batch):
        out = loss_fn(model, *batch, step=step) if wants_step else loss_fn(model, *batch)
        total, count, metrics = _split_output(out)
        return total, (count, metrics)

    value_and_grad = nn.value_and_grad(model, lambda *a: objective(model, *a))

    def fn(step, *batch):
        (total, (count, metrics)), grads = value_and_grad(step, *batch)
        return (total, count, metrics), grads

    if compile_:
        state = [model.state, mx.random.state]
        fn = mx.compile(fn, inputs=state, outputs=state)
    return fn


def train(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    out_dir: Path,
    save_fn: Callable[[nn.Module], None],
    fingerprint: Optional[dict] = None,
    world: Optional[World] = None,
    on_step: Optional[Callable[[int, float, Dict[str, float]], None]] = None,
    log: Callable[[str], None] = print,
    loss_fn: Optional[Callable] = None,
) -> TrainResult:
    """Train the trainable parameters of ``model``; ``save_fn`` writes the deliverable (adapters or
    model folder) on rank 0 at every checkpoint and at the end.

    ``loss_fn(model, *batch[, step=])`` returns the *summed* loss over its targets, their number,
    and optionally a dict of scalar metrics (averaged over micro-batches and processes, logged and
    kept in ``TrainResult.metrics``); it defaults to the masked LM cross-entropy. ``batch`` is what
    ``data.collate`` makes; a loss function that names a ``step`` parameter gets the optimizer step
    as an array (curricula), without recompiling.
    """
    cfg.validate()
    loss_fn = loss_fn or masked_loss_sum
    world = world or init_world()
    out_dir = Path(out_dir)
    batcher = Batcher(data.train.examples, cfg.batch_size, cfg.seed, world.rank, world.size,
                      collate=data.collate, length=data.length)
    total = cfg.total_steps(batcher.batches_per_epoch)
    optimizer = build_optimizer(cfg.learning_rate, total, cfg.warmup_steps, cfg.min_lr, cfg.weight_decay)
    fp = json.loads(json.dumps(dict(cfg.fingerprint(), **(fingerprint or {}), train_examples=len(data.train.examples))))
    state = ckpt.TrainState(seed=cfg.seed, fingerprint=fp)
    optimizer.init(model.trainable_parameters())
    if cfg.resume:
        state = _restore(model, optimizer, out_dir, fp, log)
    if cfg.grad_checkpoint:
        enable_grad_checkpoint(model)
    model.train()
    grad_fn = _gradient_function(model, loss_fn, cfg.compile)

    result = TrainResult(step=state.step, total_steps=total)
    pos = Position(state.epoch, state.index)
    main = world.is_main
    bar = None
    if cfg.progress and main:
        bar = tqdm(total=total, initial=state.step, unit="step", dynamic_ncols=True, leave=True)
    mx.reset_peak_memory()
    t_train = 0.0

    def save_all() -> Path:
        path = None
        if main:
            save_fn(model)
            weights = dict(tree_flatten(model.trainable_parameters()))
            path = ckpt.save_checkpoint(out_dir, state, weights, optimizer, cfg.keep_checkpoints)
        return path

    with _InterruptFlag() as interrupt:
        while state.step < total:
            if interrupt.set:
                result.interrupted = True
                break
            tic = time.perf_counter()
            grads, loss_sum, ntok, metric_sums = None, mx.array(0.0), mx.array(0.0), {}
            for _ in range(cfg.grad_accumulation):
                batch = batcher.batch(pos)
                mx.random.seed(_batch_seed(cfg.seed, state.micro_step))
                (s, n, metrics), g = grad_fn(mx.array(state.step), *(mx.array(b) for b in batch))
                grads = g if grads is None else tree_map(mx.add, grads, g)
                loss_sum, ntok = loss_sum + s, ntok + n
                metric_sums = {k: metric_sums.get(k, 0.0) + v for k, v in metrics.items()}
                pos = batcher.advance(pos)
                state.micro_step += 1
            grads, loss_sum, ntok, metric_sums = all_sum((grads, loss_sum, ntok, metric_sums), world)
            denom = mx.maximum(ntok, 1.0)
            grads = tree_map(lambda x: x / denom, grads)
            if cfg.grad_clip > 0:
                grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
            optimizer.update(model, grads)
            mx.eval(model.trainable_parameters(), optimizer.state, loss_sum, ntok, metric_sums)
            t_train += time.perf_counter() - tic
            state.step += 1
            state.epoch, state.index = pos.epoch, pos.index
            loss = (loss_sum / denom).item()
            n_tok = int(ntok.item())
            step_metrics = {k: v.item() / (cfg.grad_accumulation * world.size) for k, v in metric_sums.items()}
            state.tokens += n_tok
            result.tokens += n_tok
            result.losses.append(loss)
            result.metrics.append(step_metrics)
            if on_step is not None:
                on_step(state.step, loss, step_metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{result.tokens / max(t_train, 1e-9):.0f}",
                                lr=f"{float(optimizer.learning_rate):.2e}",
                                peak=f"{mx.get_peak_memory() / 1e9:.2f}GB", refresh=False)
            if data.valid is not None and cfg.steps_per_eval > 0 and (
                state.step % cfg.steps_per_eval == 0 or state.step == total
            ):
                val = evaluate(model, data, cfg.batch_size, world, cfg.val_batches, loss_fn)
                result.val_losses.append((state.step, val))
                if main:
                    msg = f"step {state.step}: val loss {val:.3f}, val ppl {math.exp(min(val, 50)):.2f}"
                    bar.write(msg) if bar is not None else log(msg)
            if cfg.save_every > 0 and state.step % cfg.save_every == 0 and state.step < total:
                result.checkpoint = save_all()
        result.checkpoint = save_all()
    if bar is not None:
        bar.close()
    result.step = state.step
    result.seconds = t_train
    result.peak_memory_gb = mx.get_peak_memory() / 1e9
    if result.interrupted and main:
        log(f"interrupted at step {state.step}: checkpoint saved to {result.checkpoint}; continue with --resume")
    return result


def _restore(model: nn.Module, optimizer, out_dir: Path, fingerprint: dict, log=print) -> ckpt.TrainState:
    path, (state, weights, opt_tree) = ckpt.load_latest_good(out_dir, log)
    for k, v in fingerprint.items():
        if k in state.fingerprint and state.fingerprint[k] != v:
            raise TrainingError(f"--resume: {k} was {state.fingerprint[k]!r} in {path.name} but is now {v!r}; "
                                "use the original settings or start a new --adapter-path")
    params = dict(tree_flatten(model.trainable_parameters()))
    if set(params) != set(weights) or any(params[k].shape != weights[k].shape for k in params):
        raise TrainingError(f"--resume: {path} holds different trainable weights than this run "
                            "(other targets, rank or model?); use the original settings")
    model.load_weights(list(weights.items()), strict=False)
    flat = dict(tree_flatten(opt_tree))
    optimizer.state = tree_map_with_path(lambda p, x: flat.get(p, x), optimizer.state)
    mx.eval(model.parameters(), optimizer.state)
    return state
