from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "min_p")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., min_p: _Optional[float] = ...) -> None: ...

class SequenceSpec(_message.Message):
    __slots__ = ("seq_id", "prompt_token_ids", "output_token_ids", "sampling", "seed")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    seed: int
    def __init__(self, seq_id: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...

class TokenUpdate(_message.Message):
    __slots__ = ("seq_id", "num_known_tokens", "new_token_ids")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_KNOWN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    num_known_tokens: int
    new_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq_id: _Optional[int] = ..., num_known_tokens: _Optional[int] = ..., new_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class FloatTensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class VerifyFeedback(_message.Message):
    __slots__ = ("seq_id", "num_draft_tokens", "num_accepted_tokens", "target_features")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FEATURES_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    num_draft_tokens: int
    num_accepted_tokens: int
    target_features: FloatTensor
    def __init__(self, seq_id: _Optional[int] = ..., num_draft_tokens: _Optional[int] = ..., num_accepted_tokens: _Optional[int] = ..., target_features: _Optional[_Union[FloatTensor, _Mapping]] = ...) -> None: ...

class SparseDistribution(_message.Message):
    __slots__ = ("token_ids", "counts", "probs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: bytes
    counts: bytes
    probs: bytes
    def __init__(self, token_ids: _Optional[bytes] = ..., counts: _Optional[bytes] = ..., probs: _Optional[bytes] = ...) -> None: ...

class DraftAddRequest(_message.Message):
    __slots__ = ("seqs", "target_features")
    SEQS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FEATURES_FIELD_NUMBER: _ClassVar[int]
    seqs: _containers.RepeatedCompositeFieldContainer[SequenceSpec]
    target_features: _containers.RepeatedCompositeFieldContainer[FloatTensor]
    def __init__(self, seqs: _Optional[_Iterable[_Union[SequenceSpec, _Mapping]]] = ..., target_features: _Optional[_Iterable[_Union[FloatTensor, _Mapping]]] = ...) -> None: ...

class DraftAddResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DraftItem(_message.Message):
    __slots__ = ("seq_id", "max_draft_tokens", "seed")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    max_draft_tokens: int
    seed: int
    def __init__(self, seq_id: _Optional[int] = ..., max_draft_tokens: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class ProposeRequest(_message.Message):
    __slots__ = ("updates", "feedback", "items", "time_budget_s")
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TIME_BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[TokenUpdate]
    feedback: _containers.RepeatedCompositeFieldContainer[VerifyFeedback]
    items: _containers.RepeatedCompositeFieldContainer[DraftItem]
    time_budget_s: float
    def __init__(self, updates: _Optional[_Iterable[_Union[TokenUpdate, _Mapping]]] = ..., feedback: _Optional[_Iterable[_Union[VerifyFeedback, _Mapping]]] = ..., items: _Optional[_Iterable[_Union[DraftItem, _Mapping]]] = ..., time_budget_s: _Optional[float] = ...) -> None: ...

class Draft(_message.Message):
    __slots__ = ("draft_token_ids", "draft_probs")
    DRAFT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PROBS_FIELD_NUMBER: _ClassVar[int]
    draft_token_ids: _containers.RepeatedScalarFieldContainer[int]
    draft_probs: _containers.RepeatedCompositeFieldContainer[SparseDistribution]
    def __init__(self, draft_token_ids: _Optional[_Iterable[int]] = ..., draft_probs: _Optional[_Iterable[_Union[SparseDistribution, _Mapping]]] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("drafts",)
    DRAFTS_FIELD_NUMBER: _ClassVar[int]
    drafts: _containers.RepeatedCompositeFieldContainer[Draft]
    def __init__(self, drafts: _Optional[_Iterable[_Union[Draft, _Mapping]]] = ...) -> None: ...

class DraftSyncRequest(_message.Message):
    __slots__ = ("updates", "feedback")
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[TokenUpdate]
    feedback: _containers.RepeatedCompositeFieldContainer[VerifyFeedback]
    def __init__(self, updates: _Optional[_Iterable[_Union[TokenUpdate, _Mapping]]] = ..., feedback: _Optional[_Iterable[_Union[VerifyFeedback, _Mapping]]] = ...) -> None: ...

class TargetAddRequest(_message.Message):
    __slots__ = ("seqs",)
    SEQS_FIELD_NUMBER: _ClassVar[int]
    seqs: _containers.RepeatedCompositeFieldContainer[SequenceSpec]
    def __init__(self, seqs: _Optional[_Iterable[_Union[SequenceSpec, _Mapping]]] = ...) -> None: ...

class VerifyItem(_message.Message):
    __slots__ = ("seq_id", "draft_token_ids", "draft_probs", "seed")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PROBS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    draft_token_ids: _containers.RepeatedScalarFieldContainer[int]
    draft_probs: _containers.RepeatedCompositeFieldContainer[SparseDistribution]
    seed: int
    def __init__(self, seq_id: _Optional[int] = ..., draft_token_ids: _Optional[_Iterable[int]] = ..., draft_probs: _Optional[_Iterable[_Union[SparseDistribution, _Mapping]]] = ..., seed: _Optional[int] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("updates", "items")
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[TokenUpdate]
    items: _containers.RepeatedCompositeFieldContainer[VerifyItem]
    def __init__(self, updates: _Optional[_Iterable[_Union[TokenUpdate, _Mapping]]] = ..., items: _Optional[_Iterable[_Union[VerifyItem, _Mapping]]] = ...) -> None: ...

class VerifyResult(_message.Message):
    __slots__ = ("output_token_ids", "num_accepted_tokens", "target_features")
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FEATURES_FIELD_NUMBER: _ClassVar[int]
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_accepted_tokens: int
    target_features: FloatTensor
    def __init__(self, output_token_ids: _Optional[_Iterable[int]] = ..., num_accepted_tokens: _Optional[int] = ..., target_features: _Optional[_Union[FloatTensor, _Mapping]] = ...) -> None: ...

class TargetAddResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[VerifyResult]
    def __init__(self, results: _Optional[_Iterable[_Union[VerifyResult, _Mapping]]] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[VerifyResult]
    def __init__(self, results: _Optional[_Iterable[_Union[VerifyResult, _Mapping]]] = ...) -> None: ...

class TargetSyncRequest(_message.Message):
    __slots__ = ("updates",)
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[TokenUpdate]
    def __init__(self, updates: _Optional[_Iterable[_Union[TokenUpdate, _Mapping]]] = ...) -> None: ...

class SyncResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RemoveRequest(_message.Message):
    __slots__ = ("seq_ids",)
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    seq_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RemoveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ("reset_times",)
    RESET_TIMES_FIELD_NUMBER: _ClassVar[int]
    reset_times: bool
    def __init__(self, reset_times: _Optional[bool] = ...) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("role", "num_sequences", "num_commands", "busy_s", "idle_s", "world_size")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NUM_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    NUM_COMMANDS_FIELD_NUMBER: _ClassVar[int]
    BUSY_S_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    role: str
    num_sequences: int
    num_commands: int
    busy_s: float
    idle_s: float
    world_size: int
    def __init__(self, role: _Optional[str] = ..., num_sequences: _Optional[int] = ..., num_commands: _Optional[int] = ..., busy_s: _Optional[float] = ..., idle_s: _Optional[float] = ..., world_size: _Optional[int] = ...) -> None: ...
