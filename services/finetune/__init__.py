"""FineTuningService and its Celery workers: fine-tuning jobs (LoRA or full) queued through Redis, their events,
checkpoints, cancellation, resume after a worker dies, hyperparameter sweeps, and the registration
(services/models/finetuned.py) that lets the inference, tokenizer and task services serve a finished job's model as
"ft:<base>:<suffix>:<job-id>"."""
