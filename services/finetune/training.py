"""One training run: transformers' Trainer (AdamW, warmup + linear/cosine schedule, accumulation, clipping,
checkpoints, resume, early stopping) on a PEFT LoRA adapter or the whole model, reporting through a callback.

Nothing here knows about Redis or Celery: the worker passes `Hooks` that publish metrics, record checkpoints and
say when the job was cancelled, so this module can also be driven in-process (the benchmark does).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import (
    AutoModelForCausalLM,
    EarlyStoppingCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from genloom.services.finetune.data import TrainingExample
from genloom.v1 import finetune_pb2

logger = logging.getLogger(__name__)

IGNORE = -100
# Config attributes that hold a dropout probability, by the names the common architectures use.
_DROPOUT_ATTRIBUTES = (
    "attention_dropout",
    "hidden_dropout",
    "dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
)


class Unsupported(RuntimeError):
    """The device cannot do what the job asks (JOB_ERROR_CODE_UNSUPPORTED)."""


class ModelUnavailable(RuntimeError):
    """The base model could not be loaded (JOB_ERROR_CODE_MODEL_UNAVAILABLE)."""


class Hooks(Protocol):
    def cancelled(self) -> bool:
        """True once the job was cancelled: checked after every optimizer step."""

    def preempted(self) -> bool:
        """True once the worker is shutting down: the run saves a checkpoint at once and stops (to be resumed
        elsewhere). Checked after every optimizer step."""

    def metrics(self, metrics: finetune_pb2.JobMetrics) -> None:
        """Training (or validation) metrics at a step."""

    def checkpoint(self, checkpoint: finetune_pb2.Checkpoint, kept: Sequence[str]) -> None:
        """A checkpoint was saved; `kept` names every checkpoint directory still on disk."""


@dataclass
class RunResult:
    cancelled: bool
    preempted: bool
    steps: int
    trained_tokens: int
    best_validation_loss: float | None
    final_metrics: finetune_pb2.JobMetrics
    result_path: Path | None = None


class ExampleDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, examples: Sequence[TrainingExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        e = self.examples[i]
        return {"input_ids": e.input_ids, "labels": e.labels}


class PadCollator:
    """Right-pads a batch to its longest example; padding is masked out of attention and loss."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def choose_precision(precision: int) -> str:
    """ "bf16", "fp16" or "fp32" for this machine; Unsupported when the job insists on what it lacks."""
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == finetune_pb2.PRECISION_BF16:
        if not bf16:
            raise Unsupported("PRECISION_BF16 needs a CUDA device with bf16 support; this worker has none")
        return "bf16"
    if precision == finetune_pb2.PRECISION_FP16:
        if not cuda:
            raise Unsupported("PRECISION_FP16 needs a CUDA device; this worker has none")
        return "fp16"
    if precision == finetune_pb2.PRECISION_FP32:
        return "fp32"
    return "bf16" if bf16 else "fp32"


def total_steps(n_train: int, hp: finetune_pb2.Hyperparameters) -> int:
    """Optimizer steps the run will take, as Trainer counts them."""
    if hp.max_steps:
        return int(hp.max_steps)
    batches = math.ceil(n_train / hp.batch_size)
    per_epoch = max(batches // hp.gradient_accumulation_steps, 1)
    return per_epoch * hp.epochs


def load_model(base_path: Path, method: int, hp: finetune_pb2.Hyperparameters) -> Any:
    kwargs: dict[str, Any] = {}
    if hp.HasField("dropout"):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(base_path)
        for name in _DROPOUT_ATTRIBUTES:
            if hasattr(config, name):
                kwargs[name] = hp.dropout
    try:
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelUnavailable(f"the base model could not be loaded from {base_path}: {err}") from err
    if method == finetune_pb2.FINE_TUNE_METHOD_FULL:
        return model
    from peft import LoraConfig, get_peft_model

    targets: Any = list(hp.lora_target_modules) or None
    if targets == ["all-linear"]:
        targets = "all-linear"
    config = LoraConfig(
        r=hp.lora_rank,
        lora_alpha=hp.lora_alpha,  # type: ignore[arg-type]  # peft annotates it int; any number works (alpha / r)
        lora_dropout=hp.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def training_arguments(
    out_dir: Path, hp: finetune_pb2.Hyperparameters, *, n_train: int, has_validation: bool, precision: str
) -> TrainingArguments:
    steps = total_steps(n_train, hp)
    warmup = hp.warmup_steps or math.ceil(hp.warmup_ratio * steps)
    eval_every = hp.eval_interval_steps or hp.checkpoint_interval_steps
    early = has_validation and hp.early_stopping_patience > 0
    return TrainingArguments(
        output_dir=str(out_dir),
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps or -1,
        per_device_train_batch_size=hp.batch_size,
        per_device_eval_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        learning_rate=hp.learning_rate,
        warmup_steps=warmup,
        lr_scheduler_type="cosine" if hp.lr_scheduler == finetune_pb2.LR_SCHEDULER_COSINE else "linear",
        weight_decay=hp.weight_decay,
        optim="adamw_torch",
        max_grad_norm=hp.max_grad_norm,
        seed=hp.seed,
        data_seed=hp.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=hp.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if hp.gradient_checkpointing else None,
        logging_strategy="steps",
        logging_steps=hp.logging_interval_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=hp.checkpoint_interval_steps,
        save_total_limit=hp.max_checkpoints,
        eval_strategy="steps" if has_validation else "no",
        eval_steps=eval_every if has_validation else None,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        include_num_input_tokens_seen="non_padding",
        restore_callback_states_from_checkpoint=True,  # early stopping's patience survives a resume
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        save_only_model=False,
    )


class _Reporter(TrainerCallback):
    """Turns Trainer's logs, evaluations and saves into hook calls, and stops the run when the job is cancelled."""

    def __init__(self, hooks: Hooks, out_dir: Path) -> None:
        self.hooks = hooks
        self.out_dir = out_dir
        self.cancelled = False
        self.preempted = False
        self.best_validation_loss: float | None = None
        self.last_train_loss: float | None = None
        self.last_eval_loss: float | None = None
        self.last_eval_step = -1
        self.last_saved_step = -1
        self._mark: tuple[float, int, int] | None = None  # (time, tokens, step) at the previous training log
        self._started = time.monotonic()
        self._start_step = 0

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._started = time.monotonic()
        self._start_step = state.global_step
        self._mark = (self._started, state.num_input_tokens_seen, state.global_step)

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.hooks.cancelled():
            self.cancelled = True
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False
            control.should_log = False
        elif self.hooks.preempted():
            self.preempted = True
            control.should_training_stop = True
            control.should_save = True  # a checkpoint at this very step: the next worker resumes from here
            control.should_evaluate = False

    def on_epoch_end(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        stopping = self.cancelled or self.preempted or control.should_training_stop
        if not stopping and state.global_step < state.max_steps and self.last_saved_step != state.global_step:
            control.should_save = True  # a checkpoint at the end of every epoch (the last step saves anyway)

    def on_log(
        self, args: Any, state: TrainerState, control: TrainerControl, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        logs = logs or {}
        if "train_loss" in logs or self.cancelled or self.preempted:  # the run's closing summary, not a step
            return
        m = self.base_metrics(state)
        if "eval_loss" in logs:
            loss = float(logs["eval_loss"])
            self.last_eval_loss = loss
            self.last_eval_step = state.global_step
            if self.best_validation_loss is None or loss < self.best_validation_loss:
                self.best_validation_loss = loss
            m.validation_loss = loss
        elif "loss" in logs:
            self.last_train_loss = float(logs["loss"])
            m.train_loss = self.last_train_loss
            if "learning_rate" in logs:
                m.learning_rate = float(logs["learning_rate"])
            if logs.get("grad_norm") is not None:
                m.grad_norm = float(logs["grad_norm"])
            now = time.monotonic()
            if self._mark is not None and now > self._mark[0] and state.num_input_tokens_seen > self._mark[1]:
                m.tokens_per_second = (state.num_input_tokens_seen - self._mark[1]) / (now - self._mark[0])
            done = state.global_step - self._start_step
            if done > 0 and state.max_steps:
                m.eta_seconds = (now - self._started) / done * max(state.max_steps - state.global_step, 0)
            self._mark = (now, state.num_input_tokens_seen, state.global_step)
        else:
            return
        self.hooks.metrics(m)

    def on_save(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.last_saved_step = state.global_step
        name = f"checkpoint-{state.global_step}"
        path = self.out_dir / name
        ckpt = finetune_pb2.Checkpoint(
            name=name,
            step=state.global_step,
            epoch=float(state.epoch or 0.0),
            path=str(path),
            size_bytes=_size(path),
        )
        ckpt.created_at.GetCurrentTime()
        if self.last_train_loss is not None:
            ckpt.train_loss = self.last_train_loss
        evaluated = [h for h in state.log_history if "eval_loss" in h and h.get("step") == state.global_step]
        if evaluated:
            ckpt.validation_loss = float(evaluated[-1]["eval_loss"])
        kept = sorted(p.name for p in self.out_dir.glob("checkpoint-*") if p.is_dir())
        self.hooks.checkpoint(ckpt, kept)

    def base_metrics(self, state: TrainerState) -> finetune_pb2.JobMetrics:
        return finetune_pb2.JobMetrics(
            step=state.global_step,
            total_steps=state.max_steps,
            epoch=float(state.epoch or 0.0),
            trained_tokens=int(state.num_input_tokens_seen),
        )


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def run(
    *,
    method: int,
    hp: finetune_pb2.Hyperparameters,
    base_path: Path,
    pad_id: int,
    train: Sequence[TrainingExample],
    validation: Sequence[TrainingExample],
    out_dir: Path,
    result_dir: Path,
    hooks: Hooks,
    resume_from: Path | None = None,
    save_files: Sequence[Path] = (),
) -> RunResult:
    """Train; on success save the adapter (or model) to `result_dir` with `save_files` (tokenizer files) beside
    it. A cancelled run saves nothing further and returns cancelled=True."""
    precision = choose_precision(hp.precision)
    torch.manual_seed(hp.seed)
    model = load_model(base_path, method, hp)
    if hp.gradient_checkpointing and method == finetune_pb2.FINE_TUNE_METHOD_LORA:
        model.enable_input_require_grads()
    args = training_arguments(out_dir, hp, n_train=len(train), has_validation=bool(validation), precision=precision)
    reporter = _Reporter(hooks, out_dir)
    callbacks: list[TrainerCallback] = [reporter]
    if validation and hp.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(hp.early_stopping_patience, hp.early_stopping_threshold))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ExampleDataset(train),
        eval_dataset=ExampleDataset(validation) if validation else None,
        data_collator=PadCollator(pad_id),
        callbacks=callbacks,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # progress goes to the job's events, not the worker's stdout
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    state = trainer.state
    if reporter.cancelled or reporter.preempted:
        return _result(reporter, state, cancelled=reporter.cancelled, preempted=reporter.preempted)
    if validation and reporter.last_eval_step != state.global_step:
        # The last step was not an evaluation step: evaluate the final weights so the job (and a sweep) always
        # has a validation loss for what it produced.
        trainer.evaluate()
    result = _result(reporter, state, cancelled=False, preempted=False)
    tmp = result_dir.with_name(result_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    # A PreTrainedModel or a PeftModel, both with save_pretrained (transformers types it as any torch Module).
    trained: Any = trainer.model
    trained.save_pretrained(tmp)
    for f in save_files:
        shutil.copy2(f, tmp / f.name)
    shutil.rmtree(result_dir, ignore_errors=True)
    os.replace(tmp, result_dir)
    result.result_path = result_dir
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _result(reporter: _Reporter, state: TrainerState, *, cancelled: bool, preempted: bool) -> RunResult:
    final = reporter.base_metrics(state)
    if reporter.last_train_loss is not None:
        final.train_loss = reporter.last_train_loss
    if reporter.last_eval_loss is not None:
        final.validation_loss = reporter.last_eval_loss
    return RunResult(
        cancelled=cancelled,
        preempted=preempted,
        steps=state.global_step,
        trained_tokens=int(state.num_input_tokens_seen),
        best_validation_loss=reporter.best_validation_loss,
        final_metrics=final,
    )
