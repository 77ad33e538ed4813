"""The one check of sampling parameters, shared by the inference servicer, every engine and the task service.

A value passes only if the strictest engine can use it without a numerical accident: no NaN or infinity, and
nothing that can turn a finite logit into an infinite one. The step that killed the hf engine was
`logits / temperature` (and `logits / repetition_penalty`) overflowing float32 for a tiny divisor, after which the
softmax holds NaN and `torch.multinomial` raises; vLLM's sampler divides the same way. The ranges:

- temperature: 0 (greedy) or up to 2.0. Below GREEDY_BELOW (1e-5, vLLM's own threshold) it is greedy: sampling
  that sharp picks the top token anyway, and float32 can't represent the divided logits safely much lower (a
  logit of 10 over 1e-38 is already infinite). From GREEDY_BELOW up to 0.01 it is sampled at 0.01, which vLLM
  enforces by itself (with a log warning per request); doing it here keeps every engine drawing from the same
  distribution and a client from flooding the log.
- repetition_penalty: 0.01 to 2.0 (0 = the default, 1.0). A logit is divided by both penalty and temperature,
  so with these floors by at most 1e4 (0.01 x 0.01): a float32 logit stays finite for any value a model
  produces (it would have to exceed 3.4e34). Below 0.01 a seen token is already certain, so nothing is lost.
- top_p: greater than 0 and at most 1 (0 = the default, 1.0); a tiny positive value keeps just the top token.
- top_k: 0 (no limit) to the vocabulary size; stop_token_ids below it; logprobs up to the server's limit;
  min_new_tokens at most max_new_tokens.

Negative zero reads as zero everywhere; a subnormal float is below every positive floor above, so a subnormal
temperature is greedy and a subnormal repetition_penalty or negative value is refused.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass

from genloom.services.inference.engine import SamplingError, SamplingOptions
from genloom.services.server.errors import FieldViolation, InvalidArgument
from genloom.v1 import inference_pb2


def _float32(value: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


# The proto fields are float32: a client's 0.01 arrives as 0.009999999776..., so the floors are float32 values too
# (0.01 must pass as 0.01, and 1e-5 must not count as below 1e-5).
MAX_TEMPERATURE = 2.0
GREEDY_BELOW = _float32(1e-5)
MIN_REPETITION_PENALTY = _float32(0.01)
MAX_REPETITION_PENALTY = 2.0
MAX_STOP_TOKEN_IDS = 64
MAX_STOP_LENGTH = 256
MAX_SEED = 2**32 - 1  # the proto's uint32; torch and vLLM generators take any such value


@dataclass(frozen=True)
class SamplingLimits:
    """What a check needs to know beyond the message. None skips a check whose limit only the inference service
    knows (the task service leaves those to it)."""

    default_max_new_tokens: int | None = 256  # None: min_new_tokens is checked only against a set max_new_tokens
    vocab_size: int | None = None
    max_logprobs: int | None = None
    max_stop_sequences: int | None = None


def _num(value: float) -> str:
    """A client's number for a message: short whatever it is (nan, inf, 1.4013e-45)."""
    return f"{value:.6g}"


# The ranges, once: the request check (where 0 means "the default" for top_p and repetition_penalty) and the
# engines' check of resolved options both use these.
def _temperature_ok(t: float) -> bool:
    return math.isfinite(t) and 0.0 <= t <= MAX_TEMPERATURE


def _top_p_ok(p: float) -> bool:
    return math.isfinite(p) and 0.0 < p <= 1.0


def _penalty_ok(penalty: float) -> bool:
    return math.isfinite(penalty) and MIN_REPETITION_PENALTY <= penalty <= MAX_REPETITION_PENALTY


def effective_temperature(temperature: float) -> float:
    """What an engine samples at for a temperature that passed the check (0.0 = greedy)."""
    if temperature < GREEDY_BELOW:  # also -0.0
        return 0.0
    # The double 0.01, not its float32 neighbour just below it, which vLLM would still raise with a warning.
    return max(temperature, 0.01)


def check_sampling(
    params: inference_pb2.SamplingParams, limits: SamplingLimits, field: str = "sampling"
) -> list[FieldViolation]:
    """Every violation in `params`, each named `<field>.<name>` (e.g. "sampling.temperature")."""
    bad: list[FieldViolation] = []

    def check(ok: bool, name: str, description: str) -> None:
        if not ok:
            bad.append(FieldViolation(f"{field}.{name}", description))

    if params.HasField("temperature"):
        t = params.temperature
        check(
            _temperature_ok(t),
            "temperature",
            f"{_num(t)} is outside 0.0 to {MAX_TEMPERATURE} (values below {GREEDY_BELOW:g} are greedy)",
        )
    check(
        params.top_p == 0.0 or _top_p_ok(params.top_p),
        "top_p",
        f"{_num(params.top_p)} is outside (0, 1] (0 = the default, 1.0)",
    )
    penalty = params.repetition_penalty
    check(
        penalty == 0.0 or _penalty_ok(penalty),
        "repetition_penalty",
        f"{_num(penalty)} is outside {MIN_REPETITION_PENALTY:g} to {MAX_REPETITION_PENALTY:g} (0 = the default, 1.0)",
    )
    # Counts before entries, and never more entries than the limit: a request may carry millions of them (a
    # 64 MiB message), and one violation per entry would hold the event loop and the memory for seconds.
    stop_limit = limits.max_stop_sequences
    if stop_limit is not None:
        check(
            len(params.stop) <= stop_limit,
            "stop",
            f"{len(params.stop)} stop sequences; the limit is {stop_limit}",
        )
    # Without a limit (the task service) the inference service counts them; the entries checked here stay bounded.
    checked = stop_limit if stop_limit is not None else MAX_STOP_TOKEN_IDS
    if len(params.stop) <= checked:
        for i, sequence in enumerate(params.stop):
            check(0 < len(sequence) <= MAX_STOP_LENGTH, f"stop[{i}]", f"must be 1 to {MAX_STOP_LENGTH} characters")
    check(
        len(params.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
        "stop_token_ids",
        f"{len(params.stop_token_ids)} ids; the limit is {MAX_STOP_TOKEN_IDS}",
    )
    if limits.vocab_size is not None:
        bad.extend(check_vocabulary(params, limits.vocab_size, field))
    if params.HasField("logprobs") and limits.max_logprobs is not None:
        check(
            params.logprobs <= limits.max_logprobs,
            "logprobs",
            f"{params.logprobs} is over the limit of {limits.max_logprobs}",
        )
    max_new = params.max_new_tokens or limits.default_max_new_tokens
    if max_new is not None:
        check(
            params.min_new_tokens <= max_new,
            "min_new_tokens",
            f"{params.min_new_tokens} is more than max_new_tokens ({max_new})",
        )
    return bad


def check_vocabulary(
    params: inference_pb2.SamplingParams, vocab_size: int, field: str = "sampling"
) -> list[FieldViolation]:
    """The checks that need the model's vocabulary: top_k and each stop token id (only when there are no more ids
    than the limit: over it, check_sampling has already said so and the entries are not looked at)."""
    bad: list[FieldViolation] = []
    if params.top_k > vocab_size:
        bad.append(FieldViolation(f"{field}.top_k", f"{params.top_k} is over the vocabulary size {vocab_size}"))
    if len(params.stop_token_ids) <= MAX_STOP_TOKEN_IDS:
        for i, token in enumerate(params.stop_token_ids):
            if token >= vocab_size:
                bad.append(
                    FieldViolation(
                        f"{field}.stop_token_ids[{i}]",
                        f"token id {token} is outside the vocabulary (size {vocab_size})",
                    )
                )
    return bad


def sampling_options(
    params: inference_pb2.SamplingParams, limits: SamplingLimits, field: str = "sampling"
) -> SamplingOptions:
    """Checked, defaults-resolved options for an engine; raises InvalidArgument with every violation."""
    InvalidArgument.raise_for(check_sampling(params, limits, field))
    assert limits.default_max_new_tokens is not None, "an engine needs a max_new_tokens"
    temperature = params.temperature if params.HasField("temperature") else 1.0
    return SamplingOptions(
        max_new_tokens=params.max_new_tokens or limits.default_max_new_tokens,
        temperature=effective_temperature(temperature),
        top_k=params.top_k,
        top_p=params.top_p or 1.0,  # also -0.0
        repetition_penalty=params.repetition_penalty or 1.0,
        stop_token_ids=tuple(params.stop_token_ids),
        seed=params.seed if params.HasField("seed") else None,
        logprobs=params.logprobs if params.HasField("logprobs") else None,
        min_new_tokens=params.min_new_tokens,
        ignore_eos=params.ignore_eos,
    )


def option_problems(options: SamplingOptions, vocab_size: int | None = None) -> list[str]:
    """The same limits on options built in-process (engines check what they are given, whoever built it):
    one line per problem, empty when the options are usable."""
    problems: list[str] = []
    t, p, k = options.temperature, options.top_p, options.top_k
    if not _temperature_ok(t):
        problems.append(f"temperature {_num(t)} is outside 0.0 to {MAX_TEMPERATURE}")
    if not _top_p_ok(p):
        problems.append(f"top_p {_num(p)} is outside (0, 1]")
    penalty = options.repetition_penalty
    if not _penalty_ok(penalty):
        problems.append(
            f"repetition_penalty {_num(penalty)} is outside {MIN_REPETITION_PENALTY:g} to {MAX_REPETITION_PENALTY:g}"
        )
    if k < 0 or (vocab_size is not None and k > vocab_size):
        problems.append(f"top_k {k} is outside 0 to the vocabulary size")
    if options.max_new_tokens < 1:
        problems.append("max_new_tokens must be at least 1")
    if options.min_new_tokens < 0:  # above max_new_tokens is harmless here: generation still ends at the max
        problems.append(f"min_new_tokens {options.min_new_tokens} is negative")
    if options.logprobs is not None and options.logprobs < 0:
        problems.append(f"logprobs {options.logprobs} is negative")
    if options.seed is not None and not 0 <= options.seed <= MAX_SEED:
        problems.append(f"seed {options.seed} is outside 0 to {MAX_SEED}")
    if len(options.stop_token_ids) > MAX_STOP_TOKEN_IDS or any(
        token < 0 or (vocab_size is not None and token >= vocab_size) for token in options.stop_token_ids
    ):
        problems.append("stop_token_ids must be at most 64 ids within the vocabulary")
    return problems


def engine_sampling(options: SamplingOptions, vocab_size: int | None = None) -> SamplingOptions:
    """What an engine runs `options` as (see for_engine), after checking them against the shared limits (engines
    check what they are given, whoever built it). Raises SamplingError."""
    problems = option_problems(options, vocab_size)
    if problems:
        raise SamplingError("invalid sampling parameters: " + "; ".join(problems))
    return for_engine(options)


def for_engine(options: SamplingOptions) -> SamplingOptions:
    """Options as every engine samples them: a tiny temperature greedy, a sharp one at the floor."""
    temperature = effective_temperature(options.temperature)
    if temperature == options.temperature:
        return options
    return dataclasses.replace(options, temperature=temperature)
