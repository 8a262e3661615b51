"""What the runner keeps: per request (token ids, blocks, sampling state), per row of a
step's forward, and per step between its forwards and its sampling."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from vllm_ray_metal.engine import pooling


@dataclass
class RequestState:
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: object
    block_ids: list[int]
    num_computed_tokens: int
    generator: np.random.Generator | None
    output_token_ids: list[int] = field(default_factory=list)
    num_prompt_logprobs: int | None = None
    prompt_logprobs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    pooled: pooling.Pooled | None = None  # pooling requests (runner="pooling")
    prompt_array: np.ndarray | None = None  # (token_array's cache)
    lora_request: object | None = None  # vLLM's LoRARequest (None: the base model)
    draft_computed: int = 0  # tokens the draft model's KV holds right (draft.py)
    draft_proposed: list[int] = field(default_factory=list)  # its last proposals
    draft_hashes: list[int] = field(default_factory=list)  # per full block (draft.py)
    draft_recorded: int = 0  # leading blocks recorded as filled by the draft
    spec_gain: float | None = None  # running mean of tokens its drafts won (DraftPolicy)

    @property
    def lora_id(self) -> int:
        return self.lora_request.lora_int_id if self.lora_request is not None else 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def tokens(self, start: int, count: int) -> list[int]:
        prompt_len = len(self.prompt_token_ids)
        if start + count <= prompt_len:
            return self.prompt_token_ids[start:start + count]
        return (self.prompt_token_ids + self.output_token_ids)[start:start + count]

    def token_array(self) -> np.ndarray:
        """Every known token as one array (the prompt's part converted once)."""
        if self.prompt_array is None:
            self.prompt_array = np.asarray(self.prompt_token_ids, np.int64)
        return np.concatenate([self.prompt_array, np.asarray(self.output_token_ids, np.int64)])


@dataclass
class Row:
    state: RequestState
    start: int
    count: int  # tokens the row feeds: known ones, then ``drafts``
    index: int  # position in the step's output
    drafts: list[int] = field(default_factory=list)  # proposals to verify (speculative)

    @property
    def known(self) -> int:
        return self.count - len(self.drafts)

    def token_ids(self) -> list[int]:
        # a -1 draft (the scheduler's placeholder) is fed as token 0 and always rejected
        return self.state.tokens(self.start, self.known) + [max(d, 0) for d in self.drafts]


@dataclass
class Step:
    """A step between its forwards and its sampling (vLLM's two-phase step)."""
    req_ids: list[str]
    num_rows: int
    to_sample: list[Row]
    logits: mx.array | None
    prompt_logprobs: dict
    pooled: list | None  # pooling runner: one embedding (or None) per row
    num_drafts: dict[str, int]  # speculative decoding: drafts per request ({}: none)
    num_spec_tokens: int = 0  # drafts to propose for the next step (vLLM's schedule)
    started: float = 0.0  # perf_counter at execute_model (DraftPolicy times decode steps)
    decoding: bool = False  # every row decodes one known token (plus drafts)
