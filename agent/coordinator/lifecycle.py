"""The model lifecycle: one explicit enum and the transitions it allows."""

from __future__ import annotations

from enum import Enum


class ModelState(str, Enum):
    ANNOUNCED = "announced"
    DOWNLOADING = "downloading"
    VERIFIED = "verified"
    BUILDING = "building"
    VALIDATING = "validating"
    STAGED = "staged"
    ACTIVE = "active"
    RETIRED = "retired"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"

    @property
    def terminal(self) -> bool:
        return self in (ModelState.REJECTED, ModelState.ROLLED_BACK)


# A restart resumes an unfinished candidate from whatever stage it reached, so the working
# stages may go back to any working stage (the files on disk make the repeat cheap).
_WORKING = {ModelState.DOWNLOADING, ModelState.VERIFIED, ModelState.BUILDING, ModelState.VALIDATING}

ALLOWED: dict[ModelState, set[ModelState]] = {
    ModelState.ANNOUNCED: _WORKING | {ModelState.REJECTED},
    ModelState.DOWNLOADING: _WORKING | {ModelState.REJECTED},
    ModelState.VERIFIED: _WORKING | {ModelState.REJECTED},
    ModelState.BUILDING: _WORKING | {ModelState.REJECTED},
    ModelState.VALIDATING: _WORKING | {ModelState.STAGED, ModelState.REJECTED},
    ModelState.STAGED: _WORKING | {ModelState.STAGED, ModelState.ACTIVE, ModelState.REJECTED, ModelState.RETIRED},
    ModelState.ACTIVE: {ModelState.RETIRED, ModelState.ROLLED_BACK},
    ModelState.RETIRED: {ModelState.ACTIVE, ModelState.STAGED},
    ModelState.REJECTED: set(),
    ModelState.ROLLED_BACK: {ModelState.ACTIVE, ModelState.STAGED},
}


class IllegalTransition(RuntimeError):
    pass


def check_transition(old: ModelState, new: ModelState) -> None:
    if new not in ALLOWED[old]:
        raise IllegalTransition(f"{old.value} -> {new.value} is not a lifecycle transition")
