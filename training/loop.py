"""The training loop, on ``accelerate``: one loop for pretraining and finetuning.

    accelerator = make_accelerator(train_cfg)
    trainer = Trainer(model, train_cfg, train_rows, eval_rows, run_dir=RUN, accelerator=accelerator,
                      callbacks=[MyCallback()])
    state = trainer.train(resume=True)        # continues from RUN/checkpoints/step-* if any

Data are rows of token ids (column ``input_ids``, [n_ctx] each): a ``datasets.Dataset`` (shuffled by a
permutation seeded with ``(seed, epoch)``) or an ``IterableDataset`` (streamed; buffer-shuffled with
the same seed). The data position is (epoch, micro-batches consumed in it); resuming rebuilds that
epoch's order and skips the consumed batches with accelerate's ``skip_first_batches``, so an
interrupted and resumed run sees exactly the batches, noise and updates of an uninterrupted one.

One optimizer step = ``batch_size / (micro_batch_size x processes)`` micro-batches under
``accelerator.accumulate``; optimizer and schedule come from ``training.optim``, the accelerate set-up
(and deterministic CPU kernels) from ``training.accel``. SIGINT/SIGTERM end training after the step in
progress with a checkpoint (``training.interrupt``); a resume drops ``metrics.jsonl`` lines logged
after its checkpoint, so each step appears once.

Extension points (what finetuning uses):

* ``callbacks``: objects with any of ``on_train_start(trainer)``, ``on_step_start(trainer)`` (before
  the step's first micro-batch; ``trainer.state.tokens_seen`` counts tokens trained on so far),
  ``on_step_end(trainer, metrics)`` (add entries to ``metrics`` to log them), ``on_evaluate(trainer,
  metrics)`` and ``on_train_end(trainer)``.
* ``trainer.state.extra``: a dict of scalars (e.g. ``{"beta": 0.4}``) saved in every checkpoint and
  restored exactly (pickled Python floats) before ``on_train_start`` runs on resume.
* ``loss_fn(model, input_ids) -> scalar loss``: default ``model(input_ids, return_type="loss")``.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
import signal
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from accelerate.utils import set_seed
from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from training.accel import (  # noqa: F401  (re-exported: the loop's public set-up helpers)
    deterministic_kernels,
    distributed_state,
    grad_accum_steps,
    make_accelerator,
    resolve_mixed_precision,
)
from training.optim import lr_multiplier, make_optimizer, param_groups  # noqa: F401  (re-exported)
from training.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
from training.interrupt import StopSignals, TrainingInterrupted
from training.run_config import TrainConfig
from training.run_folder import truncate_metrics

@dataclass
class TrainState:
    """Progress of a run; saved in every checkpoint (registered with the accelerator)."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # tokens trained on, over all processes
    epoch: int = 0  # passes over the training data started
    batches_in_epoch: int = 0  # micro-batches (per process) consumed in the current epoch
    extra: dict = field(default_factory=dict)  # callbacks' scalars, e.g. {"beta": 0.5}

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, dict(value) if key == "extra" else value)


# --- building blocks ----------------------------------------------------------------------------


def noise_hooks(model: Any, input_noise: float, latent_noise: float) -> list[tuple[str, Callable]]:
    """Forward hooks adding Gaussian noise (std relative to each position's RMS) in training only.

    input noise: on ``hook_embed`` (token embeddings); latent noise: on the residual stream entering
    every block after the first (``blocks.{l}.hook_resid_pre``, l >= 1). In eval mode they are no-ops.
    """

    def make(std: float) -> Callable:
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            if not hook.training:
                return x
            rms = x.detach().float().pow(2).mean(-1, keepdim=True).sqrt().to(x.dtype)
            return x + std * rms * torch.randn_like(x)

        return hook

    hooks = [("hook_embed", make(input_noise))] if input_noise > 0 else []
    if latent_noise > 0:
        hooks += [(f"blocks.{l}.hook_resid_pre", make(latent_noise)) for l in range(1, model.cfg.n_layers)]
    return hooks


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each block's activations in backward instead of storing them (RNG preserved, so
    noise hooks draw the same noise twice)."""
    for block in model.blocks:
        forward = block.forward
        block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def default_loss(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids, return_type="loss")


# --- the trainer --------------------------------------------------------------------------------


class Trainer:
    """Runs ``cfg`` on ``model`` with ``train_data``; see the module docstring for the contract."""

    def __init__(
        self,
        model: Any,
        cfg: TrainConfig,
        train_data: Any,
        eval_data: Any = None,
        *,
        run_dir: str | Path,
        accelerator: Optional[Accelerator] = None,
        callbacks: Sequence[Any] = (),
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] = default_loss,
        eval_rows: int = 256,
        seq_len: Optional[int] = None,
    ):
        self.cfg = cfg
        self.accelerator = accelerator or make_accelerator(cfg)
        self.run_dir = Path(run_dir)
        self.callbacks = list(callbacks)
        self.loss_fn = loss_fn
        self.state = TrainState()
        self.last_lr = cfg.lr
        self.train_data = train_data
        acc = self.accelerator
        self.grad_accum = grad_accum_steps(cfg, acc.num_processes)
        self.seq_len = seq_len or model.cfg.n_ctx  # tokens per row, for max_tokens and logging
        self.tokens_per_step = cfg.batch_size * self.seq_len
        self.total_steps = cfg.total_steps(self.tokens_per_step)

        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        optimizer = make_optimizer(model, cfg, acc.device)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        # Not prepared: accelerate would step it once per process; we step it once per update.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer.optimizer, lr_multiplier(cfg, self.total_steps))
        acc.register_for_checkpointing(self.scheduler)
        acc.register_for_checkpointing(self.state)
        self.eval_tokens = self._eval_tokens(eval_data, eval_rows)
        self._saved_step: Optional[int] = None  # step of the newest checkpoint this run wrote or loaded

    @property
    def raw_model(self) -> Any:
        """The model without DDP/FSDP wrappers (for hooks, ``set_gate_beta``, saving)."""
        return self.accelerator.unwrap_model(self.model)

    # --- data ---------------------------------------------------------------------------------

    def _epoch_loader(self, epoch: int) -> Iterator[torch.Tensor]:
        """This process's micro-batches of ``epoch``, after the ones already consumed."""
        acc, cfg, data = self.accelerator, self.cfg, self.train_data
        if isinstance(data, IterableDataset):
            data = data.shuffle(seed=cfg.seed, buffer_size=10_000)
            data.set_epoch(epoch)
            data = split_dataset_by_node(data, acc.process_index, acc.num_processes).with_format("torch")
            loader = DataLoader(data, batch_size=cfg.micro_batch_size, drop_last=True)
        else:
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
            loader = DataLoader(
                data.with_format("torch", columns=["input_ids"]), batch_size=cfg.micro_batch_size,
                sampler=order.tolist(), drop_last=True,
            )
            # Shards whole micro-batches across processes (rank r takes batches r, r + N, ...).
            loader = prepare_data_loader(
                loader, num_processes=acc.num_processes, process_index=acc.process_index, rng_types=[]
            )
        if self.state.batches_in_epoch:
            loader = skip_first_batches(loader, self.state.batches_in_epoch)
        batches = iter(loader)
        while True:
            # Loading must not touch the global RNG (DataLoader iterators draw a base seed from it,
            # and a resumed run creates one more): the noise stream then depends only on the steps.
            rng = torch.get_rng_state()
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                torch.set_rng_state(rng)
            yield batch["input_ids"].to(acc.device, torch.long)

    def _micro_batches(self) -> Iterator[torch.Tensor]:
        """Micro-batches forever, epoch after epoch, keeping ``state`` at the data position."""
        while True:
            empty = True
            for tokens in self._epoch_loader(self.state.epoch):
                empty = False
                self.state.batches_in_epoch += 1
                yield tokens
            if empty:
                raise ValueError(
                    f"the training data gives no full micro-batch of {self.cfg.micro_batch_size} rows per process "
                    f"({self.accelerator.num_processes} processes): use more data or a smaller train.micro_batch_size"
                )
            self.state.epoch += 1
            self.state.batches_in_epoch = 0

    def _eval_tokens(self, eval_data: Any, max_rows: int) -> Optional[torch.Tensor]:
        """This process's share (rows r, r + N, ...) of the first ``max_rows`` validation rows."""
        if eval_data is None:
            return None
        rows = [r["input_ids"] for r in islice(iter(eval_data), max_rows)]
        if not rows:
            return None
        acc = self.accelerator
        return torch.tensor(rows, dtype=torch.long)[acc.process_index :: acc.num_processes]

    # --- steps --------------------------------------------------------------------------------

    def _call(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is not None:
                method(self, *args)

    def _step(self, batches: Iterator[torch.Tensor]) -> torch.Tensor:
        """One optimizer update over ``grad_accum`` micro-batches; returns the mean loss (this process)."""
        acc, cfg = self.accelerator, self.cfg
        self.model.train()
        total = torch.zeros((), device=acc.device)
        for _ in range(self.grad_accum):
            tokens = next(batches)
            with acc.accumulate(self.model):
                loss = self.loss_fn(self.model, tokens)
                acc.backward(loss)
                if acc.sync_gradients:
                    if cfg.grad_clip > 0:
                        acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                    self.last_lr = self.optimizer.param_groups[0]["lr"]  # the lr this update used
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
            total += loss.detach().float()
            self.state.tokens_seen += tokens.numel() * acc.num_processes
        self.state.step += 1
        return total / self.grad_accum

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean next-token loss over the validation rows (all processes)."""
        if self.eval_tokens is None:
            return None
        acc, model = self.accelerator, self.raw_model
        model.eval()
        sums = torch.zeros(2, device=acc.device)  # [sum of per-row losses, rows]
        with acc.autocast():
            for chunk in self.eval_tokens.split(self.cfg.micro_batch_size):
                loss = self.loss_fn(model, chunk.to(acc.device))
                sums += torch.stack([loss.float() * len(chunk), torch.tensor(float(len(chunk)), device=acc.device)])
        sums = acc.reduce(sums, reduction="sum")
        model.train()
        return (sums[0] / sums[1].clamp(min=1)).item()

    def save_checkpoint(self) -> Path:
        info = {"state": self.state.state_dict(), "total_steps": self.total_steps, "train": asdict(self.cfg)}
        path = save_checkpoint(self.accelerator, self.run_dir, self.state.step, self.cfg.keep_last, info)
        self._saved_step = self.state.step
        return path

    def resume(self, path: Optional[str | Path] = None) -> bool:
        """Load ``path`` or the run's latest checkpoint; False when there is none."""
        path = path or latest_checkpoint(self.run_dir)
        if path is None:
            return False
        load_checkpoint(self.accelerator, path)
        self._saved_step = self.state.step
        if self.accelerator.is_main_process:
            # Steps logged after this checkpoint (before a crash or interrupt) are replayed now: drop
            # them so metrics.jsonl has each step once.
            truncate_metrics(self.run_dir / "metrics.jsonl", self.state.step)
        self.log_line(f"resumed from {path} at step {self.state.step} ({self.state.tokens_seen:,} tokens)")
        return True

    # --- logging ------------------------------------------------------------------------------

    def log_line(self, text: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(text)

    def _log_metrics(self, metrics: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")

    # --- main loop ----------------------------------------------------------------------------

    def train(self, resume: bool | str | Path = False) -> TrainState:
        """Train to ``total_steps``; ``resume``: True (latest checkpoint, if any) or a checkpoint path.

        On SIGINT/SIGTERM the step in progress is finished, a checkpoint written (every process takes
        part, the main process writes) and ``TrainingInterrupted`` raised (``training.interrupt``).
        """
        acc, cfg = self.accelerator, self.cfg
        resumed = bool(resume) and self.resume(None if resume is True else resume)
        if not resumed:  # a fresh run's noise stream depends on the seed alone (one stream per process)
            set_seed(cfg.seed, device_specific=True)
        self._call("on_train_start")
        hooks = noise_hooks(self.raw_model, cfg.input_noise, cfg.latent_noise)
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc="training", dynamic_ncols=True,
                   disable=not (cfg.progress_bar and acc.is_main_process))
        batches = self._micro_batches()
        self._window = [torch.zeros((), device=acc.device), 0, 0, time.perf_counter()]  # loss, steps, tokens, t0
        try:
            with (self.raw_model.hooks(fwd_hooks=hooks) if hooks else nullcontext()), \
                    deterministic_kernels(acc.device), StopSignals(announce=acc.is_main_process) as signals:
                while self.state.step < self.total_steps:
                    self._call("on_step_start")
                    tokens_before = self.state.tokens_seen
                    loss = self._step(batches)
                    self._window[0] += loss
                    self._window[1] += 1
                    self._window[2] += self.state.tokens_seen - tokens_before
                    bar.update(1)
                    self._after_step(bar)
                    if signals.agreed(acc):
                        self._stop(signals.requested or signal.SIGTERM)
        finally:
            bar.close()
        self._call("on_train_end")
        return self.state

    def _stop(self, signum: int) -> None:
        """Checkpoint the finished step (unless ``_after_step`` just did) and raise ``TrainingInterrupted``."""
        path = checkpoint_path(self.run_dir, self.state.step)
        if self._saved_step != self.state.step:
            path = self.save_checkpoint()
        raise TrainingInterrupted(signum, self.state.step, path)

    def _after_step(self, bar: Any) -> None:
        """Log, evaluate and checkpoint as the config asks (on every process: these synchronise)."""
        cfg, step = self.cfg, self.state.step
        last = step == self.total_steps
        metrics: dict = {}
        if step % cfg.log_every == 0 or last:
            metrics = self._window_metrics()
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if self.eval_tokens is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
            metrics = metrics or {"step": step, "tokens_seen": self.state.tokens_seen}
            metrics["eval_loss"] = self.evaluate()
            self._call("on_evaluate", metrics)
        self._call("on_step_end", metrics)
        if metrics:
            self._log_metrics(metrics)
            if "eval_loss" in metrics or step % (cfg.log_every * 10) == 0:
                self.log_line(self._format(metrics))
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or last):
            self.save_checkpoint()

    def _window_metrics(self) -> dict:
        """Mean train loss (all processes) and throughput since the last log line; resets the window."""
        loss_sum, steps, tokens, start = self._window
        loss = self.accelerator.reduce(loss_sum.clone(), reduction="mean").item() / max(steps, 1)
        seconds = max(time.perf_counter() - start, 1e-9)
        self._window = [torch.zeros_like(loss_sum), 0, 0, time.perf_counter()]
        return {
            "step": self.state.step, "loss": loss, "lr": self.last_lr,
            "tokens_seen": self.state.tokens_seen, "tokens_per_s": tokens / seconds, "epoch": self.state.epoch,
            **{k: v for k, v in self.state.extra.items() if isinstance(v, (int, float))},
        }

    @staticmethod
    def _format(metrics: dict) -> str:
        parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()]
        return "  ".join(parts)
