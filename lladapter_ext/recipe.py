"""Fine-tuning recipes: the values that `lladapter finetune` uses for the knobs a user does not set (issue 16).

Two recipes, chosen by name (`--recipe`):

- ``default``: measured on task families unlike the demo's at 200, 2,000 and 20,000 examples (docs/recipe.md,
  ``scripts/recipe_grid.py``). A peak learning rate given directly (not scaled down with the batch), warmup a share
  of the schedule with a cap, the adapter in the top quarter of the layers, and a schedule length in epochs that
  gives small data sets enough optimizer steps and large ones a single pass.
- ``official``: the LLaMA-Adapter v1 paper's recipe (blr 9e-3 scaled by effective batch / 256, batch 4 per
  process, 2 warmup epochs of 5, adapters in the top 30 layers, 10 prompt tokens), for reproducing it. Made for
  52K examples at effective batches of 64 and more; on small data at batch 4 its learning rate is ~1e-4 and the
  schedule is mostly warmup (the run learns next to nothing: docs/recipe.md).

``train_values`` (the schedule, for a data set's size) and ``adapter_layers`` (for the model's depth) turn a recipe
into concrete values, each with where it came from, so a run can print them before it starts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .schedule import total_steps


@dataclass(frozen=True)
class Recipe:
    name: str
    micro_batch_size: int
    lr: float | None                    # peak learning rate; None: blr * effective batch / 256
    blr: float
    epochs: float | None                # None: examples_seen / n_examples, within [min_epochs, max_epochs]
    warmup_epochs: float | None         # warmup in epochs (official), or
    warmup_share: float | None          # a share of the schedule's steps, at most warmup_cap steps
    warmup_cap: int | None
    adapter_layer: int | None           # adapted top layers, or
    adapter_layer_share: float | None   # a share of the depth (rounded up)
    adapter_len: int
    examples_seen: int = 1000
    min_epochs: float = 1.0
    max_epochs: float = 5.0


RECIPES = {
    "default": Recipe(name="default", micro_batch_size=8, lr=5e-2, blr=9e-3, epochs=None, warmup_epochs=None,
                      warmup_share=0.1, warmup_cap=100, adapter_layer=None, adapter_layer_share=0.25,
                      adapter_len=10),
    "official": Recipe(name="official", micro_batch_size=4, lr=None, blr=9e-3, epochs=5.0, warmup_epochs=2.0,
                       warmup_share=None, warmup_cap=None, adapter_layer=30, adapter_layer_share=None,
                       adapter_len=10),
}


def get(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}") from None


def adapter_layers(recipe: Recipe, n_layers: int) -> tuple[int, str]:
    """(adapted top layers, why) for a model ``n_layers`` deep."""
    if recipe.adapter_layer is not None:
        return min(recipe.adapter_layer, n_layers), f"recipe {recipe.name}: {recipe.adapter_layer}, clipped to depth"
    share = recipe.adapter_layer_share
    return max(1, math.ceil(share * n_layers)), f"recipe {recipe.name}: top {share:g} of {n_layers} layers"


def epochs(recipe: Recipe, n_examples: int) -> tuple[float, str]:
    """(schedule length in epochs, why) for a data set of ``n_examples`` rows."""
    if recipe.epochs is not None:
        return recipe.epochs, f"recipe {recipe.name}"
    value = min(recipe.max_epochs, max(recipe.min_epochs, recipe.examples_seen / max(1, n_examples)))
    return round(value, 3), (f"recipe {recipe.name}: {recipe.examples_seen} examples seen / {n_examples} rows, "
                             f"within [{recipe.min_epochs:g}, {recipe.max_epochs:g}]")


def warmup_steps(recipe: Recipe, schedule_steps: int, steps_per_epoch: int) -> tuple[int, str]:
    """(warmup optimizer steps, why) for a schedule of ``schedule_steps``."""
    if recipe.warmup_epochs is not None:
        return (min(schedule_steps, round(recipe.warmup_epochs * steps_per_epoch)),
                f"recipe {recipe.name}: {recipe.warmup_epochs:g} epochs")
    value = max(1, min(recipe.warmup_cap, math.ceil(recipe.warmup_share * schedule_steps)))
    return value, f"recipe {recipe.name}: {recipe.warmup_share:g} of the schedule, at most {recipe.warmup_cap}"


# the TrainConfig fields a recipe gives when the run does not, and the option that sets each
TRAIN_FIELDS = {"micro_batch_size": "--batch-size", "lr": "--lr", "blr": "--blr", "epochs": "--epochs",
                "warmup_epochs": "--warmup-epochs", "warmup_steps": "--warmup-steps"}


def train_values(recipe: Recipe, given: dict, *, n_rows: int | None, grad_accum_steps: int = 1,
                 world_size: int = 1, max_steps: int | None = None) -> tuple[dict, dict]:
    """(TrainConfig values, where each came from) of the fields in TRAIN_FIELDS: a value in ``given`` that is not
    None is kept (its option named as the source); the others come from ``recipe`` for a data set of ``n_rows``
    rows. With n_rows None (before the data is read) the data-dependent ones get placeholders that validate."""
    values, sources = {}, {}

    def take(name, value, why):
        values[name], sources[name] = value, why

    for name in ("micro_batch_size", "blr"):
        if given.get(name) is not None:
            take(name, given[name], TRAIN_FIELDS[name])
        else:
            take(name, getattr(recipe, name), f"recipe {recipe.name}")
    fit = None if n_rows is None else max(1, n_rows // (grad_accum_steps * world_size))
    if given.get("micro_batch_size") is None and fit is not None and fit < values["micro_batch_size"]:
        take("micro_batch_size", fit, f"recipe {recipe.name}, cut to fit {n_rows} rows")
    if given.get("lr") is not None:
        take("lr", given["lr"], "--lr")
    elif given.get("blr") is not None or recipe.lr is None:
        take("lr", None, f"blr x effective batch / 256 ({'--blr' if given.get('blr') is not None else 'recipe'})")
    else:
        take("lr", recipe.lr, f"recipe {recipe.name}")
    if given.get("epochs") is not None:
        take("epochs", given["epochs"], "--epochs")
    elif max_steps is not None:
        take("epochs", recipe.epochs or 1.0, "unused: --max-steps sets the length")
    elif n_rows is None:
        take("epochs", recipe.epochs or recipe.max_epochs, "placeholder until the data is read")
    else:
        take("epochs", *epochs(recipe, n_rows))
    if given.get("warmup_steps") is not None:
        take("warmup_steps", given["warmup_steps"], "--warmup-steps")
    elif given.get("warmup_epochs") is not None:
        take("warmup_steps", None, "--warmup-epochs")
        take("warmup_epochs", given["warmup_epochs"], "--warmup-epochs")
    elif recipe.warmup_epochs is not None:
        take("warmup_steps", None, f"recipe {recipe.name}: warmup epochs")
        take("warmup_epochs", recipe.warmup_epochs, f"recipe {recipe.name}")
    elif n_rows is None:
        take("warmup_steps", 0, "placeholder until the data is read")
    else:
        effective = values["micro_batch_size"] * grad_accum_steps * world_size
        steps = total_steps(n_rows, effective, values["epochs"], max_steps)
        take("warmup_steps", *warmup_steps(recipe, steps, n_rows // effective))
    return values, sources
