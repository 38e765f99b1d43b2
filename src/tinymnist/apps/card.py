"""The report card of one check (`tinymnist check --markdown CARD.md`): its proof, its recipe and the network's
summary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..lab.check import proof
from ..target import MAX_EPOCHS, budget_phrase
from ..pages.common import recipe_words
from ..pages.render import proof_lines


def render_card(ev: dict, card: Path, plot: Optional[Path], summary) -> str:
    """A student's report card, to paste into a README: the model's summary, the rule and the verdict, each seed's
    last accuracies and the proof plot (linked relative to the card), from the check's evidence alone."""
    from ..core.config import TrainConfig

    pr = proof(ev)
    cfg = TrainConfig.from_dict(ev["config"])
    source = ev.get("models_file", {}).get("path")
    name = f"`{ev['model']}`" + (f" from `{Path(source).name}`" if source else "")
    link = os.path.relpath(plot, card.parent).replace(os.sep, "/") if plot else None
    what = "test" if pr.metric == "test_acc" else "validation"
    return "\n".join([
        f"### Report card: {name}", "",
        "| parameters | receptive field | MACs per image | epochs | seeds | verdict |",
        "| ---: | ---: | ---: | ---: | ---: | --- |",
        f"| {ev['params']:,} | {summary.rf_cell} | {summary.macs:,} | {ev['epochs']} | {len(ev['seeds'])} | "
        f"**{pr.verdict}** |", "",
        f"The rule: at least {ev['threshold']:.2f}% {what} accuracy in every one of the last {pr.last} epochs, "
        f"within {MAX_EPOCHS} epochs, with {budget_phrase(ev['budget'])} parameters, for every seed. Each seed trained "
        f"with the recipe of tinymnist's step `{ev['step']}`: {recipe_words(cfg)}.", "",
        *proof_lines(ev, link, f"{ev['model']}: {what} accuracy per epoch, every seed"), ""])
