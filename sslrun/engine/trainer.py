"""The pretraining loop: views -> method -> loss -> optimizer step, with monitors and checkpoints."""

from __future__ import annotations

import random
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from ..data.augment import normalize
from ..data.batches import make_batches
from ..data.image_set import DatasetSplits
from ..errors import SslrunError
from ..methods.base import FitInfo, Method, TrainState
from ..monitor.progress import stats_line, training_progress
from ..monitor.recorder import TrainingMonitor
from ..monitor.spikes import Spike
from .. import dist
from ..checkpoint import save_checkpoint
from .optim import build_optimizers, set_schedules
from .signals import StopRequested, StopSignals

PRINT_EVERY_S = 30  # without a terminal (logs, CI, a pipe): a progress line at least this often


@dataclass
class TrainResult:
    epochs: float
    steps: int
    seconds: float
    imgs_per_s: float
    stopped_by: str
    spikes: list[Spike] = field(default_factory=list)
    knn_monitor: list[dict] = field(default_factory=list)


def _rng_states(aug_gen: torch.Generator) -> dict:
    """Every random stream a step can draw from: the views' generator and the global ones that methods use
    (MoCo's key shuffle, head re-initialisation, k-means seeds). Without them a resume is not exact."""
    states = {"augment": aug_gen.get_state(), "torch": torch.get_rng_state(), "numpy": np.random.get_state(),
              "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(aug_gen: torch.Generator, states: dict) -> None:
    aug_gen.set_state(states["augment"])
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Under several processes, ``optimizer``'s gradients averaged over them in one flat all-reduce (what DDP
    does during backward for the methods it wraps; a method that owns its step calls its networks past it)."""
    if dist.world_size() == 1:
        return
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if grads:
        flat = dist.all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
        for g, avg in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(avg.view_as(g))


class Pretrainer:
    """Owns one pretraining run. ``cfg`` is the whole composed config (trainer, optimizer, monitor).

    ``resume`` is a loaded checkpoint to continue (already checked against ``cfg`` by the caller); the run
    then continues at its step, mid-epoch included, with every random stream where it was.
    """

    def __init__(self, method: Method, augment: nn.Module, splits: DatasetSplits, cfg: DictConfig,
                 device: torch.device, autocast_dtype: torch.dtype | None, run_dir: Path,
                 writer: SummaryWriter, console: Console, resume: dict | None = None) -> None:
        self.method, self.augment, self.splits, self.cfg = method, augment, splits, cfg
        self.device, self.autocast_dtype, self.run_dir = device, autocast_dtype, run_dir
        self.writer, self.console, self.resume = writer, console, resume
        self.ckpt_path = run_dir / "checkpoints" / "last.pt"
        t = cfg.trainer
        # The in-memory dataset lives on the GPU when it fits (a batch is then one gather); a streamed one is
        # decoded by worker processes.
        self.batches = make_batches(splits.pretrain, cfg.dataset, t.batch_size, device, t.seed, dist.rank(),
                                    dist.world_size())
        self.aug_gen = torch.Generator(device=device).manual_seed(t.seed + 1 + 1000 * dist.rank())
        self.steps_per_epoch = len(self.batches)
        self.total_steps = t.epochs * self.steps_per_epoch
        self.budget_s = t.max_minutes * 60 if t.max_minutes else None
        self.channels_last = bool(t.channels_last)
        method.to(device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        model: nn.Module = method
        if dist.world_size() > 1:
            if t.sync_batchnorm:
                method.convert_sync_batchnorm()
            # Gradients are averaged over processes during backward; buffers (queues, banks, centres) are kept in
            # step by the methods' own gathers, so DDP need not broadcast them every step. A method that owns its
            # step calls its networks directly, past DDP's forward: its gradients are averaged in _own_step.
            if not method.owns_step():
                with warnings.catch_warnings():  # its successor, forward_sync_buffers, is not in every torch we support
                    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                    model = DistributedDataParallel(method, device_ids=[device] if device.type == "cuda" else None,
                                                    broadcast_buffers=False)
        self.model = torch.compile(model) if t.compile else model
        self.state = TrainState()
        # "main" (the optimizer group over param_groups()) and the ones a method names (a GAN's two), each with
        # its own lr schedule and checkpoint state.
        self.optimizers = build_optimizers(cfg.optimizer, method, t.batch_size)
        self.monitor = TrainingMonitor(method, splits, cfg, device, autocast_dtype, writer, run_dir, self._non_finite)
        self.result = TrainResult(0.0, 0, 0.0, 0.0, "epochs")
        self._seconds_before = 0.0  # time spent before a resume

    # ---- checkpoints -------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        if not dist.is_main():  # rank 0 owns the run directory; every rank holds the same weights
            return
        save_checkpoint({
            "method": self.method.state_dict(), "backbone": self.method.eval_backbone().state_dict(),
            "optimizer": {name: o.optimizer.state_dict() for name, o in self.optimizers.items()},
            "state": asdict(self.state),
            "seconds": self._elapsed(), "monitor": self.monitor.state_dict(), "rng": _rng_states(self.aug_gen),
            "epoch_start": self._epoch_start,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }, self.ckpt_path)

    def _load(self, ck: dict) -> None:
        try:
            self.method.load_state_dict(ck["method"])
            saved = ck["optimizer"]
            saved = {"main": saved} if "param_groups" in saved else saved  # written before named optimizers
            if set(saved) != set(self.optimizers):
                raise KeyError(f"optimizers {sorted(saved)} in the checkpoint, {sorted(self.optimizers)} in this run")
            for name, o in self.optimizers.items():
                # The checkpoint brings the optimizer's state (momenta); its hyperparameters (base lr, weight
                # decay, ...) stay the ones this run's config gives, which differ only under resume_force.
                hyper = [{k: v for k, v in g.items() if k != "params"} for g in o.optimizer.param_groups]
                o.optimizer.load_state_dict(saved[name])
                for group, h in zip(o.optimizer.param_groups, hyper):
                    group.update(h)
        except (RuntimeError, ValueError, KeyError) as e:
            raise SslrunError(f"The checkpoint {self.ckpt_path} does not match this run's model or optimizer "
                              f"({str(e).splitlines()[0]}). Resume with the config it was written with, or set "
                              "trainer.resume=never.") from e
        self.state = TrainState(**ck["state"])
        self._seconds_before = ck["seconds"]
        self.monitor.load_state_dict(ck["monitor"])
        _set_rng_states(self.aug_gen, ck["rng"])
        self.console.print(f"Resumed at epoch {self.state.epoch}, step {self.state.step}.")

    # ---- monitors ----------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return self._seconds_before + time.perf_counter() - self._t0

    def _non_finite(self, step: int, value: float) -> None:
        good = (f"the last good checkpoint, {self.ckpt_path}, is intact" if self.ckpt_path.is_file()
                else "no checkpoint had been written yet")
        raise SslrunError(
            f"The training loss became non-finite ({value}) at step {step}; the run stopped there and {good}. "
            "This usually means the learning rate is too high for this batch size or method: lower "
            "optimizer.lr, add warmup with optimizer.warmup_epochs, or try trainer.precision=fp32.")

    # ---- the loop ----------------------------------------------------------------------------
    @torch.no_grad()
    def _map_dataset(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        images, bs = self.splits.pretrain.images, self.cfg.eval.batch_size

        def shard(lo: int, hi: int) -> torch.Tensor:  # each process maps its shard; all get every row
            out = []
            for i in range(lo, hi, bs):
                x = normalize(images[i:min(i + bs, hi)].to(self.device, non_blocking=True), self.splits.mean,
                              self.splits.std)
                with self._autocast():
                    out.append(fn(x))
            return torch.cat(out)

        return dist.map_sharded(images.shape[0], shard)

    def _expected_steps(self) -> int:
        """Steps the run will take: the epochs' count, or fewer where trainer.max_minutes ends it first (the
        progress bar's total, so that its ETA is the budget's)."""
        p = self.state.progress
        return min(self.total_steps, round(self.state.step / p)) if p > 0 else self.total_steps

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def _step(self, images: torch.Tensor, index: torch.Tensor) -> tuple[dict, float]:
        """One training step with the method's hooks in order; returns the method's outputs and the lr."""
        st = self.state
        st.progress = st.step / self.total_steps
        if self.budget_s:
            st.progress = max(st.progress, self._elapsed() / self.budget_s)
        lr = set_schedules(self.optimizers, st.progress, self.cfg.trainer.epochs)
        views = self.augment(images, self.aug_gen)
        if st.step == 0:
            self.monitor.preview(images, views)
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        if self.method.owns_step():
            out = self._own_step(views, index)
        else:
            with self._autocast():
                out = self.model(views, index)
            optimizers = [o.optimizer for o in self.optimizers.values()]
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            self.method.on_after_backward(st)
            if self.monitor.after_backward():  # gradient magnitudes; False = skip this spike
                for opt in optimizers:
                    opt.step()
        st.step += 1
        self.method.on_after_step(st)
        return out, lr

    def _own_step(self, views: list[torch.Tensor], index: torch.Tensor) -> dict:
        """``Method.training_step``: the method calls ``step(name, loss)`` for each update (a GAN: discriminator,
        then generator). Each call backpropagates, averages the gradients over processes, runs
        ``on_after_backward`` and steps that optimizer; the gradient monitor (and ``on_spike``) reads the first."""
        for o in self.optimizers.values():
            o.optimizer.zero_grad(set_to_none=True)
        taken: list[str] = []

        def step(name: str, loss: torch.Tensor) -> None:
            if name not in self.optimizers:
                raise SslrunError(f"{type(self.method).__name__}.training_step stepped optimizer {name!r}, but the "
                                  f"run has {', '.join(self.optimizers)}; name one of its named_optimizers().")
            opt = self.optimizers[name].optimizer
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _average_gradients(opt)
            self.method.on_after_backward(self.state)
            go = self.monitor.after_backward() if not taken else True
            taken.append(name)
            if go:
                opt.step()

        with self._autocast():
            out = self.method.training_step(views, index, step, self.state)
        if not taken:
            raise SslrunError(f"{type(self.method).__name__}.training_step returned without calling step(name, loss): "
                              "a method that owns its step must take at least one optimizer step.")
        return out

    def _print_line(self) -> None:
        """A plain progress line, for output that is not a terminal (a bar redrawn in place prints nothing)."""
        self._printed_at = time.perf_counter()
        # Counted from 1 and by the steps taken, so that the last step of epoch 1 reads "epoch 1/E", not "epoch 1"
        # (epochs completed) beside "step 7/7" of a one-epoch run.
        epoch = max(1, -(-self.state.step // self.steps_per_epoch))
        self.console.print(f"epoch {epoch}/{self.cfg.trainer.epochs}  step {self.state.step}/{self._expected_steps()}  "
                           f"{stats_line(self.monitor.last)}  {self._elapsed():.0f} s")

    def _estimate_line(self, ips: float) -> None:
        """On a CPU, the run's expected length from the speed of its second step, and a faster command."""
        if self.device.type != "cpu" or self.budget_s or not dist.is_main():
            return
        hours = (self.total_steps - self.state.step) * self.cfg.trainer.batch_size / ips / 3600
        if hours > 0.5:
            self.console.print(
                f"[yellow]No GPU: at {ips:.0f} img/s on this CPU the {self.cfg.trainer.epochs} epochs will take about "
                f"{hours:.1f} h.[/yellow] For a first result in minutes try `sslrun experiment=fmnist_simclr` "
                "(6 min), or cap this run with trainer.max_minutes=<N> (the schedules anneal to it).")

    def fit(self) -> TrainResult:
        t = self.cfg.trainer
        self.method.on_fit_start(FitInfo(len(self.splits.pretrain), self.steps_per_epoch, self.total_steps,
                                         t.epochs, self._map_dataset, labels=self.splits.pretrain.labels,
                                         mean=self.splits.mean, std=self.splits.std,
                                         captions=getattr(self.splits.pretrain, "captions", None)))
        self._t0 = time.perf_counter()
        self._epoch_start = asdict(self.state)  # the state on_epoch_start last saw
        if self.resume is not None:
            if self.resume["state"]["step"] % self.steps_per_epoch and "epoch_start" in self.resume:
                # Resumed mid-epoch: the hook's derived settings (DINO's teacher temperature) are set again as
                # at that epoch's start; whatever tensors it computed are then overwritten by the checkpoint's.
                self._epoch_start = self.resume["epoch_start"]
                self.method.on_epoch_start(TrainState(**self._epoch_start))
            self._load(self.resume)
        self.monitor.restart_clock()
        self.method.train()
        self._printed_at = None
        stopped_by, out, first_session_step, t_prev_step = None, None, self.state.step, 0.0
        with StopSignals() as signals, training_progress(self.console) as bar:
            task = bar.add_task("pretrain", total=self.total_steps, completed=self.state.step,
                                stats=stats_line(self.monitor.last))
            while self.state.epoch < t.epochs and stopped_by is None:
                start = self.state.step - self.state.epoch * self.steps_per_epoch  # > 0 when resumed mid-epoch
                if start == 0:
                    self._epoch_start = asdict(self.state)
                    self.method.on_epoch_start(self.state)
                    for p in self.method.params_to_reset():
                        for o in self.optimizers.values():
                            o.optimizer.state.pop(p, None)
                for images, index in self.batches.epoch(self.state.epoch, start):
                    out, lr = self._step(images, index)
                    st = self.state
                    if st.step - first_session_step <= 2:  # the second step's speed: the first one warms up
                        if st.step - first_session_step == 2:
                            self._estimate_line(self.cfg.trainer.batch_size / (time.perf_counter() - t_prev_step))
                        t_prev_step = time.perf_counter()
                    terms = {k: v for k, v in out.items() if k not in ("loss", "z") and v.ndim == 0}
                    if self.monitor.after_step(st, out["loss"], out["z"].detach(), lr, terms):
                        bar.update(task, completed=st.step, total=self._expected_steps(),
                                   stats=stats_line(self.monitor.last))
                        if not self.console.is_terminal and (self._printed_at is None or
                                                             time.perf_counter() - self._printed_at > PRINT_EVERY_S):
                            self._print_line()
                    stopped_by = self._should_stop(signals)
                    if stopped_by:
                        break
                else:
                    self.state.epoch += 1
                    self.monitor.end_epoch(self.state, None if out is None else out["z"].detach())
                    if self.state.epoch % t.checkpoint_every == 0 and self.state.epoch < t.epochs:
                        self._checkpoint()
                    self.monitor.restart_clock()  # images/s counts training, not checkpoints
                if out is not None:
                    self.monitor.flush(out["z"].detach())
                bar.update(task, completed=self.state.step, total=self._expected_steps(),
                           stats=stats_line(self.monitor.last))
                if not self.console.is_terminal:
                    self._print_line()
            self._checkpoint()
            if stopped_by == "signal":
                self._stop_on_signal(signals)
        r = self.result
        r.stopped_by = stopped_by or "epochs"
        r.spikes, r.knn_monitor = self.monitor.spikes, self.monitor.knn_records
        r.steps = self.state.step
        r.seconds = self._elapsed()
        r.epochs = self.state.step / self.steps_per_epoch
        r.imgs_per_s = r.steps * t.batch_size / max(1e-9, r.seconds)  # over every session of a resumed run
        return r

    def _should_stop(self, signals: StopSignals) -> str | None:
        """"signal", "max_minutes" or None. Processes must stop at the same step (or the others would wait in
        a collective forever): with several, they agree at log steps through one all-reduce of the flags."""
        flags = [signals.received is not None, bool(self.budget_s) and self._elapsed() >= self.budget_s]
        if dist.world_size() > 1:
            if self.state.step % self.cfg.trainer.log_every:
                return None
            flags = dist.all_reduce_max(torch.tensor(flags, dtype=torch.float32, device=self.device)).tolist()
            if flags[0] and signals.received is None:
                signals.received = signal.SIGTERM  # another process was signalled: stop and save here too
        return "signal" if flags[0] else "max_minutes" if flags[1] else None

    def _stop_on_signal(self, signals: StopSignals) -> None:
        signum = signals.received
        name = signal.Signals(signum).name
        msg = (f"Stopped by {name} at epoch {self.state.epoch}, step {self.state.step}; checkpoint written to "
               f"{self.ckpt_path}. Rerun the same command (with hydra.run.dir={self.run_dir}) to continue.")
        self.console.print(msg)
        self.writer.flush()
        signals.chain(signum)  # e.g. submitit's handler requeues the preempted job, which resumes from here
        raise StopRequested(signum, msg)
