"""Hook: run the SDSAT draft pass on the target model, on the device, in the target's own paged KV blocks.

Written against vLLM 0.32 (`GPUModelRunner.sample_tokens`, which calls `_bookkeeping_sync` and then
`propose_draft_token_ids`, `v1/worker/gpu_model_runner.py`; the CPU runner subclasses it).

vLLM's `custom_class` branch hands a proposer host lists of sampled ids after bookkeeping; under
async scheduling those lists are empty and the host's token counts hold placeholders. SDSAT instead
drafts the way vLLM's on-device drafters (EAGLE, draft model) do, with no host sync:
- before bookkeeping, vLLM's `prepare_next_token_ids_padded` finds each row's next token t0 in the
  device tensor of sampled ids (-1 = rejected), and `_copy_valid_sampled_token_count` hands it to the
  next step, which async bookkeeping requires;
- the draft pass then runs on `TargetDraftPass`, the whole vLLM-facing surface the proposer sees:
  t0 and its position per row, and a forward of given tokens at given positions that writes KV into
  the rows' own blocks and returns logits;
- drafts go back as a [num_reqs, width] device tensor, which vLLM copies to the host only when its
  scheduler needs them; with automatic K (`patches/auto_k.py`) and no async scheduling they go
  back as host lists of each request's own count.

Hybrid drafting (`lookup: "ngram"`, synchronous scheduling only): among the rows that draft this step
(automatic K's count, or the fixed K, above 0), those whose host token history (just updated by
bookkeeping, as for vLLM's ngram method) ends in an n-gram seen before take the lookup draft, up to K
tokens, and skip the draft pass, which covers only the remaining rows; a step where every drafting
row has a lookup draft runs no draft pass. Drafts go back as host lists. When any request samples,
lookup rows get a one-hot q beside the adaptive rows' own q, so one rejection sampler call stays
lossless for both.

The draft forward runs the target's compiled model like the verification forward does. On CPU vLLM
traces the model once with a dynamic token count (`DYNAMO_TRACE_ONCE`, no guards, no CUDA graphs), so
the draft's n*K tokens reuse that graph: no recompile, and a draft forward costs what a verification
forward of as many tokens costs (docs/performance.md). On CUDA the draft replays the target's
PIECEWISE CUDA graphs the way vLLM's drafters replay theirs (`SpecDecodeBaseProposer.propose`).
"""
import dataclasses

import torch
from vllm.config import CUDAGraphMode
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.forward_context import set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata
from vllm.v1.spec_decode.utils import PADDING_SLOT_ID
from vllm.v1.utils import CpuGpuBuffer
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_sdsat.config import SdsatConfigError
from vllm_sdsat.engine.draft_sampling import one_hot_probs
from vllm_sdsat.patches.auto_k import LOOKUP_ONLY, NUM_DRAFTS, TAKES_LOOKUP
from vllm_sdsat.patches.draft_kinds import LOOKUP_REQ_IDS

_original_bookkeeping = GPUModelRunner._bookkeeping_sync
_original_propose = GPUModelRunner.propose_draft_token_ids


class TargetDraftPass:
    """The target model of one runner, seen as a drafter's forward function."""

    def __init__(self, runner: GPUModelRunner):
        groups = runner.kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise SdsatConfigError(
                f"sdsat: models with {len(groups)} KV cache groups (hybrid attention) are not supported")
        block_table = runner.input_batch.block_table[0]
        if block_table.dcp_world_size > 1 or block_table.pcp_world_size > 1:
            raise SdsatConfigError("sdsat: context parallelism is not supported")
        self.runner = runner
        self.block_size = block_table.block_size
        self.layer_names = groups[0].layer_names
        # Chunk the draft pass so it never exceeds what the runner's buffers were sized for.
        self.max_tokens = runner.scheduler_config.max_num_batched_tokens
        # Metadata builders of our own: the target's may keep persistent buffers that the next step's
        # input preparation rewrites while this pass is still queued on the device.
        self.attn_groups = []
        for group in runner.attn_groups[0]:
            own = dataclasses.replace(group, metadata_builders=[], kernel_block_table=None,
                                      kernel_block_offsets=None)
            own.create_metadata_builders(runner.vllm_config, runner.device, kernel_block_size=group.kernel_block_size)
            self.attn_groups.append(own)
        # Read by vLLM's `prepare_next_token_ids_padded`: the token a discarded row would continue with.
        self.backup_next_token_ids = CpuGpuBuffer(runner.max_num_reqs, dtype=torch.int32, device=runner.device,
                                                  with_numpy=True)
        self.next_token_ids: torch.Tensor | None = None
        self.valid_counts: torch.Tensor | None = None
        # CUDA graphs read their inputs from the buffers they were captured with: the runner's token-id
        # and position buffers, which models fed embeddings or M-RoPE positions do not use.
        self.cudagraphs = not (runner.supports_mm_inputs or runner.enable_prompt_embeds or runner.uses_mrope)

    def take_sampled(self, sampled_token_ids: torch.Tensor) -> None:
        """Record each row's last valid sampled token and its count of valid sampled tokens (0 where
        the sample is discarded: rows still mid-prefill), on the device, and pass them to the runner's
        next step. Costs two small kernels and a host loop over the rows."""
        runner = self.runner
        self.next_token_ids, self.valid_counts = SpecDecodeBaseProposer.prepare_next_token_ids_padded(
            self, sampled_token_ids, runner.requests, runner.input_batch, runner.discard_request_mask.gpu)
        runner._copy_valid_sampled_token_count(self.next_token_ids, self.valid_counts)

    def fresh_tokens(self, common: CommonAttentionMetadata, spec: SpecDecodeMetadata | None):
        """Per batch row: t0, its position, and whether the row is discarded (drafts nothing).

        The verification step fed `m` drafts after the previous token, so its seq_len counts m+1 new
        positions; t0 follows the `valid - 1` accepted drafts: position = seq_len - m - 1 + valid."""
        n = self.next_token_ids.shape[0]
        cu = None if spec is None else spec.cu_num_draft_tokens
        num_drafts = 0 if cu is None else cu.diff(prepend=cu.new_zeros(1))
        positions = common.seq_lens[:n] - num_drafts - 1 + self.valid_counts
        return self.next_token_ids, positions.long(), self.valid_counts == 0

    @torch.inference_mode()
    def forward(self, common: CommonAttentionMetadata, input_ids: torch.Tensor, positions: torch.Tensor,
                discarded: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for `input_ids` [n, q] at `positions` [n, q], each attending to the cached context of
        its batch row (`rows`, a host index tensor; None: all rows in order) as the verification step's
        attention metadata `common` describes it. KV is written to the rows' own blocks, except for
        `discarded` rows, which write none."""
        n, q = input_ids.shape
        per_chunk = max(1, self.max_tokens // q)
        out = [self._forward_chunk(common, slice(s, s + per_chunk) if rows is None else rows[s:s + per_chunk],
                                   input_ids[s:s + per_chunk], positions[s:s + per_chunk], discarded[s:s + per_chunk])
               for s in range(0, n, per_chunk)]
        return torch.cat(out) if len(out) > 1 else out[0]

    def _forward_chunk(self, common, rows: slice | torch.Tensor, input_ids, positions, discarded):
        runner, device = self.runner, self.runner.device
        n_req, q = input_ids.shape
        block_table = common.block_table_tensor[rows]
        block_ids = torch.gather(block_table.long(), 1, positions // self.block_size)
        slot_mapping = (block_ids * self.block_size + positions % self.block_size)
        slot_mapping = slot_mapping.masked_fill(discarded[:, None], PADDING_SLOT_ID).reshape(-1)
        # The draft reaches at most q positions past the verification step's context; the host-side
        # bounds follow from that step's own bounds, so nothing is read back from the device.
        upper_bound = common.seq_lens_cpu_upper_bound
        flat_positions = positions.reshape(-1)
        draft_common = CommonAttentionMetadata(
            query_start_loc=torch.arange(0, (n_req + 1) * q, q, dtype=torch.int32, device=device),
            query_start_loc_cpu=torch.arange(0, (n_req + 1) * q, q, dtype=torch.int32),
            seq_lens=(positions[:, -1] + 1).to(torch.int32),
            seq_lens_cpu_upper_bound=None if upper_bound is None else upper_bound[rows] + q,
            num_reqs=n_req,
            num_actual_tokens=n_req * q,
            max_query_len=q,
            max_seq_len=common.max_seq_len + q,
            block_table_tensor=block_table,
            slot_mapping=slot_mapping,
            causal=True,
            positions=flat_positions,
            is_prefilling=torch.zeros(n_req, dtype=torch.bool, device=device),
        )
        attn_metadata = {}
        for group in self.attn_groups:
            attn_metadata.update(dict.fromkeys(group.layer_names, group.build_metadata(draft_common)))
        # PIECEWISE only, as vLLM's drafters: a FULL graph would replay the target's attention metadata
        # buffers, not ours. On CPU (no capture sizes) this is NONE with the unpadded count.
        num_tokens = n_req * q
        modes = {CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE} if self.cudagraphs else {CUDAGraphMode.NONE}
        mode, batch = runner.cudagraph_dispatcher.dispatch(num_tokens, valid_modes=modes)
        flat_ids = input_ids.reshape(-1).to(torch.int32)
        if mode == CUDAGraphMode.PIECEWISE:
            padded = batch.num_tokens  # a captured size; padding tokens write no KV and are cut off below
            runner.input_ids.gpu[:num_tokens].copy_(flat_ids)
            runner.positions[:num_tokens].copy_(flat_positions)
            runner.positions[num_tokens:padded].zero_()
            flat_ids, flat_positions = runner.input_ids.gpu[:padded], runner.positions[:padded]
            slot_mapping = torch.cat([slot_mapping, slot_mapping.new_full((padded - num_tokens,), PADDING_SLOT_ID)])
        with set_forward_context(attn_metadata, runner.vllm_config, num_tokens=batch.num_tokens,
                                 cudagraph_runtime_mode=mode, batch_descriptor=batch,
                                 slot_mapping=dict.fromkeys(self.layer_names, slot_mapping)):
            hidden = runner.model(input_ids=flat_ids, positions=flat_positions, intermediate_tensors=None,
                                  inputs_embeds=None)
        return runner.model.compute_logits(hidden[:num_tokens])


def sdsat_target(runner: GPUModelRunner) -> TargetDraftPass | None:
    from vllm_sdsat.engine.proposer import SdsatProposer

    if not isinstance(getattr(runner, "drafter", None), SdsatProposer):
        return None
    if not hasattr(runner, "_sdsat_target"):
        runner._sdsat_target = TargetDraftPass(runner)
    return runner._sdsat_target


def _bookkeeping_sync(self: GPUModelRunner, scheduler_output, sampler_output, *args, **kwargs):
    target = sdsat_target(self)
    # Without async scheduling, t0 is needed only by a draft pass; with it, the next step's input
    # preparation reads the valid counts every step.
    if target is not None and (self.use_async_scheduling or scheduler_output.num_spec_tokens_to_schedule):
        target.take_sampled(sampler_output.sampled_token_ids)
    return _original_bookkeeping(self, scheduler_output, sampler_output, *args, **kwargs)


def propose_draft_token_ids(self: GPUModelRunner, scheduler_output, sampled_token_ids, sampling_metadata,
                            hidden_states, sample_hidden_states, aux_hidden_states, spec_decode_metadata,
                            common_attn_metadata, *args, **kwargs):
    target = sdsat_target(self)
    if target is None:
        return _original_propose(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                                 sample_hidden_states, aux_hidden_states, spec_decode_metadata,
                                 common_attn_metadata, *args, **kwargs)
    # `sampled_token_ids` are the host lists of the custom_class path (empty under async scheduling);
    # `take_sampled` has read the device tensor.
    drafter = self.drafter
    req_ids = self.input_batch.req_ids
    per_request = getattr(scheduler_output, NUM_DRAFTS, None)  # set by patches/auto_k.py
    num_drafts = ([per_request.get(r, 0) for r in req_ids] if per_request is not None
                  else [scheduler_output.num_spec_tokens_to_schedule] * len(req_ids))
    hybrid = drafter.lookup is not None  # counts by kind only where there are two kinds
    if hybrid and spec_decode_metadata is not None:
        drafter.stats.verified(req_ids, spec_decode_metadata.num_draft_tokens, sampled_token_ids)
    # This step's rejection sampler has used the previous q: free it before the draft pass makes the next
    # one, as vLLM's own propose_draft_token_ids does, so that two never coexist.
    self._draft_probs = self._draft_prob_req_ids = None
    if not self.use_async_scheduling and not any(num_drafts):  # nothing to draft: hand back no drafts
        return [[] for _ in req_ids]
    # Automatic K's drafting mode takes adaptive drafts alone (set per step; a fixed K always looks up).
    takes_lookup = hybrid and getattr(scheduler_output, TAKES_LOOKUP, True)
    lookup = _lookup_drafts(self, num_drafts, sampled_token_ids) if takes_lookup else {}
    lookup_only = getattr(scheduler_output, LOOKUP_ONLY, False)  # automatic K's lookup mode: no draft pass
    adaptive = [0 if i in lookup or lookup_only else k for i, k in enumerate(num_drafts)]
    rows, drafts, probs = drafter.propose_from_target(target, common_attn_metadata, spec_decode_metadata,
                                                     sampling_metadata, adaptive)
    drafting = list(range(len(req_ids))) if rows is None else rows.tolist()
    width = drafts.shape[1]
    if hybrid:
        setattr(self, LOOKUP_REQ_IDS, frozenset(req_ids[i] for i in lookup))  # read by patches/draft_kinds.py
        made = {req_ids[i]: ("adaptive", min(adaptive[i], width)) for i in drafting}
        made.update((req_ids[i], ("lookup", len(d))) for i, d in lookup.items())
        drafter.stats.drafted(made, draft_pass=width > 0)
        if get_tensor_model_parallel_rank() == 0:  # one log line per engine, not per TP rank
            drafter.stats.maybe_log()
    self._draft_probs = probs
    self._draft_prob_req_ids = None if probs is None else [req_ids[i] for i in drafting]
    if lookup:  # synchronous (patches/speculative_config.py): host lists of each row's own drafts
        by_row = dict(zip(drafting, drafts.tolist()))
        lists = [lookup[i] if i in lookup else by_row.get(i, [])[:k] for i, k in enumerate(adaptive)]
        if probs is not None:  # q for every drafting row: the adaptive rows' own, one-hot for lookup rows
            self._draft_probs = one_hot_probs([lookup.get(i, []) for i in range(len(req_ids))],
                                              max(map(len, lists)), probs.shape[-1], probs.device)
            self._draft_probs[torch.tensor(drafting, device=probs.device), :width] = probs
            self._draft_prob_req_ids = list(req_ids)
        return lists
    if not self.use_async_scheduling and per_request is not None:
        # The scheduler takes each request's drafts as they come: exactly its own count, none for rows
        # that did not draft. (One host copy, which the synchronous path makes for drafts anyway.)
        by_row = dict(zip(drafting, drafts.tolist()))
        return [by_row.get(i, [])[:k] for i, k in enumerate(num_drafts)]
    if rows is not None:  # async: a row of the [num_reqs, width] tensor per request; the scheduler's
        full = drafts.new_zeros((len(req_ids), drafts.shape[1]))  # placeholders take each one's count
        full[rows.to(drafts.device, non_blocking=True)] = drafts
        drafts = full
    return drafts


def _lookup_drafts(runner: GPUModelRunner, num_drafts: list[int], sampled: list[list[int]]) -> dict[int, list[int]]:
    """{row: lookup draft} for rows that draft this step, sampled a token (not mid-prefill) and are below
    the model length, read from the runner's host token history, which bookkeeping has just updated."""
    batch = runner.input_batch
    rows = [i for i, (k, tokens) in enumerate(zip(num_drafts, sampled))
            if k and tokens and batch.num_tokens_no_spec[i] < runner.max_model_len]
    return runner.drafter.lookup.propose(rows, batch.num_tokens_no_spec, batch.token_ids_cpu)


def apply() -> None:
    GPUModelRunner._bookkeeping_sync = _bookkeeping_sync
    GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids
