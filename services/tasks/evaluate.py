"""Evaluate: a labeled dataset through one or more configurations (strategy, shots, example source, model,
method), each item through the same task code the RPCs use; streams progress and predictions, then metrics.

Few-shot examples come from an example split (a separate dataset, or records held out from the front of the
dataset) and never from the items scored. Items get their checks and TaskContext from TaskCore
(services/tasks/core.py), as the RPCs' inputs do; TaskServicer.Evaluate runs an Evaluation.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from genloom.services.server.errors import FieldViolation, InvalidArgument, ServiceError, quote
from genloom.services.tasks import metrics
from genloom.services.tasks.answer import AnswerOptions, answer
from genloom.services.tasks.classify import classify
from genloom.services.tasks.context import TaskContext
from genloom.services.tasks.core import TaskCore
from genloom.services.tasks.datasets import gold_answers, gold_labels, load_dataset_async
from genloom.services.tasks.summarize import SummarizeOptions, summarize
from genloom.services.tasks.validation import Checks
from genloom.v1 import common_pb2, inference_pb2, tasks_pb2

PRIMARY_METRIC = {
    tasks_pb2.TASK_TYPE_CLASSIFY: "accuracy",
    tasks_pb2.TASK_TYPE_SUMMARIZE: "rouge_l",
    tasks_pb2.TASK_TYPE_ANSWER: "token_f1",
}
STRATEGY_NAMES = {
    tasks_pb2.PROMPT_STRATEGY_ZERO_SHOT: "zero-shot",
    tasks_pb2.PROMPT_STRATEGY_ONE_SHOT: "one-shot",
    tasks_pb2.PROMPT_STRATEGY_FEW_SHOT: "few-shot",
}
DEFAULT_FEW_SHOTS = 4
UNANSWERABLE_REFERENCE = "(unanswerable)"
MAX_CONCURRENCY = 256
PROGRESS_INTERVAL_S = 0.25


@dataclass
class _Config:
    index: int
    spec: tasks_pb2.EvalConfiguration  # as run: strategy and shots resolved, name set
    split: list[tasks_pb2.EvalRecord]


@dataclass
class _Outcome:
    item: int
    latency: float
    prediction: tasks_pb2.EvalPrediction
    usage: common_pb2.Usage | None = None
    prompt_tokens: int = 0
    examples_used: int = 0
    predicted_labels: list[str] = field(default_factory=list)
    rouge: tuple[float, float, float] | None = None
    answer_scores: tuple[float, float] | None = None
    failed: bool = False


class Evaluation:
    def __init__(self, core: TaskCore, request: tasks_pb2.EvaluateRequest) -> None:
        self.core = core
        self.settings = core.settings
        self.request = request
        self.task = request.task
        self.items: list[tasks_pb2.EvalRecord] = []
        self.configs: list[_Config] = []
        self.labels: list[tasks_pb2.ClassLabel] = []
        self.concurrency = request.concurrency or self.settings.eval_concurrency
        self.default_model = ""

    # -- validation and loading ---------------------------------------------------------------------------------

    async def prepare(self) -> None:
        r = self.request
        s = self.settings
        checks = Checks(s)
        checks.require(r.task in PRIMARY_METRIC, "task", "required: TASK_TYPE_CLASSIFY, _SUMMARIZE or _ANSWER")
        checks.require(r.HasField("dataset"), "dataset", "required")
        checks.require(
            1 <= len(r.configurations) <= s.max_eval_configs,
            "configurations",
            f"{len(r.configurations)} configurations; 1 to {s.max_eval_configs} allowed "
            "(GENLOOM_TASKS_MAX_EVAL_CONFIGS)",
        )
        checks.require(r.concurrency <= MAX_CONCURRENCY, "concurrency", f"{r.concurrency} is over {MAX_CONCURRENCY}")
        checks.enum(r.truncation, common_pb2.TruncationSide, "truncation")
        checks.chunking(r.chunking)
        checks.sampling(r.sampling)
        # The summary options are checked whatever the task: unused by the others, an unknown value still marks a
        # malformed request.
        checks.enum(r.options.format, tasks_pb2.SummaryFormat, "options.format")
        if r.task == tasks_pb2.TASK_TYPE_SUMMARIZE:
            checks.target_length(r.options.target_length, "options.target_length")
        else:
            checks.enum(r.options.target_length.unit, tasks_pb2.SummaryLengthUnit, "options.target_length.unit")
        for i, config in enumerate(r.configurations[: s.max_eval_configs]):
            if config.HasField("sampling"):
                checks.sampling(config.sampling, f"configurations[{i}].sampling")
            # Before any dataset is read (also checked, with the rest of each configuration, in _resolve).
            checks.enum(config.strategy, tasks_pb2.PromptStrategy, f"configurations[{i}].strategy")
            checks.enum(config.method, tasks_pb2.ClassifyMethod, f"configurations[{i}].method")
            checks.enum(
                config.example_source.selection,
                tasks_pb2.ExampleSelection,
                f"configurations[{i}].example_source.selection",
            )
        InvalidArgument.raise_for(checks.violations)

        self.default_model = (await self.core.upstream.model_facts("")).name
        records = await self._load(r.dataset, "dataset")
        if r.HasField("examples"):
            default_split = await self._load(r.examples, "examples")
        else:
            if r.holdout_examples >= len(records):
                raise InvalidArgument.field(
                    "holdout_examples",
                    f"holds out {r.holdout_examples} of the dataset's {len(records)} records, leaving none to score",
                )
            default_split = records[: r.holdout_examples]
            records = records[r.holdout_examples :]
        self.items = records[: r.limit] if r.limit else records
        if self.task == tasks_pb2.TASK_TYPE_CLASSIFY:
            self.labels = self._labels(default_split)
        for i, config in enumerate(r.configurations):
            split = default_split
            if config.example_source.HasField("split"):
                split = await self._load(config.example_source.split, f"configurations[{i}].example_source.split")
            self.configs.append(_Config(i, self._resolve(i, config, split), split))
        if self.task == tasks_pb2.TASK_TYPE_CLASSIFY:
            names = {lb.name for lb in self.labels}
            bad = [
                FieldViolation(where, f"label {quote(label)} is not in options.labels")
                for where, recs in [
                    ("dataset", self.items),
                    *((f"configurations[{c.index}].examples", c.split) for c in self.configs),
                ]
                for rec in recs
                for label in gold_labels(rec)
                if label not in names
            ]
            InvalidArgument.raise_for(bad[:1])
        # The sampling checks that need each model's vocabulary: refused here once, not as a failure per item.
        vocabulary = Checks(s)
        for resolved in self.configs:
            own = resolved.spec.HasField("sampling")
            facts = await self.core.upstream.model_facts(resolved.spec.model.model)
            vocabulary.vocabulary(
                resolved.spec.sampling if own else r.sampling,
                facts.vocab_size,
                f"configurations[{resolved.index}].sampling" if own else "sampling",
            )
        InvalidArgument.raise_for(vocabulary.violations)

    async def _load(self, dataset: tasks_pb2.EvalDataset, field_name: str) -> list[tasks_pb2.EvalRecord]:
        return await load_dataset_async(
            dataset,
            self.task,
            data_root=self.settings.data_root,
            max_items=self.settings.max_eval_items,
            field=field_name,
        )

    def _labels(self, split: Sequence[tasks_pb2.EvalRecord]) -> list[tasks_pb2.ClassLabel]:
        options = self.request.options
        if options.labels:
            checks = Checks(self.settings)
            checks.labels(options.labels, options.multi_label, "options.labels")
            InvalidArgument.raise_for(checks.violations)
            return list(options.labels)
        names: dict[str, None] = {}
        for record in [*self.items, *split]:
            for label in gold_labels(record):
                names.setdefault(label)
        minimum = 1 if options.multi_label else 2
        if len(names) < minimum:
            raise InvalidArgument.field(
                "options.labels", f"the data has {len(names)} distinct label(s); give at least {minimum} labels"
            )
        return [tasks_pb2.ClassLabel(name=n) for n in names]

    def _resolve(
        self, i: int, config: tasks_pb2.EvalConfiguration, split: Sequence[tasks_pb2.EvalRecord]
    ) -> tasks_pb2.EvalConfiguration:
        at = f"configurations[{i}]"
        checks = Checks(self.settings)
        checks.enum(config.strategy, tasks_pb2.PromptStrategy, f"{at}.strategy")
        checks.enum(config.method, tasks_pb2.ClassifyMethod, f"{at}.method")
        checks.enum(config.example_source.selection, tasks_pb2.ExampleSelection, f"{at}.example_source.selection")
        InvalidArgument.raise_for(checks.violations)
        strategy = config.strategy
        has_shots = config.HasField("shots")
        shots = config.shots
        if strategy == tasks_pb2.PROMPT_STRATEGY_UNSPECIFIED:
            shots = shots if has_shots else 0
            strategy = (
                tasks_pb2.PROMPT_STRATEGY_ZERO_SHOT
                if shots == 0
                else tasks_pb2.PROMPT_STRATEGY_ONE_SHOT
                if shots == 1
                else tasks_pb2.PROMPT_STRATEGY_FEW_SHOT
            )
        elif strategy == tasks_pb2.PROMPT_STRATEGY_ZERO_SHOT:
            if has_shots and shots != 0:
                raise InvalidArgument.field(f"{at}.shots", f"ZERO_SHOT takes no examples (shots is {shots})")
            shots = 0
        elif strategy == tasks_pb2.PROMPT_STRATEGY_ONE_SHOT:
            if has_shots and shots != 1:
                raise InvalidArgument.field(f"{at}.shots", f"ONE_SHOT takes exactly one example (shots is {shots})")
            shots = 1
        else:
            shots = shots if has_shots else DEFAULT_FEW_SHOTS
            if shots < 1:
                raise InvalidArgument.field(f"{at}.shots", "FEW_SHOT needs at least one example")
        if shots > self.settings.max_examples:
            raise InvalidArgument.field(
                f"{at}.shots", f"{shots} is over the limit of {self.settings.max_examples} (GENLOOM_TASKS_MAX_EXAMPLES)"
            )
        if shots and not split:
            raise InvalidArgument.field(
                f"{at}.shots",
                f"{shots} example(s) needed but there is no example split: set `examples`, `holdout_examples` or "
                "example_source.split",
            )
        if shots > len(split):
            raise InvalidArgument.field(f"{at}.shots", f"{shots} examples needed; the example split has {len(split)}")
        method = config.method
        if self.task == tasks_pb2.TASK_TYPE_CLASSIFY:
            method = method or tasks_pb2.CLASSIFY_METHOD_SCORE
            if config.calibrate and method == tasks_pb2.CLASSIFY_METHOD_GENERATE:
                raise InvalidArgument.field(f"{at}.calibrate", "calibration needs the SCORE method")
        resolved = tasks_pb2.EvalConfiguration()
        resolved.CopyFrom(config)
        resolved.strategy = strategy
        resolved.shots = shots
        resolved.method = method
        if not resolved.name:
            name = STRATEGY_NAMES[strategy] + (f"({shots})" if strategy == tasks_pb2.PROMPT_STRATEGY_FEW_SHOT else "")
            model = config.model.model or self.default_model
            if config.model.adapter:
                model += f"+{config.model.adapter}"
            parts = [name, model]
            if self.task == tasks_pb2.TASK_TYPE_CLASSIFY:
                parts.append("generate" if method == tasks_pb2.CLASSIFY_METHOD_GENERATE else "score")
                if config.calibrate:
                    parts.append("calibrated")
            resolved.name = " ".join(parts)
        return resolved

    # -- running ---------------------------------------------------------------------------------------------------

    async def run(self) -> AsyncIterator[tasks_pb2.EvaluateResponse]:
        started = time.monotonic()
        results: list[tasks_pb2.EvalConfigurationResult] = []
        for config in self.configs:
            async for message in self._run_config(config, started):
                if message.HasField("result"):
                    results.append(message.result)
                yield message
        summary = tasks_pb2.EvalSummary(
            results=results, primary_metric=PRIMARY_METRIC[self.task], total_s=time.monotonic() - started
        )
        best, best_value = 0, -1.0
        for result in results:
            value = (
                getattr(result.metrics, summary.primary_metric)
                if result.metrics.HasField(summary.primary_metric)
                else -1.0
            )
            if value > best_value:
                best, best_value = result.configuration_index, value
        summary.best_configuration_index = best
        yield tasks_pb2.EvaluateResponse(summary=summary)

    async def _run_config(self, config: _Config, started: float) -> AsyncIterator[tasks_pb2.EvaluateResponse]:
        spec = config.spec
        total = len(self.items)
        config_started = time.monotonic()
        semaphore = asyncio.Semaphore(self.concurrency)
        shared = (
            await self._context(spec) if spec.example_source.selection != tasks_pb2.EXAMPLE_SELECTION_RANDOM else None
        )

        def progress(done: int, failed: int) -> tasks_pb2.EvaluateResponse:
            return tasks_pb2.EvaluateResponse(
                progress=tasks_pb2.EvalProgress(
                    configuration_index=config.index,
                    configuration_name=spec.name,
                    items_done=done,
                    items_total=total,
                    items_failed=failed,
                    elapsed_s=time.monotonic() - started,
                )
            )

        yield progress(0, 0)

        async def run_item(i: int) -> _Outcome:
            async with semaphore:
                return await self._item(config, i, shared)

        tasks = [asyncio.create_task(run_item(i)) for i in range(total)]
        outcomes: list[_Outcome] = []
        last_sent = time.monotonic()
        try:
            for next_done in asyncio.as_completed(tasks):
                outcome = await next_done
                outcomes.append(outcome)
                if self.request.return_predictions:
                    yield tasks_pb2.EvaluateResponse(prediction=outcome.prediction)
                now = time.monotonic()
                if len(outcomes) == total or now - last_sent >= PROGRESS_INTERVAL_S:
                    last_sent = now
                    yield progress(len(outcomes), sum(o.failed for o in outcomes))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        resolved_model = (shared or await self._context(spec)).model_ref()
        outcomes.sort(key=lambda o: o.item)
        result = tasks_pb2.EvalConfigurationResult(
            configuration_index=config.index,
            name=spec.name,
            configuration=spec,
            model=resolved_model,
            metrics=self._metrics(outcomes, time.monotonic() - config_started),
        )
        yield tasks_pb2.EvaluateResponse(result=result)

    async def _context(self, spec: tasks_pb2.EvalConfiguration) -> TaskContext:
        return await self.core.context(spec.model, spec.strategy, spec.shots, spec.shots)

    def _examples_for(self, config: _Config, item: int) -> list[tasks_pb2.EvalRecord]:
        spec = config.spec
        if not spec.shots:
            return []
        if spec.example_source.selection == tasks_pb2.EXAMPLE_SELECTION_RANDOM:
            rng = random.Random(f"{spec.example_source.seed}:{item}")
            return rng.sample(config.split, spec.shots)
        return config.split[: spec.shots]

    async def _item(self, config: _Config, i: int, shared: TaskContext | None) -> _Outcome:
        record = self.items[i]
        spec = config.spec
        examples = self._examples_for(config, i)
        prediction = tasks_pb2.EvalPrediction(configuration_index=config.index, item_index=i)
        sampling = spec.sampling if spec.HasField("sampling") else self.request.sampling
        started = time.monotonic()
        try:
            ctx = shared if shared is not None else await self._context(spec)
            outcome = _Outcome(i, 0.0, prediction)
            if self.task == tasks_pb2.TASK_TYPE_CLASSIFY:
                usage, report = await self._classify(ctx, spec, record, examples, sampling, outcome)
            elif self.task == tasks_pb2.TASK_TYPE_SUMMARIZE:
                usage, report = await self._summarize(ctx, record, examples, sampling, outcome)
            else:
                usage, report = await self._answer(ctx, record, examples, sampling, outcome)
            outcome.usage = usage
            outcome.prompt_tokens = report.prompt_tokens
            outcome.examples_used = report.examples_used
        except ServiceError as err:
            prediction.error = err.message
            outcome = _Outcome(i, 0.0, prediction, failed=True)
        outcome.latency = time.monotonic() - started
        prediction.latency_s = outcome.latency
        return outcome

    async def _classify(
        self,
        ctx: TaskContext,
        spec: tasks_pb2.EvalConfiguration,
        record: tasks_pb2.EvalRecord,
        examples: Sequence[tasks_pb2.EvalRecord],
        sampling: inference_pb2.SamplingParams,
        outcome: _Outcome,
    ) -> tuple[common_pb2.Usage, tasks_pb2.ContextReport]:
        r = self.request
        prediction = outcome.prediction
        request = tasks_pb2.ClassifyRequest(
            labels=self.labels,
            multi_label=r.options.multi_label,
            method=spec.method,
            calibrate=spec.calibrate,
            strategy=spec.strategy,
            examples=[e.classify for e in examples],
            max_examples=spec.shots,
            instruction=r.options.instruction,
            sampling=sampling,
            truncation=r.truncation,
        )
        options = self.core.classify_options(request, check_texts=False)
        result = await classify(ctx, record.classify.text, options, f"dataset[{outcome.item}]")
        prediction.prediction = result.label
        prediction.predicted_labels.extend(result.labels)
        prediction.reference = ", ".join(record.classify.labels)
        gold = set(gold_labels(record))
        prediction.score = 1.0 if set(result.labels) == gold else 0.0
        outcome.predicted_labels = list(result.labels)
        return result.usage, result.context

    async def _summarize(
        self,
        ctx: TaskContext,
        record: tasks_pb2.EvalRecord,
        examples: Sequence[tasks_pb2.EvalRecord],
        sampling: inference_pb2.SamplingParams,
        outcome: _Outcome,
    ) -> tuple[common_pb2.Usage, tasks_pb2.ContextReport]:
        r = self.request
        prediction = outcome.prediction
        options = SummarizeOptions(
            examples=[e.summarize for e in examples],
            target=r.options.target_length if r.options.HasField("target_length") else None,
            fmt=r.options.format or tasks_pb2.SUMMARY_FORMAT_PROSE,
            instruction=r.options.instruction,
            sampling=sampling,
            chunking=r.chunking,
            truncation=r.truncation,
        )
        result = None
        async for event in summarize(ctx, record.summarize.document, options, f"dataset[{outcome.item}]"):
            result = event
        assert isinstance(result, tasks_pb2.SummaryResult)
        prediction.prediction = result.summary
        prediction.reference = record.summarize.summary
        outcome.rouge = metrics.rouge(result.summary, record.summarize.summary)
        prediction.score = outcome.rouge[2]
        return result.usage, result.context

    async def _answer(
        self,
        ctx: TaskContext,
        record: tasks_pb2.EvalRecord,
        examples: Sequence[tasks_pb2.EvalRecord],
        sampling: inference_pb2.SamplingParams,
        outcome: _Outcome,
    ) -> tuple[common_pb2.Usage, tasks_pb2.ContextReport]:
        r = self.request
        prediction = outcome.prediction
        options = AnswerOptions(
            examples=[e.answer for e in examples],
            allow_unanswerable=r.options.allow_unanswerable,
            instruction=r.options.instruction,
            sampling=sampling,
            chunking=r.chunking,
            truncation=r.truncation,
        )
        item = tasks_pb2.AnswerItem(question=record.answer.question, context=record.answer.context)
        result = await answer(ctx, item, options, f"dataset[{outcome.item}]")
        prediction.prediction = result.answer
        prediction.unanswerable = result.unanswerable
        golds = gold_answers(record)
        prediction.reference = UNANSWERABLE_REFERENCE if record.answer.unanswerable else (golds[0] if golds else "")
        outcome.answer_scores = metrics.answer_scores(
            result.answer, result.unanswerable, golds, record.answer.unanswerable
        )
        prediction.score = outcome.answer_scores[1]
        return result.usage, result.context

    def _metrics(self, outcomes: Sequence[_Outcome], total_s: float) -> tasks_pb2.EvalMetrics:
        scored = [o for o in outcomes if not o.failed]
        m = tasks_pb2.EvalMetrics(items=len(scored), items_failed=len(outcomes) - len(scored), total_s=total_s)
        latencies = [o.latency for o in scored]
        if scored:
            m.mean_latency_s = sum(latencies) / len(latencies)
            m.p95_latency_s = metrics.percentile(latencies, 95)
            m.mean_prompt_tokens = sum(o.prompt_tokens for o in scored) / len(scored)
            m.mean_examples_used = sum(o.examples_used for o in scored) / len(scored)
        for o in scored:
            if o.usage is not None:
                m.usage.prompt_tokens += o.usage.prompt_tokens
                m.usage.completion_tokens += o.usage.completion_tokens
                m.usage.total_tokens += o.usage.total_tokens
        if not scored:
            return m
        if self.task == tasks_pb2.TASK_TYPE_CLASSIFY:
            gold = [gold_labels(self.items[o.item]) for o in scored]
            scores = metrics.classification_scores(
                gold, [o.predicted_labels for o in scored], [lb.name for lb in self.labels]
            )
            m.accuracy = scores.accuracy
            m.macro_f1 = scores.macro_f1
            for s in scores.per_label:
                m.per_label.add(label=s.label, precision=s.precision, recall=s.recall, f1=s.f1, support=s.support)
        elif self.task == tasks_pb2.TASK_TYPE_SUMMARIZE:
            rouge = [o.rouge for o in scored if o.rouge is not None]
            m.rouge1 = sum(r[0] for r in rouge) / len(rouge)
            m.rouge2 = sum(r[1] for r in rouge) / len(rouge)
            m.rouge_l = sum(r[2] for r in rouge) / len(rouge)
        else:
            answers = [o.answer_scores for o in scored if o.answer_scores is not None]
            m.exact_match = sum(a[0] for a in answers) / len(answers)
            m.token_f1 = sum(a[1] for a in answers) / len(answers)
        return m
