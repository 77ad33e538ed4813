"""What the GPU tests share: the tiny model they build (a tokenizer trained here, a random Llama: no downloads),
the texts they run, the `Rig` that drives the hf engine and transformers side by side, the comparison helpers, and
`Figures`, the record of measured figures that tests/gpu/conftest.py prints at the end of the run.

Used by tests/gpu/conftest.py (fixtures) and the tests/gpu test modules.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from genloom.services.inference.engine import EngineOutput, EngineRequest, SamplingOptions
from genloom.services.inference.settings import InferenceSettings

if TYPE_CHECKING:  # the engine module imports transformers: only the fixture that starts one loads it
    from genloom.services.inference.engines.hf import HFEngine

T = TypeVar("T")

CORPUS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Once upon a time, in a land far away, there lived a small dragon who loved to read books.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "List three colours: red, green and blue. List three fruits: apple, pear and plum.",
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the warm afternoon sun.",
    "Water boils at one hundred degrees Celsius at sea level and freezes at zero degrees.",
    "A gRPC service defines methods with request and response messages in a proto file.",
    "Machine learning models learn patterns from data and make predictions on new inputs.",
    "Hello! How are you today? I am fine, thank you, and I hope you are well too.",
    "The train to the city leaves at nine in the morning and returns at six in the evening.",
    "In 1969, astronauts landed on the Moon and walked on its dusty grey surface.",
    "Numbers: one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve.",
    "Café, naïve, résumé, 東京, Привет, 🙂 — multi-byte text should round-trip cleanly.",
    "She sells sea shells by the sea shore, and the shells she sells are sea shells for sure.",
]

# The fine-tuning set: short "instruction -> answer" lines the base model has never seen, repeated.
TRAIN_TEXTS = [
    "Q: What colour is the sky? A: The sky is blue.",
    "Q: What colour is grass? A: Grass is green.",
    "Q: How many legs does a cat have? A: A cat has four legs.",
    "Q: What is two plus two? A: Two plus two is four.",
    "Q: Where is Paris? A: Paris is in France.",
    "Q: What do bees make? A: Bees make honey.",
    "Q: What is frozen water? A: Frozen water is ice.",
    "Q: What shines at night? A: The moon shines at night.",
]

PROMPT_TEXTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):",
    "Hello",
    "List three colours:",
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the warm afternoon sun. The",
    "Numbers: one, two, three,",
    "Q: What colour is the sky? A:",
]


@dataclass(frozen=True)
class Sizes:
    """The tiny model's shape and how long each check runs: `full` on a GPU, `quick` for a CPU dry run."""

    vocab: int = 1024
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    greedy_tokens: int = 32
    bench_tokens: int = 128
    sequential_requests: int = 4
    concurrency: int = 16
    steps: int = 80
    lr: float = 3e-3

    @classmethod
    def full(cls) -> Sizes:
        return cls()

    @classmethod
    def quick(cls) -> Sizes:
        return cls(hidden=128, layers=2, heads=4, greedy_tokens=12, bench_tokens=24, sequential_requests=2, steps=40)


def build_model_dir(path: Path, sizes: Sizes) -> dict[str, Any]:
    """A random Llama + a byte-level BPE tokenizer trained on CORPUS + TRAIN_TEXTS, saved in fp32 safetensors."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=sizes.vocab,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS + TRAIN_TEXTS, trainer)
    tokenizer: Any = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # untyped in transformers
        tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    tokenizer.save_pretrained(path)
    eos, pad = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|pad|>"])
    vocab = -(-len(tokenizer) // 64) * 64
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=sizes.hidden,
        intermediate_size=sizes.hidden * 2,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=max(1, sizes.heads // 2),
        max_position_embeddings=1024,
        # Larger than the usual 0.02, so the random model's logits are less flat (fewer exact near-ties).
        initializer_range=0.05,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]  # untyped in transformers
    model.eval()
    model.generation_config.pad_token_id = pad
    model.save_pretrained(path)
    return {
        "path": str(path),
        "tokenizer_vocab": len(tokenizer),
        "model_vocab": vocab,
        "hidden": sizes.hidden,
        "layers": sizes.layers,
        "heads": sizes.heads,
        "params": sum(p.numel() for p in model.parameters()),
        "eos_id": eos,
        "pad_id": pad,
    }


def build_smollm2_shaped_dir(
    path: Path, tokenizer_dir: Path, dtype: torch.dtype, device: torch.device
) -> dict[str, Any]:
    """A random model with SmolLM2-135M's shape (the project's default model: 30 layers, hidden 576, 9 heads /
    3 KV heads, 49152 vocab, tied embeddings) and the tiny tokenizer: for throughput figures closer to the real
    model's than the tiny one gives. Built on the device, saved in the run's dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir()
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, path / f.name)
    tiny = json.loads((tokenizer_dir / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        initializer_range=0.05,
        bos_token_id=tiny["bos_token_id"],
        eos_token_id=tiny["eos_token_id"],
        pad_token_id=tiny["pad_token_id"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with device:
        model: Any = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]  # untyped in transformers
        model.to(dtype).eval()
    model.generation_config.pad_token_id = tiny["pad_token_id"]
    model.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"path": str(path), "params": params, "layers": 30, "hidden": 576, "vocab": 49152}


def load_model(model_dir: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """A saved model in transformers, on `device` in `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------- comparisons


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def near_tie(gap: float | None, scale: float) -> bool:
    # bf16 keeps 8 significant bits: two logits within a few percent of each other can swap order when the same
    # row is computed in another batch shape / with padding.
    return gap is not None and abs(gap) <= max(0.02 * scale, 0.05)


def all_near_ties(divergences: Sequence[dict[str, Any]]) -> bool:
    return all(
        near_tie(d.get("gap"), max(abs(d.get("ref_logit", 0.0)), abs(d.get("got_logit", 0.0)))) for d in divergences
    )


def divergence(
    expected: Sequence[int], got: Sequence[int], last_logits: Callable[[Sequence[int]], torch.Tensor]
) -> dict[str, Any]:
    """Where two greedy sequences part, and how close the reference's two candidates were there.
    `last_logits(generated)` gives the reference model's logits after the prompt and `generated`."""
    k = common_prefix(expected, got)
    info: dict[str, Any] = {"position": k, "of": len(expected)}
    if k < min(len(expected), len(got)):
        logits = last_logits(expected[:k])
        a, b = logits[expected[k]].item(), logits[got[k]].item()
        info.update(
            ref_token=expected[k], got_token=got[k], ref_logit=round(a, 4), got_logit=round(b, 4), gap=round(a - b, 4)
        )
    return info


# ----------------------------------------------------------------------------------------------- figures


@dataclass
class Figures:
    """Figures the checks measured (throughput, memory, agreement), by check: printed after the run, and written
    as JSON where GENLOOM_GPU_REPORT names a file."""

    checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record(self, check: str, **values: Any) -> None:
        self.checks.setdefault(check, {}).update(values)

    def lines(self) -> list[str]:
        """One line per check, leaving out long lists and dicts (they are in the JSON)."""
        out = []
        for check, values in self.checks.items():
            brief = {k: v for k, v in values.items() if not isinstance(v, (list, dict)) or len(str(v)) < 160}
            out.append(f"{check}: " + ", ".join(f"{k}={v}" for k, v in brief.items()))
        return out

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.checks, indent=2, default=str))


# ----------------------------------------------------------------------------------------------- the rig


@dataclass
class Rig:
    """The tiny model served by a started HFEngine, and the same weights in transformers (`reference`), on one
    device and dtype, with one event loop that every engine call of the session runs on."""

    loop: asyncio.AbstractEventLoop
    device: torch.device
    dtype: torch.dtype
    sizes: Sizes
    settings: InferenceSettings
    model_dir: Path
    model_info: dict[str, Any]
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    reference: Any  # transformers LlamaForCausalLM
    engine: HFEngine
    prompts: list[list[int]]
    new_tokens: list[int]
    _ids: itertools.count[int] = field(default_factory=itertools.count, init=False)

    @property
    def low_precision(self) -> bool:
        return self.dtype in (torch.bfloat16, torch.float16)

    @property
    def pad_id(self) -> int:
        return int(self.model_info["pad_id"])

    def run(self, aw: Awaitable[T]) -> T:
        return self.loop.run_until_complete(aw)

    def gather(self, *coros: Coroutine[Any, Any, T]) -> list[T]:
        async def all_of() -> list[T]:
            return list(await asyncio.gather(*coros))

        return self.run(all_of())

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def request(self, prompt: Sequence[int], adapter: str | None = None, **sampling: Any) -> EngineRequest:
        sampling.setdefault("temperature", 0.0)
        return EngineRequest(f"r{next(self._ids)}", list(prompt), SamplingOptions(**sampling), adapter=adapter)

    async def collect(self, req: EngineRequest, delay: float = 0.0, engine: HFEngine | None = None) -> list[int]:
        if delay:
            await asyncio.sleep(delay)
        outputs: list[EngineOutput] = [o async for o in (engine or self.engine).generate(req)]
        return [t for o in outputs for t in o.token_ids]

    def generate(self, req: EngineRequest, engine: HFEngine | None = None) -> list[int]:
        return self.run(self.collect(req, engine=engine))

    def hf_generate(self, model: Any, prompt: Sequence[int], n: int, **kw: Any) -> list[int]:
        """transformers' own greedy `generate` of `n` new tokens."""
        ids = torch.tensor([list(prompt)], device=self.device)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=n,
                pad_token_id=self.pad_id,
                **kw,
            )
        return [int(t) for t in out[0, len(prompt) :].tolist()]

    def forward_logits(self, model: Any, ids: Sequence[int]) -> torch.Tensor:
        with torch.no_grad():
            logits: torch.Tensor = model(torch.tensor([list(ids)], device=self.device)).logits[0].float()
        return logits

    def divergence(
        self, prompt: Sequence[int], expected: Sequence[int], got: Sequence[int], model: Any = None
    ) -> dict[str, Any]:
        """`divergence` against `model` (default: the reference) continuing `prompt`."""
        chosen = model if model is not None else self.reference
        return divergence(expected, got, lambda generated: self.forward_logits(chosen, [*prompt, *generated])[-1])
