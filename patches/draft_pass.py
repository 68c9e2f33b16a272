"""Hook: run the SDSAT draft pass on the target model, in the target's own paged KV blocks.

Written against vLLM 0.32 (`GPUModelRunner.propose_draft_token_ids`, `v1/worker/gpu_model_runner.py`;
the CPU runner subclasses it).

vLLM's `custom_class` branch hands a proposer only token ids. SDSAT needs the runner itself: the
target model, its block table and attention metadata builders. This hook routes the call for an
`SdsatProposer` through `TargetDraftPass`, which is the whole vLLM-facing surface the proposer sees:
which requests have a fresh token, and a forward of given tokens at given positions that writes KV
into those requests' own blocks and returns logits.
"""
import torch
from vllm.forward_context import set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_sdsat.config import SdsatConfigError

_original = GPUModelRunner.propose_draft_token_ids


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
        self.block_table = block_table
        self.layer_names = groups[0].layer_names
        # Chunk the draft pass so it never exceeds what the runner's buffers were sized for.
        self.max_tokens = runner.scheduler_config.max_num_batched_tokens

    def fresh_tokens(self, sampled_token_ids: list[list[int]]):
        """Batch rows that sampled a token this step, that token t0, and t0's position."""
        rows = [i for i, toks in enumerate(sampled_token_ids) if toks]
        t0 = [sampled_token_ids[i][-1] for i in rows]
        positions = self.runner.input_batch.num_tokens_no_spec[rows] - 1
        return rows, t0, positions

    @torch.inference_mode()
    def forward(self, rows: list[int], input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits for `input_ids` [len(rows), q] at `positions` [len(rows), q], row i of the batch
        attending to its own cached context. KV is written to the rows' own blocks."""
        q = input_ids.shape[1]
        per_chunk = max(1, self.max_tokens // q)
        out = [self._forward_chunk(rows[s:s + per_chunk], input_ids[s:s + per_chunk], positions[s:s + per_chunk])
               for s in range(0, len(rows), per_chunk)]
        return torch.cat(out) if len(out) > 1 else out[0]

    def _forward_chunk(self, rows, input_ids, positions):
        runner, device = self.runner, self.runner.device
        n_req, q = input_ids.shape
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=device)
        positions = positions.to(device=device, dtype=torch.long)
        bs = self.block_table.block_size
        block_table = self.block_table.get_device_tensor(runner.input_batch.num_reqs)[rows_t]
        block_ids = torch.gather(block_table.long(), 1, positions // bs)
        slot_mapping = (block_ids * bs + positions % bs).reshape(-1)

        seq_lens = (positions[:, -1] + 1).to(torch.int32)
        seq_lens_cpu = seq_lens.cpu()
        query_start_loc_cpu = torch.arange(0, (n_req + 1) * q, q, dtype=torch.int32)
        flat_positions = positions.reshape(-1)
        common = CommonAttentionMetadata(
            query_start_loc=query_start_loc_cpu.to(device),
            query_start_loc_cpu=query_start_loc_cpu,
            seq_lens=seq_lens,
            seq_lens_cpu_upper_bound=seq_lens_cpu,
            num_reqs=n_req,
            num_actual_tokens=n_req * q,
            max_query_len=q,
            max_seq_len=int(seq_lens_cpu.max()),
            block_table_tensor=block_table,
            slot_mapping=slot_mapping,
            causal=True,
            positions=flat_positions,
            is_prefilling=torch.zeros(n_req, dtype=torch.bool, device=device),
        )
        attn_metadata = {}
        for group in runner.attn_groups[0]:
            md = group.build_metadata(common, 0)
            attn_metadata.update(dict.fromkeys(group.layer_names, md))
        with set_forward_context(attn_metadata, runner.vllm_config, num_tokens=n_req * q,
                                 slot_mapping=dict.fromkeys(self.layer_names, slot_mapping)):
            hidden = runner.model(input_ids=input_ids.reshape(-1).to(device=device, dtype=torch.int32),
                                  positions=flat_positions, intermediate_tensors=None, inputs_embeds=None)
        return runner.model.compute_logits(hidden)


def propose_draft_token_ids(self: GPUModelRunner, scheduler_output, sampled_token_ids, sampling_metadata,
                            *args, **kwargs):
    from vllm_sdsat.engine.proposer import SdsatProposer

    if not isinstance(getattr(self, "drafter", None), SdsatProposer):
        return _original(self, scheduler_output, sampled_token_ids, sampling_metadata, *args, **kwargs)
    if isinstance(sampled_token_ids, torch.Tensor):  # padded GPU path: -1 marks rejected slots
        sampled_token_ids = [[t for t in row if t >= 0] for row in sampled_token_ids.tolist()]
    if not hasattr(self, "_sdsat_target"):
        self._sdsat_target = TargetDraftPass(self)
    drafts, probs = self.drafter.propose_from_target(
        self._sdsat_target, sampled_token_ids, sampling_metadata, self.input_batch.num_reqs)
    self._draft_probs = probs
    self._draft_prob_req_ids = None if probs is None else list(self.input_batch.req_ids)
    return drafts


def apply() -> None:
    GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids
