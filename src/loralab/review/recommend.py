"""Which epoch to take, and whether the run overfits: the rule of `loralab review`, in one place.

Recommended epoch (`recommend`), never looking at any ground truth:
1. with a validation loss on at least 2 epochs: the epoch with the lowest validation loss (ties: the
   earlier) — held-out images the LoRA never trained on, fixed noise and timesteps (kohya's validation);
2. else: the last local minimum of the per-epoch training loss (the guide: "take an epoch at a local
   minimum of the loss graph"; the training loss of a LoRA falls in steps with noise on top, and its last
   minimum is where training had got to before the noise);
3. damage veto: an epoch whose images at weight 1.0 burn (`measure.burned` over its prompts' images,
   and at every higher weight of the sweep when the epoch was swept) or copy the dataset (at least half of the prompts' images with likeness >= 0.95 to a training
   image, more than the base model) is passed over for the latest earlier epoch without damage.

Overfitting alarm (`overfit_alarm`), with its evidence:
- validation: the last validation loss is at least 10 % above its minimum, at an earlier epoch, while
  the training loss went on falling (the LoRA learns its training images, not the concept), or
- memorisation: the last epoch copies training images (as in 3.) and more of them than the base model, or
- burn: the last epoch's images burn at weight 1.0.
"""

from __future__ import annotations

VAL_RISE = 0.10  # validation loss this far above its minimum at the end: overfitting
HALF = 0.5


def _damage(s, n_prompts: int, base_copies: int) -> list[str]:
    out = []
    higher = [w for w in s.sweep if w > 1.0]
    if s.burned and all(s.sweep[w]["burned"] for w in higher):
        out.append(f"its images burn at weight 1.0 (saturation ×{s.saturation:.2f} of the base model's)"
                   f"{' and at every higher weight of the sweep' if higher else ''}")
    if n_prompts and s.copies >= HALF * n_prompts and s.copies > base_copies:
        out.append(f"{s.copies} of {n_prompts} images are near-copies of training images (likeness >= 0.95)")
    return out


def loss_pick(signals: dict) -> tuple[int, list[str]]:
    """Steps 1-2 of the rule: the epoch the losses point to, and why."""
    from loralab.review.runlog import local_minima

    epochs = sorted(e for e in signals if e > 0)
    val = {e: signals[e].val_loss for e in epochs if signals[e].val_loss is not None}
    train = {e: signals[e].train_loss for e in epochs if signals[e].train_loss is not None}
    if len(val) >= 2:
        pick = min(val, key=lambda e: (val[e], e))
        reasons = [f"the validation loss (held-out images) is lowest at epoch {pick} ({val[pick]:.4f}; "
                   f"first {val[min(val)]:.4f}, last {val[max(val)]:.4f})"]
        if pick == max(val):
            reasons.append("it was still falling at the last epoch: more epochs may help")
        return pick, reasons
    if len(train) >= 2:
        minima = local_minima(train) or [min(train, key=lambda e: (train[e], e))]
        pick = minima[-1]
        return pick, [f"epoch {pick} is the last local minimum of the training loss ({train[pick]:.4f}; local "
                      f"minima at epoch{'s' if len(minima) > 1 else ''} {', '.join(map(str, minima))}); no "
                      "validation loss in this run"]
    return epochs[-1], ["the log has too few epoch losses to compare: the last epoch"]


def recommend(signals: dict) -> tuple[int, list[str]]:
    """(epoch, reasons in plain words) — see the module docstring."""
    epochs = sorted(e for e in signals if e > 0)
    base = signals.get(0)
    n = len(base.nearest) if base is not None else 0
    base_copies = base.copies if base is not None else 0
    pick, reasons = loss_pick(signals)
    damaged = {e: _damage(signals[e], n, base_copies) for e in epochs}
    if damaged[pick]:
        clean = [e for e in epochs if e < pick and not damaged[e]]
        why = "; ".join(damaged[pick])
        if clean:
            reasons.append(f"epoch {pick} is passed over: {why}; epoch {clean[-1]} is the latest earlier epoch "
                           "without that damage")
            pick = clean[-1]
        else:
            reasons.append(f"epoch {pick} shows damage ({why}) but no earlier epoch is free of it")
    s = signals[pick]
    if s.copies <= base_copies and n:
        reasons.append(f"its images copy no more training images than the base model's ({s.copies} of {n})")
    return pick, reasons


def overfit_alarm(signals: dict, recommended: int) -> tuple[bool, list[str]]:
    """(alarm, evidence) — see the module docstring."""
    epochs = sorted(e for e in signals if e > 0)
    last = epochs[-1]
    base = signals.get(0)
    n = len(base.nearest) if base is not None else 0
    evidence: list[str] = []
    val = {e: signals[e].val_loss for e in epochs if signals[e].val_loss is not None}
    train = {e: signals[e].train_loss for e in epochs if signals[e].train_loss is not None}
    if len(val) >= 2:
        lo = min(val, key=lambda e: (val[e], e))
        end = max(val)
        if lo < end and val[end] >= (1 + VAL_RISE) * val[lo]:
            falling = lo in train and end in train and train[end] < train[lo]
            if falling:
                evidence.append(f"validation loss rose from {val[lo]:.4f} (epoch {lo}) to {val[end]:.4f} (epoch {end}, "
                                f"+{val[end] / val[lo] - 1:.0%}) while the training loss fell from {train[lo]:.4f} to "
                                f"{train[end]:.4f}: the LoRA learns its training images rather than the concept")
    damage = _damage(signals[last], n, base.copies if base is not None else 0)
    evidence += [f"last epoch ({last}): {d}" for d in damage]
    return bool(evidence), evidence


def sweep_epochs(signals: dict) -> list[int]:
    """The epochs the weight sweep draws: the one the losses point to and the last one (when different)."""
    last = max(e for e in signals if e > 0)
    return sorted({loss_pick(signals)[0], last})
