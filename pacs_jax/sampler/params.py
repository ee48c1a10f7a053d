"""SamplingParams: what the sampler draws (temperature, top-k, top-p, stop tokens) and how it runs
(decode segments, layers, prefill chunks, the engine and its settings)."""

from __future__ import annotations

import dataclasses

DECODE_LAYERS = ("auto", "scan", "unrolled")
# "static": one batch of every row until the last one stops (sampler/static.py). "compact": the
# unfinished rows are gathered into a smaller batch every few steps, so decode cost follows the
# tokens actually generated (sampler/compact.py). "auto": compact on CPU, where
# bench/rollout_lengths.py measured it; static elsewhere until a run on a TPU or GPU measures
# compact's speed there (its memory is checked by the compile command: rollout.compact_max_keep).
# "slots": a cache of `slots` response slots, refilled as responses stop (sampler/slots.py):
# memory bounded by the slot count whatever the number of rows.
ENGINES = ("auto", "static", "compact", "slots")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    # The decode loop runs in this many segments; segment j attends only to the cache slots
    # written by its end, not to the whole cache (1 = one loop over every slot).
    decode_segments: int = 4
    # ... but no segment shorter than this many steps: each segment is its own compiled copy of
    # the decode loop, and a short segment skips too few slots to repay it (bench.step, 64 new
    # tokens, 4-layer 0.85M model on CPU: two 32-step segments instead of one saved 0.01 s per
    # rollout of 0.17 s and cost 0.6 s of a 5.6-6.3 s first step). 1 = exactly decode_segments.
    min_segment_steps: int = 64
    # How a decode step runs the layers: "scan" (over the stacked weights, as training does) or
    # "unrolled" (over per-layer copies of the weights and a per-layer cache: faster on XLA CPU,
    # which copies each layer out of the stacks per step; on TPU it would double the weights'
    # memory). "auto" = unrolled on CPU, scan elsewhere.
    decode_layers: str = "auto"
    # The prefill runs in chunks of this many prompt tokens, skipping the leading chunks that are
    # padding in every row (0 = one pass over the whole bucket; a bucket that is not a multiple
    # of the chunk is also prefilled in one pass).
    prefill_chunk: int = 64
    # Which decode engine runs (ENGINES). With "compact": every `compact_every` decode steps the
    # unfinished rows move into a smaller batch whose row count is a multiple of
    # ceil(rows / compact_buckets) (so at most compact_buckets batch shapes are compiled).
    engine: str = "auto"  # the trainer's default (RolloutConfig.engine)
    compact_every: int = 32
    compact_buckets: int = 16
    # A regroup happens only when the new batch keeps at most this fraction of the running rows
    # (a regroup holds both caches: its peak is at most (1 + this) x the running cache); 1.0 =
    # whenever the rows fit a smaller bucket. Default: RolloutConfig.compact_max_keep's.
    compact_max_keep: float = 0.4
    # With engine "slots": how many responses decode at once (each slot holds one response's cache
    # of prompt + max_new_tokens columns); 0 only with another engine.
    slots: int = 0

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"rollout.max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"rollout.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"rollout.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.decode_segments < 1:
            raise ValueError(f"rollout.decode_segments must be >= 1, got {self.decode_segments}")
        if self.min_segment_steps < 1:
            raise ValueError(f"min_segment_steps must be >= 1, got {self.min_segment_steps}")
        if self.prefill_chunk < 0:
            raise ValueError(f"rollout.prefill_chunk must be >= 0 (0 = one pass), got {self.prefill_chunk}")
        if self.decode_layers not in DECODE_LAYERS:
            raise ValueError(f"rollout.decode_layers must be one of {list(DECODE_LAYERS)}, got {self.decode_layers!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"rollout.engine must be one of {list(ENGINES)}, got {self.engine!r}")
        if self.compact_every < 1:
            raise ValueError(f"rollout.compact_every must be >= 1, got {self.compact_every}")
        if self.compact_buckets < 1:
            raise ValueError(f"rollout.compact_buckets must be >= 1, got {self.compact_buckets}")
        if not 0 < self.compact_max_keep <= 1:
            raise ValueError(f"rollout.compact_max_keep must be in (0, 1], got {self.compact_max_keep}")
        if self.slots < 0 or (self.engine == "slots" and self.slots < 1):
            raise ValueError(f"rollout.slots must be >= 1 with rollout.engine=slots (0 = unused otherwise), got {self.slots}")

    def unrolls_layers(self, platform: str) -> bool:
        """Whether decode runs the layers unrolled on `platform` ("cpu", "tpu", "gpu")."""
        return self.decode_layers == "unrolled" or (self.decode_layers == "auto" and platform == "cpu")

    def engine_on(self, platform: str) -> str:
        """The engine that runs on `platform` ("cpu", "tpu", "gpu"): `engine`, with "auto" resolved."""
        if self.engine != "auto":
            return self.engine
        return "compact" if platform == "cpu" else "static"

    def compacts(self, platform: str) -> bool:
        """Whether the compacting engine runs on `platform` ("cpu", "tpu", "gpu")."""
        return self.engine_on(platform) == "compact"

    def segment_ends(self) -> list[int]:
        """Decode steps at which each segment ends (increasing, the last = max_new_tokens)."""
        count = max(1, min(self.decode_segments, self.max_new_tokens // self.min_segment_steps))
        # Ceil of an even split: strictly increasing since count <= max_new_tokens.
        return [-(-self.max_new_tokens * (i + 1) // count) for i in range(count)]
