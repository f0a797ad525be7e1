"""Generation probes shared by RWKU, the bundled facts benchmark and the generation evaluation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Probe:
    """One question whose gold answer is compared with the model's greedy answer (ROUGE-L recall).

    Attributes:
        prompt: the raw probe text (RWKU ``query``: a fill-in-the-blank sentence or a question), without
            any instruction or chat template: the generation evaluation adds those, so one probe set
            can be scored under several prompt formats.
        answer: the gold answer.
        level: ``"1"`` fill-in-the-blank, ``"2"`` question answering, ``"3"`` adversarial (RWKU levels).
        target: the unlearning target (person / entity) the probe is about.
        kind: free-form sub-type, e.g. the RWKU level-3 attack type (``"prefix injection"``); may be empty.
    """

    prompt: str
    answer: str
    level: str
    target: str
    kind: str = ""
