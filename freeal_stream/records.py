"""The records that cross module and actor boundaries: items, demos, planned requests, annotations, review rows.

Frozen dataclasses rather than tuples, so every reader names the field it reads. They are plain data
(strings, ints, tuples), so they pickle cheaply to and from actors.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ItemColumns:
    """Items as aligned columns: what the store holds per item, for a shard or a chosen set of rows."""

    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    views: list[str | None] = field(default_factory=list)  # a second view of the text (e.g. back-translation)
    golds: list[str | None] = field(default_factory=list)  # evaluation only, never trained on

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Demo:
    """A demonstration shown to the LLM: a pool item (its id) or a generated example ('gen-N')."""

    id: str
    text: str
    label: int  # class index
    source: str  # 'generated', 'zero-shot' or 'slm round k'


@dataclass(frozen=True)
class PlanItem:
    """One planned request of a round: the item and the demos its prompt shows, in prompt order."""

    item_id: str
    demo_ids: tuple[str, ...]


@dataclass(frozen=True)
class Annotation:
    """One LLM annotation as stored: the answer's request key, the label (None = no usable label), the
    confidence from logprobs (None without them) and the demos the prompt showed."""

    item_id: str
    request_key: str
    label: int | None
    confidence: float | None
    demo_ids: tuple[str, ...]


@dataclass(frozen=True)
class ReviewRow:
    """A row offered for human review: its label of record as the export has it, and why it was picked
    ('random', 'disputed', 'rare class', 'least confident')."""

    item_id: str
    text: str
    label: int | None
    source: str | None
    confidence: float | None
    llm_label: int | None
    slm_label: int | None
    disputed: bool
    reason: str


@dataclass(frozen=True)
class HumanLabel:
    """A label a reviewer gave an item (read back from a review tool's export)."""

    item_id: str
    label: int
    reviewer: str | None = None
