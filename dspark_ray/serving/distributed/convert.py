"""Conversion between engine types and `dspark.v1` worker messages, both directions.

The only module of the distributed backend that builds or reads protobuf messages field by field
(the generated modules come from `dspark_ray.serving.wire`). It knows nothing about Ray, gRPC
channels or which process it runs in.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dspark_ray.core.sampling import SamplingParams
from dspark_ray.core.verification import PLACEHOLDER_TOKEN_ID, VerificationResult
from dspark_ray.engine.drafters.base import DraftProposal, TargetFeatures
from dspark_ray.engine.sequence import GenerationRequest, Sequence
from dspark_ray.engine.verifier import VerifyOutput
from dspark_ray.serving.distributed import codec
from dspark_ray.serving.wire import worker_pb2 as pb

# Workers never stop a sequence themselves: the coordinator does. Their copies get no token limit.
UNLIMITED_TOKENS = 1 << 30


@dataclass(frozen=True)
class EncodedDraftProposal(DraftProposal):
    """A proposal whose draft distributions stay in wire form until the target rebuilds them.

    `draft_probs` is None: the coordinator never materialises [B, K, V]; `wire_probs[b]` holds one
    SparseDistribution per drafted token of row b (empty for greedy rows).
    """

    wire_probs: tuple[tuple[pb.SparseDistribution, ...], ...] = ()

    def select(self, rows: list[int]) -> "EncodedDraftProposal":
        index = torch.tensor(rows, dtype=torch.long)
        return EncodedDraftProposal(self.draft_token_ids[index], self.num_draft_tokens[index], draft_probs=None,
                                    wire_probs=tuple(self.wire_probs[row] for row in rows))


# --- sequences ---------------------------------------------------------------------------------

def sampling_to_wire(params: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                             min_p=params.min_p)


def sampling_from_wire(message: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(message.temperature, message.top_k, message.top_p, message.min_p)


def spec_to_wire(seq: Sequence, seed: int, with_output: bool = False) -> pb.SequenceSpec:
    return pb.SequenceSpec(seq_id=seq.seq_id, prompt_token_ids=seq.request.prompt_token_ids,
                           output_token_ids=seq.output_token_ids if with_output else [],
                           sampling=sampling_to_wire(seq.request.sampling), seed=seed)


def resumed_spec_to_wire(seq: Sequence) -> pb.SequenceSpec:
    """A replayed sequence (`Verifier.resume`) as a prompt of all its committed tokens but the last;
    seed 0: the token the worker draws after it is dropped, and no generator of the sequence's gave it."""
    return pb.SequenceSpec(seq_id=seq.seq_id, prompt_token_ids=seq.token_ids[:-1],
                           sampling=sampling_to_wire(seq.request.sampling), seed=0)


def sequence_from_wire(spec: pb.SequenceSpec) -> Sequence:
    """A worker's copy of a coordinator sequence; it is reseeded by every command."""
    request = GenerationRequest(list(spec.prompt_token_ids), sampling_from_wire(spec.sampling),
                                max_tokens=UNLIMITED_TOKENS, ignore_eos=True)
    seq = Sequence(spec.seq_id, request, spec.seed)
    seq.output_token_ids.extend(spec.output_token_ids)
    return seq


def token_update(seq: Sequence, num_known_tokens: int) -> pb.TokenUpdate:
    return pb.TokenUpdate(seq_id=seq.seq_id, num_known_tokens=num_known_tokens,
                          new_token_ids=seq.token_ids[num_known_tokens:])


# --- tensors and distributions -----------------------------------------------------------------

def tensor_to_wire(tensor: Tensor) -> pb.FloatTensor:
    array = tensor.detach().float().cpu().contiguous().numpy()
    return pb.FloatTensor(shape=list(array.shape), data=array.astype("<f4").tobytes())


def tensor_from_wire(message: pb.FloatTensor) -> Tensor:
    array = np.frombuffer(message.data, dtype="<f4").reshape(tuple(message.shape))
    return torch.from_numpy(array.copy())


def distribution_to_wire(probs: Tensor) -> pb.SparseDistribution:  # [V] float32
    sparse = codec.encode(probs)
    token_ids = sparse.token_ids.numpy().astype("<i4").tobytes()
    if sparse.counts is not None:
        counts = (sparse.counts.numpy() - 1).astype("<u2").tobytes()
        return pb.SparseDistribution(token_ids=token_ids, counts=counts)
    return pb.SparseDistribution(token_ids=token_ids, probs=sparse.probs.numpy().astype("<f4").tobytes())


def distribution_from_wire(message: pb.SparseDistribution, vocab_size: int) -> Tensor:  # [V] float32
    token_ids = torch.from_numpy(np.frombuffer(message.token_ids, dtype="<i4").astype(np.int32))
    if message.probs:
        probs = torch.from_numpy(np.frombuffer(message.probs, dtype="<f4").copy())
        return codec.decode(codec.SparseProbs(token_ids, None, probs), vocab_size)
    counts = torch.from_numpy(np.frombuffer(message.counts, dtype="<u2").astype(np.int32) + 1)
    return codec.decode(codec.SparseProbs(token_ids, counts), vocab_size)


# --- proposals ---------------------------------------------------------------------------------

def proposal_to_wire(proposal: DraftProposal, seqs: Seq[Sequence]) -> list[pb.Draft]:
    """Draft worker -> coordinator: drafted ids, and distributions only for sampled rows."""
    drafts = []
    for row, seq in enumerate(seqs):
        tokens = proposal.drafts(row)
        probs = []
        if tokens and not seq.request.sampling.is_greedy:
            probs = [distribution_to_wire(proposal.draft_probs[row, j]) for j in range(len(tokens))]
        drafts.append(pb.Draft(draft_token_ids=tokens, draft_probs=probs))
    return drafts


def proposal_from_wire(drafts: Seq[pb.Draft]) -> EncodedDraftProposal:
    tokens = [list(draft.draft_token_ids) for draft in drafts]
    plain = DraftProposal.from_lists(tokens, None, vocab_size=0)
    return EncodedDraftProposal(plain.draft_token_ids, plain.num_draft_tokens, draft_probs=None,
                                wire_probs=tuple(tuple(draft.draft_probs) for draft in drafts))


def verify_items_to_wire(seqs: Seq[Sequence], proposal: DraftProposal, seeds: Seq[int]) -> list[pb.VerifyItem]:
    """Coordinator -> target. Dense draft_probs (a local drafter) are encoded exactly, on the grid or not."""
    items = []
    for row, (seq, seed) in enumerate(zip(seqs, seeds)):
        tokens = proposal.drafts(row)
        probs: Seq[pb.SparseDistribution] = []
        if tokens and not seq.request.sampling.is_greedy:
            if isinstance(proposal, EncodedDraftProposal):
                probs = proposal.wire_probs[row]
            else:
                probs = [distribution_to_wire(proposal.draft_probs[row, j]) for j in range(len(tokens))]
        items.append(pb.VerifyItem(seq_id=seq.seq_id, draft_token_ids=tokens, draft_probs=probs, seed=seed))
    return items


def proposal_from_verify_items(items: Seq[pb.VerifyItem], vocab_size: int | None) -> DraftProposal:
    """Target side: the dense proposal; probabilities rebuilt only when vocab_size is given (rank 0)."""
    tokens = [list(item.draft_token_ids) for item in items]
    has_probs = vocab_size is not None and any(item.draft_probs for item in items)
    probs = None
    if has_probs:
        probs = [[distribution_from_wire(d, vocab_size) for d in item.draft_probs] for item in items]
    return DraftProposal.from_lists(tokens, probs, vocab_size or 0)


# --- results -----------------------------------------------------------------------------------

def results_to_wire(output: VerifyOutput, seqs: Seq[Sequence]) -> list[pb.VerifyResult]:
    results = []
    for row, seq in enumerate(seqs):
        message = pb.VerifyResult(output_token_ids=output.result.tokens(row),
                                  num_accepted_tokens=int(output.result.num_accepted[row]))
        if output.target_features is not None:
            message.target_features.CopyFrom(tensor_to_wire(output.target_features[seq.seq_id]))
        results.append(message)
    return results


def results_from_wire(results: Seq[pb.VerifyResult], seq_ids: Seq[int], max_draft: int) -> VerifyOutput:
    output_token_ids = torch.full((len(results), max_draft + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.long)
    for row, result in enumerate(results):
        output_token_ids[row, : len(result.output_token_ids)] = torch.tensor(list(result.output_token_ids))
    num_accepted = torch.tensor([result.num_accepted_tokens for result in results], dtype=torch.long)
    features: TargetFeatures | None = None
    if any(result.HasField("target_features") for result in results):
        features = {seq_id: tensor_from_wire(result.target_features) for seq_id, result in zip(seq_ids, results)}
    return VerifyOutput(VerificationResult(output_token_ids, num_accepted), features)


def features_to_wire(features: TargetFeatures | None, seq_ids: Seq[int]) -> list[pb.FloatTensor]:
    if features is None:
        return []
    return [tensor_to_wire(features[seq_id]) for seq_id in seq_ids]


def features_from_wire(messages: Seq[pb.FloatTensor], seq_ids: Seq[int]) -> TargetFeatures | None:
    if not messages:
        return None
    return {seq_id: tensor_from_wire(message) for seq_id, message in zip(seq_ids, messages)}
