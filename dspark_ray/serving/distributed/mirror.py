"""A worker's copies of the coordinator's sequences: committed tokens and sampling settings.

The coordinator is the authority; a copy changes only through explicit commands (`add`, `apply`
a TokenUpdate, `remove`), and a mismatch between what the coordinator believes the worker knows
and what it holds is an error, never guessed around. Generators are reseeded per command from the
seeds the coordinator sends, so a worker owns no randomness of its own.
"""

from __future__ import annotations

from collections.abc import Iterable

from dspark_ray.engine.sequence import Sequence
from dspark_ray.serving.distributed.convert import sequence_from_wire
from dspark_ray.serving.wire import worker_pb2 as pb


class SequenceStateError(ValueError):
    """A command names an unknown sequence or disagrees with the worker's copy."""


class SequenceMirror:
    def __init__(self) -> None:
        self.seqs: dict[int, Sequence] = {}

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, specs: Iterable[pb.SequenceSpec]) -> list[Sequence]:
        added = []
        for spec in specs:
            if spec.seq_id in self.seqs:
                raise SequenceStateError(f"sequence {spec.seq_id} is already tracked")
            self.seqs[spec.seq_id] = sequence_from_wire(spec)
            added.append(self.seqs[spec.seq_id])
        return added

    def apply(self, updates: Iterable[pb.TokenUpdate]) -> list[Sequence]:
        """Keep each copy's first num_known_tokens tokens and append the new ones."""
        updated = []
        for update in updates:
            seq = self.get([update.seq_id])[0]
            num_prompt = len(seq.request.prompt_token_ids)
            if not num_prompt <= update.num_known_tokens <= seq.num_tokens:
                raise SequenceStateError(f"sequence {update.seq_id}: coordinator assumes {update.num_known_tokens} "
                                         f"known tokens, the worker holds {seq.num_tokens}")
            del seq.output_token_ids[update.num_known_tokens - num_prompt:]
            seq.output_token_ids.extend(update.new_token_ids)
            updated.append(seq)
        return updated

    def get(self, seq_ids: Iterable[int]) -> list[Sequence]:
        try:
            return [self.seqs[seq_id] for seq_id in seq_ids]
        except KeyError as error:
            raise SequenceStateError(f"unknown sequence {error.args[0]}") from None

    def reseed(self, seqs: list[Sequence], seeds: Iterable[int]) -> None:
        for seq, seed in zip(seqs, seeds):
            if not seq.request.sampling.is_greedy:
                seq.reseed(seed)

    def remove(self, seq_ids: Iterable[int]) -> list[int]:
        """Forget the named sequences; returns those that were tracked."""
        return [seq_id for seq_id in seq_ids if self.seqs.pop(seq_id, None) is not None]
