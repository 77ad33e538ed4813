"""Request checks and defaults of fine-tuning jobs (services/finetune/spec.py): every limit of finetune.proto is
enforced with the exact field path a client sees in google.rpc.BadRequest, and defaults are written out."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from genloom.services.finetune import spec as spec_mod
from genloom.services.finetune.settings import FinetuneSettings
from genloom.services.server.errors import FieldViolation, InvalidArgument
from genloom.v1 import finetune_pb2 as ft
from genloom.v1 import tasks_pb2

SETTINGS = FinetuneSettings()


def valid_spec(**hyperparameters: Any) -> ft.JobSpec:
    spec = ft.JobSpec(training_data=ft.TrainingDataSource(path="data/train.jsonl"))
    for name, value in hyperparameters.items():
        if isinstance(value, list):
            getattr(spec.hyperparameters, name).extend(value)
        else:
            setattr(spec.hyperparameters, name, value)
    return spec


def fields(violations: list[FieldViolation]) -> list[str]:
    return [v.field for v in violations]


def test_a_minimal_spec_is_valid() -> None:
    assert spec_mod.check_job_spec(valid_spec(), SETTINGS) == []
    inline = ft.JobSpec(training_data=ft.TrainingDataSource(jsonl=b'{"prompt": "a", "completion": "b"}\n'))
    assert spec_mod.check_job_spec(inline, SETTINGS) == []


# (field, value, accepted): each hyperparameter limit from finetune.proto, at and just past its edges.
HYPERPARAMETER_CASES: list[tuple[str, Any, bool]] = [
    ("epochs", 1, True),
    ("epochs", 100, True),
    ("epochs", 101, False),
    ("batch_size", 1024, True),
    ("batch_size", 1025, False),
    ("gradient_accumulation_steps", 1024, True),
    ("gradient_accumulation_steps", 1025, False),
    ("learning_rate", 1.0, True),
    ("learning_rate", 1e-7, True),
    ("learning_rate", 1.5, False),
    ("learning_rate", -1e-5, False),
    ("learning_rate", math.nan, False),
    ("learning_rate", math.inf, False),
    ("warmup_ratio", 0.0, True),
    ("warmup_ratio", 0.5, True),
    ("warmup_ratio", 0.51, False),
    ("warmup_ratio", -0.01, False),
    ("warmup_steps", 500, True),
    ("weight_decay", 1.0, True),
    ("weight_decay", 1.01, False),
    ("weight_decay", -0.1, False),
    ("dropout", 0.0, True),
    ("dropout", 0.9, True),
    ("dropout", 0.91, False),
    ("max_seq_length", 16, True),
    ("max_seq_length", 15, False),
    ("max_seq_length", 1, False),
    ("seed", 0, True),
    ("early_stopping_threshold", 0.5, True),
    ("early_stopping_threshold", -0.1, False),
    ("early_stopping_threshold", math.inf, False),
    ("lr_scheduler", ft.LR_SCHEDULER_COSINE, True),
    ("lr_scheduler", 9, False),
    ("precision", ft.PRECISION_FP16, True),
    ("precision", 9, False),
    ("lora_rank", 64, True),
    ("lora_rank", 65, False),
    ("lora_alpha", 1024.0, True),
    ("lora_alpha", 1024.5, False),
    ("lora_alpha", -1.0, False),
    ("lora_dropout", 0.9, True),
    ("lora_dropout", 0.95, False),
    ("lora_target_modules", ["q_proj", "self_attn.v_proj"], True),
    ("lora_target_modules", ["all-linear"], True),
    ("lora_target_modules", ["all-linear", "q_proj"], False),
    ("lora_target_modules", ["q_proj", "q_proj"], False),
    ("lora_target_modules", ["q proj"], False),
    ("lora_target_modules", [""], False),
    ("lora_target_modules", [f"m{i}" for i in range(65)], False),
    ("logging_interval_steps", 10_000, True),
    ("logging_interval_steps", 10_001, False),
    ("max_grad_norm", 0.0, True),
    ("max_grad_norm", -1.0, False),
    ("max_checkpoints", 1, True),
]


@pytest.mark.parametrize(("name", "value", "accepted"), HYPERPARAMETER_CASES)
def test_hyperparameter_limits(name: str, value: Any, accepted: bool) -> None:
    violations = spec_mod.check_job_spec(valid_spec(**{name: value}), SETTINGS)
    if accepted:
        assert violations == []
    else:
        assert fields(violations) == [f"spec.hyperparameters.{name}"], violations
        assert violations[0].description


def test_lora_rank_limit_follows_the_setting() -> None:
    small = FinetuneSettings(finetune_max_lora_rank=16)
    assert spec_mod.check_job_spec(valid_spec(lora_rank=16), small) == []
    violations = spec_mod.check_job_spec(valid_spec(lora_rank=32), small)
    assert fields(violations) == ["spec.hyperparameters.lora_rank"]
    assert "16" in violations[0].description


def _set(path: str, value: Any) -> Callable[[ft.JobSpec], None]:
    def apply(spec: ft.JobSpec) -> None:
        *parents, leaf = path.split(".")
        target: Any = spec
        for p in parents:
            target = getattr(target, p)
        setattr(target, leaf, value)

    return apply


def _clear_training(spec: ft.JobSpec) -> None:
    spec.ClearField("training_data")


def _metadata(entries: dict[str, str]) -> Callable[[ft.JobSpec], None]:
    return lambda spec: spec.metadata.update(entries)


def _task_records(task: int, *labels: str) -> Callable[[ft.JobSpec], None]:
    def apply(spec: ft.JobSpec) -> None:
        spec.data_format = ft.DATA_FORMAT_TASK_RECORDS
        spec.task = task
        for name in labels:
            spec.task_options.labels.add(name=name)

    return apply


# (what to change, the field paths expected; [] = accepted).
SPEC_CASES: list[tuple[str, Callable[[ft.JobSpec], None], list[str]]] = [
    ("default base model", _set("base_model", ""), []),
    ("named base model", _set("base_model", "smollm2-135m-instruct"), []),
    ("fine-tuned base", _set("base_model", "ft:smollm2:x:ftjob-01hzzzzzzzzzzzzzzzzzzzzzzz"), ["spec.base_model"]),
    ("colon in base", _set("base_model", "a:b"), ["spec.base_model"]),
    ("unknown method", _set("method", 7), ["spec.method"]),
    ("no training data", _clear_training, ["spec.training_data"]),
    ("empty training path", _set("training_data.path", ""), ["spec.training_data.path"]),
    ("empty inline data", _set("training_data.jsonl", b""), ["spec.training_data.jsonl"]),
    ("empty validation path", _set("validation_data.path", ""), ["spec.validation_data.path"]),
    ("validation file", _set("validation_data.path", "data/val.jsonl"), []),
    ("unknown data format", _set("data_format", 9), ["spec.data_format"]),
    ("task records without task", _set("data_format", ft.DATA_FORMAT_TASK_RECORDS), ["spec.task"]),
    ("task records with task", _task_records(tasks_pb2.TASK_TYPE_ANSWER), []),
    ("task records labels", _task_records(tasks_pb2.TASK_TYPE_CLASSIFY, "pos", "neg"), []),
    (
        "duplicate task label",
        _task_records(tasks_pb2.TASK_TYPE_CLASSIFY, "pos", "pos"),
        ["spec.task_options.labels[1].name"],
    ),
    ("unknown task", _set("task", 42), ["spec.task"]),
    ("suffix at the limit", _set("suffix", "a" * 40), []),
    ("suffix charset", _set("suffix", "My.model_v-2"), []),
    ("suffix too long", _set("suffix", "a" * 41), ["spec.suffix"]),
    ("suffix with slash", _set("suffix", "bad/suffix"), ["spec.suffix"]),
    ("suffix with colon", _set("suffix", "a:b"), ["spec.suffix"]),
    ("split at the limit", _set("validation_split", 0.5), []),
    ("no split", _set("validation_split", 0.0), []),
    ("split too large", _set("validation_split", 0.6), ["spec.validation_split"]),
    ("negative split", _set("validation_split", -0.1), ["spec.validation_split"]),
    ("metadata at the limits", _metadata({f"k{i}": "v" * 512 for i in range(16)}), []),
    ("too much metadata", _metadata({f"k{i}": "v" for i in range(17)}), ["spec.metadata"]),
    ("metadata key too long", _metadata({"k" * 65: "v"}), ["spec.metadata"]),
    ("metadata empty key", _metadata({"": "v"}), ["spec.metadata"]),
    ("metadata value too long", _metadata({"team": "v" * 513}), ["spec.metadata['team']"]),
]


@pytest.mark.parametrize(("change", "expected"), [(c[1], c[2]) for c in SPEC_CASES], ids=[c[0] for c in SPEC_CASES])
def test_job_spec_limits(change: Callable[[ft.JobSpec], None], expected: list[str]) -> None:
    spec = valid_spec()
    change(spec)
    assert fields(spec_mod.check_job_spec(spec, SETTINGS)) == expected


def test_inline_data_limit_follows_the_setting() -> None:
    settings = FinetuneSettings(max_inline_bytes=100)
    ok = ft.JobSpec(training_data=ft.TrainingDataSource(jsonl=b"x" * 100))
    assert spec_mod.check_job_spec(ok, settings) == []
    big = ft.JobSpec(
        training_data=ft.TrainingDataSource(jsonl=b"x" * 101),
        validation_data=ft.TrainingDataSource(jsonl=b"y" * 101),
    )
    violations = spec_mod.check_job_spec(big, settings)
    assert fields(violations) == ["spec.training_data.jsonl", "spec.validation_data.jsonl"]
    assert "GENLOOM_FINETUNE_MAX_INLINE_BYTES" in violations[0].description


def test_every_violation_is_reported_at_once_under_the_given_prefix() -> None:
    spec = valid_spec(learning_rate=3.0, epochs=500, lora_rank=1000)
    spec.suffix = "no spaces allowed"
    spec.ClearField("training_data")
    violations = spec_mod.check_job_spec(spec, SETTINGS, field="spec.base_job")
    assert sorted(fields(violations)) == [
        "spec.base_job.hyperparameters.epochs",
        "spec.base_job.hyperparameters.learning_rate",
        "spec.base_job.hyperparameters.lora_rank",
        "spec.base_job.suffix",
        "spec.base_job.training_data",
    ]
    with pytest.raises(InvalidArgument) as caught:
        spec_mod.raise_if(violations)
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(v.field for v in error.violations) == sorted(fields(violations))
    assert "spec.base_job.hyperparameters.learning_rate" in error.message
    spec_mod.raise_if([])  # nothing to report: no error


@pytest.mark.parametrize("name", spec_mod.LORA_ONLY)
def test_lora_only_fields_are_rejected_with_full_fine_tuning(name: str) -> None:
    value: Any = {"lora_rank": 16, "lora_alpha": 32.0, "lora_dropout": 0.0, "lora_target_modules": ["q_proj"]}[name]
    spec = valid_spec(**{name: value})
    assert spec_mod.check_job_spec(spec, SETTINGS) == []  # fine for LoRA (the default method)
    spec.method = ft.FINE_TUNE_METHOD_LORA
    assert spec_mod.check_job_spec(spec, SETTINGS) == []
    spec.method = ft.FINE_TUNE_METHOD_FULL
    violations = spec_mod.check_job_spec(spec, SETTINGS)
    assert fields(violations) == [f"spec.hyperparameters.{name}"]
    assert "LoRA only" in violations[0].description


def test_full_fine_tuning_without_lora_fields_is_valid() -> None:
    spec = valid_spec(learning_rate=1e-5)
    spec.method = ft.FINE_TUNE_METHOD_FULL
    assert spec_mod.check_job_spec(spec, SETTINGS) == []


def test_early_stopping_needs_validation() -> None:
    spec = valid_spec(early_stopping_patience=3)
    assert spec_mod.check_job_spec(spec, SETTINGS) == []  # validation_split unset: the default 0.1 holds out data
    spec.validation_split = 0.0
    violations = spec_mod.check_job_spec(spec, SETTINGS)
    assert fields(violations) == ["spec.hyperparameters.early_stopping_patience"]
    assert "validation" in violations[0].description
    spec.validation_data.path = "data/val.jsonl"
    assert spec_mod.check_job_spec(spec, SETTINGS) == []
    spec.ClearField("validation_data")
    spec.validation_split = 0.2
    assert spec_mod.check_job_spec(spec, SETTINGS) == []


@pytest.mark.parametrize(
    ("checkpoint", "evaluation", "accepted"),
    [
        (0, 0, True),  # evaluate at every checkpoint (the default)
        (100, 100, True),
        (100, 200, False),  # the step-100 checkpoint would have no validation loss to rank it by
        (100, 50, True),  # every checkpoint is evaluated (and more often in between)
        (100, 150, False),
        (0, 300, False),  # the checkpoint interval defaults to GENLOOM_FINETUNE_CHECKPOINT_STEPS (100)
        (0, 50, True),
        (0, 150, False),
        (40, 0, True),  # eval interval defaults to the checkpoint interval
    ],
)
def test_early_stopping_evaluates_every_checkpoint(checkpoint: int, evaluation: int, accepted: bool) -> None:
    spec = valid_spec(early_stopping_patience=2, checkpoint_interval_steps=checkpoint, eval_interval_steps=evaluation)
    violations = spec_mod.check_job_spec(spec, SETTINGS)
    assert fields(violations) == ([] if accepted else ["spec.hyperparameters.eval_interval_steps"])
    # Without early stopping any evaluation interval is fine.
    spec.hyperparameters.early_stopping_patience = 0
    assert spec_mod.check_job_spec(spec, SETTINGS) == []


def test_checkpoint_default_in_the_interval_rule_follows_the_setting() -> None:
    spec = valid_spec(early_stopping_patience=1, eval_interval_steps=50)
    assert fields(spec_mod.check_job_spec(spec, FinetuneSettings(checkpoint_steps=25))) == [
        "spec.hyperparameters.eval_interval_steps"
    ]
    assert spec_mod.check_job_spec(spec, FinetuneSettings(checkpoint_steps=100)) == []


# -- effective hyperparameters ----------------------------------------------------------------------------------


def test_defaults_are_filled_for_lora() -> None:
    hp = spec_mod.effective_hyperparameters(
        ft.Hyperparameters(), method=ft.FINE_TUNE_METHOD_UNSPECIFIED, context_window=8192, settings=SETTINGS
    )
    assert hp.epochs == 3
    assert hp.batch_size == 8
    assert hp.gradient_accumulation_steps == 1
    assert hp.learning_rate == pytest.approx(2e-4)
    assert hp.HasField("warmup_ratio") and hp.warmup_ratio == pytest.approx(0.03)
    assert hp.warmup_steps == 0
    assert hp.lr_scheduler == ft.LR_SCHEDULER_LINEAR
    assert hp.weight_decay == 0.0
    assert not hp.HasField("dropout")  # the model's own configuration
    assert hp.max_seq_length == 1024
    assert hp.HasField("seed") and hp.seed == 42
    assert hp.early_stopping_patience == 0
    assert hp.precision == ft.PRECISION_AUTO
    assert hp.lora_rank == 8
    assert hp.lora_alpha == 16.0
    assert hp.HasField("lora_dropout") and hp.lora_dropout == pytest.approx(0.05)
    assert list(hp.lora_target_modules) == []  # PEFT's default for the architecture
    assert hp.checkpoint_interval_steps == 100
    assert hp.eval_interval_steps == 100
    assert hp.max_steps == 0
    assert hp.logging_interval_steps == 1
    assert hp.max_checkpoints == 3
    assert hp.HasField("max_grad_norm") and hp.max_grad_norm == 1.0


def test_defaults_for_full_fine_tuning_leave_lora_fields_unset() -> None:
    hp = spec_mod.effective_hyperparameters(
        ft.Hyperparameters(), method=ft.FINE_TUNE_METHOD_FULL, context_window=2048, settings=SETTINGS
    )
    assert hp.learning_rate == pytest.approx(2e-5)
    assert hp.lora_rank == 0 and hp.lora_alpha == 0 and not hp.HasField("lora_dropout")
    assert hp.epochs == 3 and hp.max_grad_norm == 1.0


def test_given_values_are_kept_and_dependent_defaults_follow_them() -> None:
    given = ft.Hyperparameters(
        learning_rate=1e-3,
        warmup_ratio=0.0,
        seed=0,
        lora_rank=16,
        lora_dropout=0.0,
        max_grad_norm=0.0,
        checkpoint_interval_steps=40,
        lr_scheduler=ft.LR_SCHEDULER_COSINE,
        max_seq_length=256,
        dropout=0.2,
    )
    hp = spec_mod.effective_hyperparameters(
        given, method=ft.FINE_TUNE_METHOD_LORA, context_window=512, settings=SETTINGS
    )
    assert hp.learning_rate == pytest.approx(1e-3)
    # Explicit zeros of optional fields are values, not "unset".
    assert hp.HasField("warmup_ratio") and hp.warmup_ratio == 0.0
    assert hp.HasField("seed") and hp.seed == 0
    assert hp.HasField("lora_dropout") and hp.lora_dropout == 0.0
    assert hp.HasField("max_grad_norm") and hp.max_grad_norm == 0.0
    assert hp.lora_rank == 16 and hp.lora_alpha == 32.0
    assert hp.checkpoint_interval_steps == 40 and hp.eval_interval_steps == 40
    assert hp.lr_scheduler == ft.LR_SCHEDULER_COSINE
    assert hp.max_seq_length == 256
    assert hp.dropout == pytest.approx(0.2)
    # The input is not modified, and filling defaults twice changes nothing.
    assert given.epochs == 0
    again = spec_mod.effective_hyperparameters(
        hp, method=ft.FINE_TUNE_METHOD_LORA, context_window=512, settings=SETTINGS
    )
    assert again == hp


def test_checkpoint_default_comes_from_settings() -> None:
    hp = spec_mod.effective_hyperparameters(
        ft.Hyperparameters(), method=0, context_window=2048, settings=FinetuneSettings(checkpoint_steps=25)
    )
    assert hp.checkpoint_interval_steps == 25 and hp.eval_interval_steps == 25


def test_max_seq_length_against_the_context_window() -> None:
    small = spec_mod.effective_hyperparameters(ft.Hyperparameters(), method=0, context_window=512, settings=SETTINGS)
    assert small.max_seq_length == 512  # min(1024, window)
    exact = spec_mod.effective_hyperparameters(
        ft.Hyperparameters(max_seq_length=512), method=0, context_window=512, settings=SETTINGS
    )
    assert exact.max_seq_length == 512
    with pytest.raises(InvalidArgument) as caught:
        spec_mod.effective_hyperparameters(
            ft.Hyperparameters(max_seq_length=600), method=0, context_window=512, settings=SETTINGS
        )
    assert [v.field for v in caught.value.violations] == ["spec.hyperparameters.max_seq_length"]
    assert "512" in caught.value.violations[0].description
    with pytest.raises(InvalidArgument) as caught:
        spec_mod.effective_hyperparameters(
            ft.Hyperparameters(max_seq_length=600),
            method=0,
            context_window=512,
            settings=SETTINGS,
            field="spec.base_job.hyperparameters",
        )
    assert [v.field for v in caught.value.violations] == ["spec.base_job.hyperparameters.max_seq_length"]


# -- webhook, idempotency key, digest ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("https://example.com/hooks/genloom", True),
        ("http://127.0.0.1:8080/hook?x=1", False),  # loopback: only with GENLOOM_FINETUNE_WEBHOOK_ALLOWED_HOSTS
        ("https://hooks.example.com:8443/hook?x=1", True),
        ("HTTPS://Example.com/", True),
        ("https://example.com/" + "a" * (2048 - 20), True),
        ("https://example.com/" + "a" * (2049 - 20), False),
        ("", False),
        ("ftp://example.com/hook", False),
        ("javascript:alert(1)", False),
        ("example.com/hook", False),
        ("https://", False),
        ("http://host:99999/", False),
        ("https://exa mple.com/", False),
        ("https://example.com/\nx", False),
    ],
)
def test_webhook_url(url: str, accepted: bool) -> None:
    violations = spec_mod.check_webhook(ft.Webhook(url=url))
    assert fields(violations) == ([] if accepted else ["webhook.url"])


@pytest.mark.parametrize(
    ("secret", "accepted"),
    [("", True), ("s" * 256, True), ("s" * 257, False), ("é" * 128, True), ("é" * 129, False)],
)
def test_webhook_secret_length_in_bytes(secret: str, accepted: bool) -> None:
    violations = spec_mod.check_webhook(ft.Webhook(url="https://example.com/h", secret=secret), field="hook")
    assert fields(violations) == ([] if accepted else ["hook.secret"])


@pytest.mark.parametrize(
    ("key", "accepted"), [("", True), ("k" * 128, True), ("k" * 129, False), ("retry-7f3c", True), ("a\nb", False)]
)
def test_idempotency_key(key: str, accepted: bool) -> None:
    assert fields(spec_mod.check_idempotency_key(key)) == ([] if accepted else ["idempotency_key"])


def _request(**metadata: str) -> ft.CreateJobRequest:
    request = ft.CreateJobRequest(spec=valid_spec(learning_rate=1e-4), idempotency_key="k1")
    request.spec.metadata.update(metadata)
    request.webhook.url = "https://example.com/h"
    request.webhook.secret = "s3cret"
    return request


def test_request_digest_is_stable() -> None:
    first = spec_mod.request_digest(_request(a="1", b="2", c="3"))
    assert len(first) == 64 and int(first, 16) >= 0
    # Built again, map entries inserted in another order, parsed back from the wire: the same request.
    assert spec_mod.request_digest(_request(c="3", a="1", b="2")) == first
    assert (
        spec_mod.request_digest(ft.CreateJobRequest.FromString(_request(b="2", c="3", a="1").SerializeToString()))
        == first
    )


@pytest.mark.parametrize(
    "change",
    [
        lambda r: setattr(r.spec.hyperparameters, "learning_rate", 2e-4),
        lambda r: setattr(r.spec, "suffix", "x"),
        lambda r: r.spec.metadata.update({"a": "other"}),
        lambda r: setattr(r.webhook, "secret", "other"),
        lambda r: setattr(r, "idempotency_key", "k2"),
        lambda r: setattr(r.spec.training_data, "path", "data/other.jsonl"),
        lambda r: setattr(r.spec, "validation_split", 0.1),  # the default value, but said explicitly
    ],
)
def test_request_digest_is_sensitive(change: Callable[[ft.CreateJobRequest], None]) -> None:
    request = _request(a="1")
    before = spec_mod.request_digest(request)
    change(request)
    assert spec_mod.request_digest(request) != before


def test_request_digest_tells_message_types_apart() -> None:
    assert spec_mod.request_digest(ft.CreateJobRequest()) != spec_mod.request_digest(ft.CreateSweepRequest())
