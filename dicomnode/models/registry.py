"""The models the node runs: every ``models/<name>/model.yaml``, validated at start-up.

:meth:`ModelRegistry.load` reads each card, checks it and its weights' sha256,
and maps each body part to exactly one card. Anything wrong (a bad card, two
cards claiming one body part with no choice made) raises :class:`ModelError`
and the node refuses to start, rather than discovering it on the first image.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from dicomnode.errors import ModelError
from dicomnode.models.card import CARD_FILE, ModelCard, identity, load_card
from dicomnode.values import BodyPart, ModelIdentity

logger = logging.getLogger(__name__)

Choices = Mapping[BodyPart | str, str]


@dataclass(frozen=True)
class LoadedCard:
    """A validated card and the directory it came from."""

    directory: Path
    card: ModelCard

    @property
    def identity(self) -> ModelIdentity:
        """Name, version and weights checksum that outputs of this card carry."""
        return identity(self.card)

    def describe(self) -> str:
        """``name version (directory)`` for messages."""
        return f"{self.card.name} {self.card.version} ({self.directory})"


class ModelRegistry:
    """The loaded cards and which one serves each body part.

    Parameters
    ----------
    cards:
        The cards, any order (kept sorted by directory).
    choose:
        For a body part claimed by several cards, the one to use: its
        directory name or card name. Choices for uncontested parts are
        checked the same way.

    Raises
    ------
    ModelError
        If two cards share name and version, a body part is claimed by several
        cards with no choice (all conflicts are listed), or a choice names no
        card that claims that body part.
    """

    def __init__(self, cards: Iterable[LoadedCard] = (), choose: Choices | None = None) -> None:
        self._cards = tuple(sorted(cards, key=lambda loaded: str(loaded.directory)))
        _refuse_duplicates(self._cards)
        routes = _route(self._cards, _normalise(choose or {}))
        self._routes: Mapping[BodyPart, LoadedCard] = MappingProxyType(routes)

    @classmethod
    def load(
        cls, models_dir: Path, *, choose: Choices | None = None, verify: bool = True
    ) -> ModelRegistry:
        """Read and validate every ``models_dir/*/model.yaml``.

        Sub-directories without a card (and plain files such as a README) are
        skipped with a debug log.

        Parameters
        ----------
        models_dir:
            The folder of model directories.
        choose:
            See :class:`ModelRegistry`.
        verify:
            Check each weights file against its card's sha256.

        Raises
        ------
        ModelError
            If ``models_dir`` is not a directory, a card or its weights are
            invalid (the message names the directory and the reason), or the
            body parts cannot be routed.
        """
        if not models_dir.is_dir():
            raise ModelError(f"models directory {models_dir} does not exist")
        loaded = [
            LoadedCard(directory, _load(directory, verify))
            for directory in _card_directories(models_dir)
        ]
        registry = cls(loaded, choose)
        for part, entry in registry.routes.items():
            logger.info("body part %s -> %s", part, entry.describe())
        return registry

    @property
    def cards(self) -> tuple[LoadedCard, ...]:
        """Every loaded card, routed or not, sorted by directory."""
        return self._cards

    @property
    def routes(self) -> Mapping[BodyPart, LoadedCard]:
        """Body part -> the card that serves it (read-only)."""
        return self._routes

    def for_body_part(self, part: BodyPart | str) -> LoadedCard | None:
        """The card serving ``part``, or ``None`` when no card claims it."""
        try:
            return self._routes.get(BodyPart(str(part).upper()))
        except ValueError:
            return None


def _card_directories(models_dir: Path) -> list[Path]:
    found = []
    for entry in sorted(models_dir.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        if not (entry / CARD_FILE).is_file():
            logger.debug("no model card, directory ignored", extra={"directory": str(entry)})
            continue
        found.append(entry)
    return found


def _load(directory: Path, verify: bool) -> ModelCard:
    try:
        return load_card(directory, verify=verify)
    except ModelError as exc:
        raise ModelError(f"model directory {directory} refused: {exc}") from exc


def _normalise(choose: Choices) -> dict[BodyPart, str]:
    chosen: dict[BodyPart, str] = {}
    for part, choice in choose.items():
        try:
            chosen[BodyPart(str(part).upper())] = choice
        except ValueError:
            known = ", ".join(BodyPart)
            raise ModelError(
                f"model choice for unknown body part {part!r}; known: {known}"
            ) from None
    return chosen


def _refuse_duplicates(cards: tuple[LoadedCard, ...]) -> None:
    seen: dict[tuple[str, str], LoadedCard] = {}
    for loaded in cards:
        key = (loaded.card.name, loaded.card.version)
        if key in seen:
            raise ModelError(
                f"two model cards are named {key[0]} version {key[1]}: "
                f"{seen[key].directory} and {loaded.directory}; outputs could not tell them apart"
            )
        seen[key] = loaded


def _route(
    cards: tuple[LoadedCard, ...], chosen: dict[BodyPart, str]
) -> dict[BodyPart, LoadedCard]:
    claims: dict[BodyPart, list[LoadedCard]] = {}
    for loaded in cards:
        for part in loaded.card.body_parts:
            claims.setdefault(part, []).append(loaded)
    for part, choice in chosen.items():
        if part not in claims:
            raise ModelError(
                f"model {choice!r} is chosen for {part} but no model card claims {part}"
            )
    routes: dict[BodyPart, LoadedCard] = {}
    conflicts: list[str] = []
    for part, claimants in claims.items():
        if part in chosen:
            routes[part] = _pick(part, claimants, chosen[part])
        elif len(claimants) == 1:
            routes[part] = claimants[0]
        else:
            conflicts.append(f"{part}: " + ", ".join(c.describe() for c in claimants))
    if conflicts:
        raise ModelError(
            "more than one model card claims a body part; choose one for each: "
            + "; ".join(conflicts)
        )
    return routes


def _pick(part: BodyPart, claimants: list[LoadedCard], choice: str) -> LoadedCard:
    matches = [c for c in claimants if c.directory.name == choice] or [
        c for c in claimants if c.card.name == choice
    ]
    if len(matches) == 1:
        return matches[0]
    listed = ", ".join(c.describe() for c in claimants)
    if not matches:
        raise ModelError(
            f"model {choice!r} is chosen for {part} but is not among its cards: {listed}"
        )
    raise ModelError(
        f"model {choice!r} chosen for {part} is ambiguous; name its directory: {listed}"
    )
