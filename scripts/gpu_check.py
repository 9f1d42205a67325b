#!/usr/bin/env python
"""Device check of the serving path on tiny random checkpoints: greedy equality, rejection sampling,
and a small timing table. Self-contained: runs from a bare checkout (smartspec need not be installed)
without Redis, network or the SmolLM2 GGUF.

    python scripts/gpu_check.py                        # cuda if available, else cpu
    python scripts/gpu_check.py --device cuda:0
    python scripts/gpu_check.py --device cpu --quick   # small sizes, ~1-2 min on a busy 2-core CPU

Checks (one PASS / FAIL / INFO line each; exit status 1 on any FAIL):
  1. Greedy equality. Random Llama (GQA) and Qwen2 (q/k/v bias) checkpoints are written as Hugging Face
     folders and loaded with `load_model(folder, device, dtype)`. The engine's k = 0 output (one request
     at a time) is the reference; ngram and draft proposers with fixed k in {1, 3, 8} and a seeded random
     k per request per step (through LocalPolicyPlanner + guarded_decide), requests joining mid-flight,
     and a chunked-prefill run must give the same tokens. float32: exact (FAIL otherwise). bfloat16 (the
     worker's --dtype on GPUs): batched and unbatched forwards round differently, so the match rate is
     reported (INFO), and only engine errors FAIL. The float32 reference is also compared with
     transformers' own greedy decoding of the same weights on the same device.
  2. Rejection sampling keeps the target distribution with the verifier on device tensors: the
     chi-square test of tests/test_verify.py (Markov chains, k = 2, draft-probs and deterministic
     drafts, the engine's CPU generator and a device generator), the same through verify_batch with
     temperature/top-k/top-p logits on the device, and a negative control (a biased verifier must fail).
  3. Timing (INFO): engine tokens/s, plain (k = 0) vs speculative (ngram, k = 3), batch 1 and 16, on a
     random hidden-512 8-layer model.

With the OUT environment variable set, the output is also written to $OUT/gpu_check.txt (as it goes).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import platform
import random
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

REPO = Path(__file__).resolve().parents[1]

# pyproject.toml [tool.setuptools] package-dir, used if the file cannot be read.
DEFAULT_PACKAGE_DIRS = {
    "smartspec": ".",
    "smartspec.v1": "proto/smartspec/v1",
}


# ---------------------------------------------------------------- making the checkout importable


def package_dirs() -> dict[str, str]:
    try:
        import tomllib

        with open(REPO / "pyproject.toml", "rb") as handle:
            mapping = tomllib.load(handle)["tool"]["setuptools"]["package-dir"]
        return {str(k): str(v) for k, v in mapping.items()}
    except Exception:  # no tomllib, or the layout moved: the known mapping
        return dict(DEFAULT_PACKAGE_DIRS)


def import_repo_packages() -> None:
    """Register this checkout's package-dir mapping as the `smartspec` packages.

    Each mapped package is imported from its folder with `__path__` = that folder, parents first, and
    put in sys.modules before anything else imports smartspec; sub-packages not in the mapping
    (smartspec.worker.model, ...) are then found inside their parent's folder as usual. This wins over
    an installed (even editable) smartspec, so the code under test is always this checkout's.
    """
    for name in [n for n in sys.modules if n == "smartspec" or n.startswith("smartspec.")]:
        del sys.modules[name]
    for name, relative in sorted(package_dirs().items(), key=lambda item: item[0].count(".")):
        folder = REPO / relative
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot map {name} to {folder}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


def ensure_common_pb2() -> str | None:
    """The engine path needs only two enum values from smartspec.v1.common_pb2 (proposer kinds). If the
    installed protobuf runtime rejects the checked-in gencode, stand in a stub so the check still runs;
    returns a warning then."""
    try:
        importlib.import_module("smartspec.v1.common_pb2")
        return None
    except Exception as exc:  # noqa: BLE001 - any import failure of generated code
        import types

        stub = types.ModuleType("smartspec.v1.common_pb2")
        for value, name in enumerate(("PROPOSER_KIND_UNSPECIFIED", "PROPOSER_KIND_NGRAM", "PROPOSER_KIND_DRAFT",
                                      "PROPOSER_KIND_EARLY_EXIT", "PROPOSER_KIND_TREE", "PROPOSER_KIND_SUFFIX",
                                      "PROPOSER_KIND_CHOICE")):
            setattr(stub, name, value)
        stub.CostModel = dict   # only used by CostModel.to_proto, never on this path
        sys.modules["smartspec.v1.common_pb2"] = stub
        sys.modules["smartspec.v1"].common_pb2 = stub
        return f"smartspec.v1.common_pb2 failed to import ({type(exc).__name__}: {exc}); using a stub of its enums"


import_repo_packages()
PB2_WARNING = ensure_common_pb2()

import torch  # noqa: E402

from smartspec.core.policies.base import BasePolicy, BatchState, ParameterSpec, ParameterType  # noqa: E402
from smartspec.worker.engine import Engine, EngineConfig  # noqa: E402
from smartspec.worker.local_policy import LocalPolicyPlanner, PolicyChoice  # noqa: E402
from smartspec.worker.model import build_draft, load_model  # noqa: E402
from smartspec.worker.proposers import Proposal, SamplingParams, make_proposer, probs_from_logits  # noqa: E402
from smartspec.worker.proposers.sampling import sample  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # the reference verifiers
from verify_reference import rejection_verify, verify_batch  # noqa: E402
from smartspec.worker.sequence import FinishReason, GenerationRequest, TokenDelta  # noqa: E402
from smartspec.worker.steps import StaticPlanner  # noqa: E402


# ---------------------------------------------------------------- output


class Tee:
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return False


class Results:
    def __init__(self) -> None:
        self.failed: list[str] = []
        self.passed = 0

    def record(self, name: str, ok: bool, detail: str = "") -> None:
        print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f": {detail}" if detail else ""), flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed.append(name)

    @staticmethod
    def info(name: str, detail: str) -> None:
        print(f"INFO  {name}: {detail}", flush=True)

    @staticmethod
    def warn(name: str, detail: str) -> None:
        print(f"WARN  {name}: {detail}", flush=True)

    def guarded(self, name: str, body: Callable[[], None]) -> None:
        """Run one check; an exception is that check's FAIL (with its traceback), not the script's end."""
        try:
            body()
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            self.record(name, False, f"raised {type(exc).__name__}: {exc}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- tiny random checkpoints


@dataclass(frozen=True)
class TinySpec:
    model_type: str = "llama"
    vocab: int = 128
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    max_positions: int = 256
    # 0.1: logits differ enough between tokens that argmax near-ties are rare (the smallest top-2 gap on
    # each reference path is printed), yet greedy decoding falls into repeats that prompt lookup finds
    # (at 0.3 it almost never does, and ngram speculation would be vacuous).
    init_range: float = 0.1
    seed: int = 0


def write_random_checkpoint(folder: Path, spec: TinySpec):
    """A random Hugging Face folder (config.json, model.safetensors, word-level tokenizer with eos "t1"),
    written as tests/test_model_tiny.py `write_tiny_model` does, at a chosen size; returns the HF model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[spec.model_type]
    config = config_class(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim, max_position_embeddings=spec.max_positions, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=spec.init_range,
    )
    torch.manual_seed(spec.seed)
    hf_model = model_class(config).eval()
    if spec.model_type == "qwen2":   # make the q/k/v biases matter (they start at zero)
        with torch.no_grad():
            for layer in hf_model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    hf_model.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(spec.vocab - 1)} | {"<unk>": spec.vocab - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="t1").save_pretrained(folder)
    return hf_model


def make_prompts(vocab: int, count: int, seed: int, long_length: int) -> list[tuple[int, ...]]:
    """Prompts of different lengths; some repeat a phrase (prompt lookup finds matches), one is longer
    than the chunked-prefill budget."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(2, vocab - 1) for _ in range(n)]   # not eos (1), not <unk>

    phrase = tokens(6)
    prompts = [
        tokens(12),
        phrase * 4 + tokens(3),
        tokens(5),
        tokens(long_length - 24) + tokens(8) * 3,
    ]
    while len(prompts) < count:
        other = tokens(rng.randint(4, 10))
        prompts.append(tokens(rng.randint(3, 20)) + other * rng.randint(1, 3))
    return [tuple(p) for p in prompts[:count]]


# ---------------------------------------------------------------- engine runs (as tests/test_engine_equality.py)


class SeededRandomPolicy(BasePolicy):
    """A deliberately erratic policy: a random k in 0..max_k for each request at each step."""

    name = "seeded-random"
    description = "gpu check only"
    parameters = (ParameterSpec("seed", ParameterType.INT, 0, "RNG seed"),)

    def __init__(self) -> None:
        self._rng: random.Random | None = None

    def decide(self, batch: BatchState, cost: Any, params: Mapping[str, Any]) -> list[int]:
        if self._rng is None:
            self._rng = random.Random(params["seed"])
        return [self._rng.randint(0, batch.max_k) for _ in batch.requests]


def random_planner(seed: int) -> LocalPolicyPlanner:
    policy = SeededRandomPolicy()
    return LocalPolicyPlanner(PolicyChoice(policy, policy.validate({"seed": seed})), max_k=8)


PLANS: dict[str, Callable[[], Any]] = {
    "fixed-1": lambda: StaticPlanner(1),
    "fixed-3": lambda: StaticPlanner(3),
    "fixed-8": lambda: StaticPlanner(8),
    "random": lambda: random_planner(seed=7),
}
RESULT_TIMEOUT_S = 60
DEADLINE = [float("inf")]   # perf_counter() after which the remaining runs are skipped (--max-seconds)


def out_of_time() -> bool:
    return time.perf_counter() > DEADLINE[0]


def make_engine(model, proposer, planner, *, batch: int, context: int, max_k: int = 8,
                token_budget: int = 512) -> Engine:
    config = EngineConfig(max_batch_size=batch, max_context_tokens=context, token_budget=token_budget, max_k=max_k)
    engine = Engine(model, proposer, config, planner)
    engine.start()
    return engine


class _Replay:
    """A handle whose first event was already read."""

    def __init__(self, first, rest) -> None:
        self._first, self._rest = first, rest

    def result(self, timeout=None):
        for event in self._rest:
            if not isinstance(event, TokenDelta):
                if not hasattr(event, "finish_reason"):
                    raise RuntimeError(getattr(event, "message", repr(event)))
                return event
        raise AssertionError("stream ended without a result")


def run_staggered(engine: Engine, prompts, max_tokens: int):
    """The first two requests start together; each later one joins once the previous has streamed a
    token, so it is prefilled while the others decode (continuous batching). -> outcomes."""
    handles = []
    for index, prompt in enumerate(prompts):
        handles.append(engine.submit(GenerationRequest(f"r{index}", prompt, max_tokens, ignore_eos=True)))
        if index >= 1:
            events = handles[-2].events(timeout=RESULT_TIMEOUT_S)
            first = next(events)
            if not isinstance(first, TokenDelta):
                raise RuntimeError(f"request r{index - 1} ended before streaming: {first}")
            handles[-2] = _Replay(first, events)
    outcomes = [h.result(timeout=RESULT_TIMEOUT_S) for h in handles]
    for outcome in outcomes:
        if outcome.finish_reason not in (FinishReason.STOP, FinishReason.LENGTH):
            raise RuntimeError(f"{outcome.request_id} finished with {outcome.finish_reason}")
    return outcomes


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def hf_greedy(hf_model, prompt, steps: int, device) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation and the top-2 logit gap at each chosen token."""
    tokens = list(prompt)
    gaps = []
    for _ in range(steps):
        logits = hf_model(torch.tensor([tokens], device=device)).logits[0, -1].float()
        top = logits.topk(2).values
        gaps.append(float(top[0] - top[1]))
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt):], gaps


def check_equality(results: Results, device: torch.device, dtype: torch.dtype, model_type: str, args,
                   workdir: Path) -> None:
    exact = dtype == torch.float32
    label = f"equality[{model_type},{str(dtype).removeprefix('torch.')}]"
    spec = TinySpec(model_type=model_type, seed=1 if model_type == "llama" else 2)
    folder = workdir / f"tiny-{model_type}"
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_random_checkpoint(folder, spec)
    target = load_model(folder, device=device, dtype=dtype)
    assert target.module.device.type == device.type, (target.module.device, device)
    draft = build_draft(target, "auto")
    n_prompts = 4 if args.quick else 6
    batch = 4 if args.quick else 8
    max_tokens = 20 if args.quick else 32
    prompts = make_prompts(spec.vocab, n_prompts, seed=11, long_length=64)
    context = spec.max_positions

    t0 = time.perf_counter()
    engine = make_engine(target, make_proposer("ngram"), StaticPlanner(0), batch=batch, context=context)
    try:
        reference = []
        for index, prompt in enumerate(prompts):
            outcome = engine.submit(GenerationRequest(f"ref{index}", prompt, max_tokens, ignore_eos=True)) \
                .result(timeout=RESULT_TIMEOUT_S)
            if outcome.speculation.proposed != 0:
                raise RuntimeError("the k = 0 reference speculated")
            reference.append(list(outcome.token_ids))
    finally:
        engine.stop(0)
    if not all(len(r) == max_tokens for r in reference) or len({tuple(r) for r in reference}) != len(reference):
        results.record(f"{label} reference", False, "references are short or identical (the check would be vacuous)")
        return

    reference_gaps: dict[int, list[float]] = {}   # transformers' top-2 logit gap at each reference token
    if exact:   # the engine's plain path against transformers' own greedy decoding, same weights, same device
        hf_model = load_hf(folder, device)
        mismatched, near_ties, min_gap = [], [], float("inf")
        for index, (prompt, want) in enumerate(zip(prompts, reference)):
            got, gaps = hf_greedy(hf_model, prompt, max_tokens, device)
            reference_gaps[index] = gaps
            min_gap = min(min_gap, min(gaps))
            if got != want:
                at = common_prefix(got, want)
                (near_ties if gaps[at] < 1e-3 else mismatched).append(f"prompt {index} @ {at} (gap {gaps[at]:.2e})")
        del hf_model
        detail = f"{len(prompts)} prompts x {max_tokens} tokens; smallest top-2 logit gap on the path {min_gap:.3g}"
        if near_ties and not mismatched:
            results.warn(f"{label} k=0 engine vs transformers greedy", f"diverged only at near-ties: {near_ties}")
        else:
            results.record(f"{label} k=0 engine vs transformers greedy", not mismatched,
                           detail + (f"; MISMATCH {mismatched} near-ties {near_ties}" if mismatched else ""))

    runs: list[tuple[str, str, Callable[[], Any], dict]] = []
    for proposer_name in ("ngram", "draft"):
        for plan in sorted(PLANS):
            runs.append((proposer_name, plan, PLANS[plan], {}))
    # chunked prefill: a 40-token budget prefills the 64-token prompt in several chunks, next to decoding rows
    for proposer_name in ("ngram", "draft"):
        runs.append((proposer_name, "chunked-prefill(k=3,budget=40)", lambda: StaticPlanner(3),
                     dict(max_k=3, token_budget=40)))

    totals = {"ngram": [0, 0], "draft": [0, 0]}
    token_total = token_equal = 0
    for proposer_name, plan, planner_factory, engine_args in runs:
        name = f"{label} {proposer_name} {plan}"
        if out_of_time():
            results.record(name, False, "skipped: --max-seconds reached")
            continue
        if proposer_name == "ngram":
            proposer = make_proposer("ngram")
        else:
            proposer = make_proposer("draft", loaded_model=draft, max_slots=batch, max_tokens=context)
        engine = make_engine(target, proposer, planner_factory(), batch=batch, context=context, **engine_args)
        try:
            outcomes = run_staggered(engine, prompts, max_tokens)
        except Exception as exc:  # noqa: BLE001 - an engine error is a FAIL in every dtype
            results.record(name, False, f"engine error: {type(exc).__name__}: {exc}")
            continue
        finally:
            engine.stop(0)
        outputs = [list(o.token_ids) for o in outcomes]
        proposed = sum(o.speculation.proposed for o in outcomes)
        accepted = sum(o.speculation.accepted for o in outcomes)
        totals[proposer_name][0] += proposed
        totals[proposer_name][1] += accepted
        equal = sum(got == want for got, want in zip(outputs, reference))
        prefix = sum(common_prefix(got, want) for got, want in zip(outputs, reference))
        token_total += sum(len(w) for w in reference)
        token_equal += prefix
        stats = f"{equal}/{len(prompts)} requests equal, accepted {accepted}/{proposed} proposed"
        if exact:
            diverged = []
            for i, (got, want) in enumerate(zip(outputs, reference)):
                if got != want:
                    at = common_prefix(got, want)
                    gaps = reference_gaps.get(i, [])
                    gap = f", reference top-2 gap there {gaps[at]:.2e}" if at < len(gaps) else ""
                    diverged.append(f"prompt {i} @ token {at}{gap}")
            results.record(name, not diverged, stats + (f"; DIVERGED {diverged}" if diverged else ""))
        else:
            results.info(name, f"{stats}, tokens before first divergence {prefix}/{sum(len(w) for w in reference)}")
    for proposer_name, (proposed, accepted) in totals.items():
        results.record(f"{label} {proposer_name} speculation happened", proposed > 0 and accepted > 0,
                       f"accepted {accepted}/{proposed} proposed over all runs")
    if not exact:
        results.info(f"{label} match rate", f"{token_equal}/{token_total} tokens "
                     f"({100.0 * token_equal / max(token_total, 1):.1f}%) before each request's first divergence "
                     "(half precision: batched and unbatched forwards round differently; informative only)")
    results.info(f"{label} time", f"{time.perf_counter() - t0:.1f} s")


def load_hf(folder: Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()


# ---------------------------------------------------------------- rejection sampling (as tests/test_verify.py)


V = 8
START = V   # row index of the start-of-sequence state in the transition tables


def _chain(seed: int, sharpness: float) -> torch.Tensor:
    """A Markov chain over V tokens: [V + 1, V], row START is the first token's distribution (CPU)."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(V + 1, V, generator=g), dim=-1)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Survival function of the chi-square statistic; bins the law gives 0 must stay empty."""
    counts, probs = counts.double().cpu(), probs.double().cpu()
    support = probs > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected = probs[support] * counts.sum()
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(int(support.sum()) - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, statistic / 2))


class ChainSampler:
    """The two-token generation of tests/test_verify.py with every probability table on `device`."""

    def __init__(self, device: torch.device, target: torch.Tensor) -> None:
        self.device = device
        self.target_cpu = target                                  # [V + 1, V]
        self.target = target.to(device)
        self.draft = _chain(seed=2, sharpness=2.0).to(device)     # a different, sharper chain
        self.deterministic = self.target_cpu.argsort(dim=-1)[:, V // 2].tolist()   # a middling token under p
        self.stacked = functools.cache(self._stacked)

    def _stacked(self, chain: str, *states: int) -> torch.Tensor:
        table = self.target if chain == "target" else self.draft
        return torch.stack([table[s] for s in states])            # [len(states), V] on device

    def marginals(self) -> tuple[torch.Tensor, torch.Tensor]:
        p_first = self.target_cpu[START]
        return p_first, p_first @ self.target_cpu[:V]


class DraftDraws:
    """Independent draws from DRAFT[state], in bulk per state (the same law as one at a time)."""

    def __init__(self, draft: torch.Tensor, generator: torch.Generator) -> None:
        self.draft, self.generator, self.pools = draft, generator, {}

    def __call__(self, state: int) -> int:
        pool = self.pools.get(state)
        if not pool:
            pool = self.pools[state] = sample(self.draft[state].expand(4096, V), self.generator).tolist()
        return pool.pop()


def generate_two(chains: ChainSampler, verify_step, deterministic: bool, draws: DraftDraws) -> tuple[int, int]:
    out: list[int] = []
    while len(out) < 2:
        prev = out[-1] if out else START
        if deterministic:
            x0 = chains.deterministic[prev]
            x1 = chains.deterministic[x0]
            draft_probs = None
        else:
            x0 = draws(prev)
            x1 = draws(x0)
            draft_probs = chains.stacked("draft", prev, x0)       # [2, V]
        accepted, next_token = verify_step(prev, x0, x1, draft_probs)
        out += [x0, x1][:accepted] + [next_token]
    return out[0], out[1]


def marginal_p_values(chains: ChainSampler, verify_step, deterministic: bool, trials: int) -> tuple[float, float]:
    draws = DraftDraws(chains.draft, torch.Generator().manual_seed(98))
    first = torch.zeros(V)
    second = torch.zeros(V)
    for _ in range(trials):
        y0, y1 = generate_two(chains, verify_step, deterministic, draws)
        first[y0] += 1
        second[y1] += 1
    p_first, p_second = chains.marginals()
    return chi_square_p_value(first, p_first), chi_square_p_value(second, p_second)


def check_rejection_sampling(results: Results, device: torch.device, args) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # thousands of tiny ops: intra-op threads only spin against each other
    try:
        _check_rejection_sampling(results, device, args)
    finally:
        torch.set_num_threads(threads)


def _check_rejection_sampling(results: Results, device: torch.device, args) -> None:
    trials = 5_000 if args.quick else 12_000
    control_trials = 5_000
    target = _chain(seed=1, sharpness=1.0)
    chains = ChainSampler(device, target)

    def rejection_step(generator):
        def step(prev, x0, x1, draft_probs):
            target_probs = chains.stacked("target", prev, x0, x1)   # [3, V] on device
            return rejection_verify(target_probs, [x0, x1], draft_probs, generator)
        return step

    generators = [("cpu-generator (engine's)", lambda: torch.Generator().manual_seed(99))]
    if device.type != "cpu":
        generators.append(("device-generator", lambda: torch.Generator(device=device).manual_seed(99)))
    for gen_name, make_generator in generators:
        for deterministic in ((False, True) if gen_name.startswith("cpu") else (False,)):
            kind = "deterministic" if deterministic else "draft-probs"
            t0 = time.perf_counter()
            p_first, p_second = marginal_p_values(chains, rejection_step(make_generator()), deterministic, trials)
            results.record(f"rejection_verify keeps p [{kind}, {gen_name}]", p_first > 1e-3 and p_second > 1e-3,
                           f"chi-square p = {p_first:.3g}, {p_second:.3g} over {trials} trials "
                           f"({time.perf_counter() - t0:.1f} s)")

    # verify_batch with logits on the device: temperature, top-k and top-p applied there.
    logits_cpu = torch.randn(V + 1, V, generator=torch.Generator().manual_seed(3)) * 1.5   # [V + 1, V]
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.9)
    truncated = probs_from_logits(logits_cpu.double(), params).float()                      # the law, on CPU
    logits = logits_cpu.to(device)
    batch_chains = ChainSampler(device, truncated)
    generator = torch.Generator().manual_seed(99)

    def batch_step(prev, x0, x1, draft_probs):
        row_logits = torch.stack([logits[prev], logits[x0], logits[x1]])[None]              # [1, 3, V] on device
        (verdict,) = verify_batch(row_logits, [Proposal([x0, x1], draft_probs)], [params], [generator])
        return verdict.num_accepted, verdict.tokens[-1]

    t0 = time.perf_counter()
    batch_trials = trials // 2
    p_first, p_second = marginal_p_values(batch_chains, batch_step, False, batch_trials)
    results.record("verify_batch keeps p [temperature 0.8, top-k 6, top-p 0.9, device logits]",
                   p_first > 1e-3 and p_second > 1e-3,
                   f"chi-square p = {p_first:.3g}, {p_second:.3g} over {batch_trials} trials "
                   f"({time.perf_counter() - t0:.1f} s)")

    # Negative control: redrawing from p (not the residual) after a rejection is biased; the test must see it.
    control_generator = torch.Generator().manual_seed(99)

    def biased_step(prev, x0, x1, draft_probs):
        target_probs = chains.stacked("target", prev, x0, x1)
        for j, token in enumerate((x0, x1)):
            q = 1.0 if draft_probs is None else float(draft_probs[j, token])
            if float(torch.rand((), generator=control_generator)) >= float(target_probs[j, token]) / q:
                return j, int(sample(target_probs[j], control_generator))
        return 2, int(sample(target_probs[2], control_generator))

    p_first, p_second = marginal_p_values(chains, biased_step, False, control_trials)
    results.record("chi-square detects a biased verifier (negative control)", min(p_first, p_second) < 1e-3,
                   f"p = {p_first:.3g}, {p_second:.3g} over {control_trials} trials")


# ---------------------------------------------------------------- timing


def check_timing(results: Results, device: torch.device, dtype: torch.dtype, args, workdir: Path) -> None:
    if args.quick:
        spec = TinySpec(vocab=1024, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, head_dim=32,
                        max_positions=512, init_range=0.02, seed=5)
        max_tokens, phrase_len = 16, 16
    else:
        spec = TinySpec(vocab=8192, hidden=512, intermediate=1536, layers=8, heads=8, kv_heads=4, head_dim=64,
                        max_positions=1024, init_range=0.02, seed=5)
        max_tokens, phrase_len = 64, 32
    # init 0.02 (transformers' default): greedy decoding soon loops, so prompt lookup is accepted often
    # (~75% at k = 3 on this model in float32), as it is on real summaries; at 0.1 it is never accepted.
    folder = workdir / "timing-model"
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_random_checkpoint(folder, spec)
    model = load_model(folder, device=device, dtype=dtype)
    rng = random.Random(21)

    def make_prompts_for(batch: int) -> list[tuple[int, ...]]:
        phrases = [[rng.randrange(2, spec.vocab - 1) for _ in range(phrase_len)] for _ in range(batch)]
        return [tuple(phrase * 3) for phrase in phrases]

    def measure(prompts: list[tuple[int, ...]], k: int) -> tuple[int, float, float]:
        engine = make_engine(model, make_proposer("ngram"), StaticPlanner(k), batch=16,
                             context=spec.max_positions, token_budget=2048)
        try:
            synchronize(device)
            start = time.perf_counter()
            handles = [engine.submit(GenerationRequest(f"t{i}", p, max_tokens, ignore_eos=True))
                       for i, p in enumerate(prompts)]
            outcomes = [h.result(timeout=RESULT_TIMEOUT_S) for h in handles]
            synchronize(device)
            wall = time.perf_counter() - start
        finally:
            engine.stop(0)
        tokens = sum(o.completion_tokens for o in outcomes)
        steps = sum(o.speculation.decode_steps for o in outcomes)
        emitted = sum(o.speculation.emitted for o in outcomes)
        return tokens, wall, emitted / steps if steps else 0.0

    warm = make_prompts_for(2)
    measure(warm, 3)   # warm-up: kernels, allocator, rope tables
    measure(warm, 0)
    name = str(dtype).removeprefix("torch.")
    print(f"timing [{name}] random {spec.layers}-layer hidden-{spec.hidden} vocab-{spec.vocab} model, "
          f"prompts {3 * phrase_len} tokens (a phrase x3), {max_tokens} new tokens each, ngram proposer")
    print(f"  {'batch':>5}  {'mode':<12} {'tokens':>6} {'wall s':>7} {'tok/s':>9} {'tok/step':>8}")
    for batch in (1, 16):
        rates = {}
        prompts = make_prompts_for(batch)   # the same prompts for both modes
        for k in (0, 3):
            tokens, wall, per_step = measure(prompts, k)
            rates[k] = tokens / wall
            mode = "plain k=0" if k == 0 else "spec k=3"
            print(f"  {batch:>5}  {mode:<12} {tokens:>6} {wall:>7.3f} {rates[k]:>9.1f} {per_step:>8.2f}")
        results.info(f"timing[{name}] batch {batch}", f"speculative/plain tokens/s = {rates[3] / rates[0]:.2f}x")


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--dtypes", default=None,
                        help="comma list for the equality checks (default: float32,bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU smoke run)")
    parser.add_argument("--skip", default="", help="comma list of checks to skip: equality,sampling,timing")
    parser.add_argument("--max-seconds", type=float, default=200.0,
                        help="skip (as FAIL) what is left after this long (default 200)")
    args = parser.parse_args()

    out_dir = os.environ.get("OUT")
    log_file = None
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        log_file = open(Path(out_dir) / "gpu_check.txt", "w", encoding="utf-8")
        sys.stdout = Tee(sys.__stdout__, log_file)
        sys.stderr = Tee(sys.__stderr__, log_file)

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    dtypes = [getattr(torch, d.strip()) for d in (args.dtypes or
              ("float32,bfloat16" if device.type == "cuda" else "float32")).split(",") if d.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if device.type == "cpu" and args.quick:
        torch.set_num_threads(min(2, torch.get_num_threads()))

    import smartspec
    import smartspec.worker.engine as engine_module
    print(f"gpu_check: python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {__import__('transformers').__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", dtypes {[str(d).removeprefix('torch.') for d in dtypes]}, quick={args.quick}")
    print(f"smartspec from {smartspec.__file__}; engine from {engine_module.__file__}")
    if device.type == "cuda":
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                print(f"cuda matmul allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
                      f"float32_matmul_precision={torch.get_float32_matmul_precision()}")
        except Exception:  # noqa: BLE001 - informative only
            pass
    results = Results()
    mapped = all(str(getattr(sys.modules[name], "__file__", "")).startswith(str(REPO))
                 for name in ("smartspec", "smartspec.worker", "smartspec.worker.engine", "smartspec.core"))
    results.record("smartspec imported from this checkout", mapped, str(REPO))
    if PB2_WARNING:
        results.warn("protobuf", PB2_WARNING)
    if sys.modules.get("redis") is not None:
        results.warn("imports", "redis got imported (the engine path should not need it)")

    started = time.perf_counter()
    DEADLINE[0] = started + args.max_seconds
    with tempfile.TemporaryDirectory(prefix="smartspec-gpu-check-") as tmp:
        workdir = Path(tmp)
        if "equality" not in skip:
            model_types = ("llama", "qwen2")
            for dtype in dtypes:
                for model_type in model_types:
                    label = f"equality[{model_type},{str(dtype).removeprefix('torch.')}]"
                    results.guarded(label, lambda: check_equality(results, device, dtype, model_type, args, workdir))
        if "sampling" not in skip:
            if out_of_time():
                results.record("rejection sampling", False, "skipped: --max-seconds reached")
            else:
                results.guarded("rejection sampling", lambda: check_rejection_sampling(results, device, args))
        if "timing" not in skip:
            for dtype in dtypes:
                if out_of_time():
                    results.info(f"timing[{dtype}]", "skipped: --max-seconds reached")
                else:
                    results.guarded(f"timing[{dtype}]", lambda: check_timing(results, device, dtype, args, workdir))

    elapsed = time.perf_counter() - started
    verdict = "FAIL" if results.failed else "PASS"
    print(f"\n{verdict}: {results.passed} passed, {len(results.failed)} failed"
          + (f" ({', '.join(results.failed)})" if results.failed else "") + f"; {elapsed:.0f} s")
    if log_file is not None:
        sys.stdout.flush()
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        log_file.close()
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
