"""Once-per-step decisions on the gathered generation batch, shared by every rank (DESIGN: reward → selection →
statistics).

Each function takes the rank's slice of the generation batch (``out``: TRL's dict of ``[rows, ...]`` tensors) and an
``accelerate``-style object with ``gather``, ``pad_across_processes``, ``process_index`` and ``num_processes``.
Rows of all ranks are gathered in rank order, which is the global row order (TRL's per-rank slices are contiguous),
so every rank computes the same decision from the same tensor and keeps its own slice: no other communication.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import torch

from objectives import Objective, TokenBatch


def loss_mask(out: dict[str, Any]) -> torch.Tensor:
    """Tokens that count: TRL's ``completion_mask × tool_mask``."""
    mask = out["completion_mask"]
    return mask * out["tool_mask"] if "tool_mask" in out else mask


def step_totals(acc, out: dict[str, Any]) -> tuple[int, float]:
    """Rows and valid tokens of the whole generation batch (all ranks); rows with ``sample_keep`` False (dropped
    or unscorable) are not counted."""
    m = loss_mask(out)
    rows = float(out["sample_keep"].sum()) if "sample_keep" in out else float(m.shape[0])
    t = acc.gather(torch.tensor([[rows, float(m.sum())]], device=m.device, dtype=torch.float64)).sum(0)
    return int(t[0]), float(t[1])


def step_counts(acc, out: dict[str, Any]) -> None:
    """``n_seqs_global`` / ``n_tokens_global``: rows and valid tokens of the step, as 0-dim tensors that survive
    TRL's shuffle and split."""
    rows, tokens = step_totals(acc, out)
    device = out["completion_mask"].device
    out["n_seqs_global"] = torch.tensor(float(rows), device=device)
    out["n_tokens_global"] = torch.tensor(tokens, device=device)


@torch.no_grad()
def select_samples(acc, out: dict[str, Any], objective: Objective, progress: float, steps_per_generation: int
                   ) -> dict[str, float]:
    """Rollout down-sampling (``Entry.sample_select``) on the gathered advantages, before the statistics pass; the
    dropped rows leave this rank's batch, so they cost no further forward or backward work."""
    adv = out["advantages"]
    if adv.dim() == 2:  # per-token advantages rank rows by their masked mean
        m = loss_mask(out).to(adv.dtype)
        adv = (adv * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    rows = adv.shape[0]
    n = rows * acc.num_processes
    step = TokenBatch(
        logp=adv.new_zeros(n, 1),
        mask=adv.new_ones(n, 1),
        advantages=acc.gather(adv),
        group_ids=acc.gather(out["group_ids"]),
        progress=progress,
    )
    keep, metrics = objective.entry.sample_select(step, objective.config)
    compact(out, keep[acc.process_index * rows : (acc.process_index + 1) * rows], steps_per_generation)
    return metrics


def compact(out: dict[str, Any], keep: torch.Tensor, steps_per_generation: int) -> None:
    """Keep the selected rows (in order), padded with dropped rows whose mask is zeroed (``sample_keep`` False) up
    to a multiple of ``steps_per_generation``, so that every rank still runs the same number of micro-steps."""
    spg = steps_per_generation
    kept, dropped = keep.nonzero().flatten(), (~keep).nonzero().flatten()
    n = max(spg, -(-kept.numel() // spg) * spg)
    order = torch.cat([kept, dropped[: n - kept.numel()]])
    rows = keep.shape[0]
    for k, v in list(out.items()):
        if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == rows:
            out[k] = v[order]
        elif isinstance(v, list) and len(v) == rows:
            out[k] = [v[i] for i in order.tolist()]
    sample_keep = torch.arange(n, device=keep.device) < kept.numel()
    out["sample_keep"] = sample_keep
    out["completion_mask"] = out["completion_mask"] * sample_keep.to(out["completion_mask"].dtype)[:, None]


@torch.no_grad()
def select_step(acc, out: dict[str, Any], entropy: torch.Tensor, objective: Objective, progress: float,
                before: tuple[int, float] | None = None) -> dict[str, float]:
    """The objective's selection (``Entry.select``) on the gathered step, from this rank's old-policy ``entropy``;
    adds the row decisions (``keep``, ``sample_keep``, ``band_lo`` ...) and global counts to ``out``. ``before``
    (rows, valid tokens before rollouts were dropped) only feeds the metrics."""
    mask = loss_mask(out)
    rows, T = mask.shape
    gather_rows = RowGather(acc, rows, mask.device)
    sample_keep = out.get("sample_keep")
    step = TokenBatch(
        logp=gather_rows(torch.zeros_like(entropy), 0.0),
        mask=gather_rows(mask, 0),
        advantages=gather_rows(out["advantages"], 0.0),
        old_entropy=gather_rows(entropy, 0.0),
        group_ids=gather_rows(out["group_ids"], -1),
        rollout_ids=gather_rows(out["rollout_ids"], -1),
        sample_keep=None if sample_keep is None else gather_rows(sample_keep, False),
        progress=progress,
    )
    kwargs = {} if before is None else {"n_rows_all": before[0], "n_valid_all": before[1]}
    sel = objective.entry.select(step, objective.config, **kwargs)
    start = gather_rows.start
    for k, v in sel.rows.items():
        local = v[start : start + rows]
        out[k] = local[:, :T] & mask.bool() if k == "keep" else local
    for k, v in sel.counts.items():
        out[k] = torch.tensor(float(v), device=mask.device)
    return sel.metrics


class RowGather:
    """Gathers ``[rows, ...]`` tensors of every rank in rank order (= global row order), padding a second dimension
    to the longest rank's; ranks may hold different row counts. ``start`` is this rank's first global row."""

    def __init__(self, acc, rows: int, device: torch.device) -> None:
        self.acc = acc
        counts = acc.gather(torch.tensor([rows], device=device))
        self.real = torch.cat([torch.arange(int(counts.max()), device=device) < int(c) for c in counts])
        self.start = int(counts[: acc.process_index].sum())
        self.rows = rows

    def __call__(self, x: torch.Tensor, pad) -> torch.Tensor:
        if x.dim() == 2:
            x = self.acc.pad_across_processes(x, dim=1, pad_index=pad)
        return self.acc.gather(self.acc.pad_across_processes(x, dim=0, pad_index=pad))[self.real]

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a gathered tensor."""
        return x[self.start : self.start + self.rows]


def _map_rows(stats: Any, fn) -> Any:
    """Apply ``fn`` to every row tensor of a stats dataclass (tuple fields: to each member)."""
    kw = {}
    for f in fields(stats):
        v = getattr(stats, f.name)
        kw[f.name] = tuple(fn(x, i) for i, x in enumerate(v)) if isinstance(v, tuple) else fn(v, None)
    return replace(stats, **kw)


def _cat_rows(parts: list[Any]) -> Any:
    kw = {}
    for f in fields(parts[0]):
        vals = [getattr(p, f.name) for p in parts]
        if isinstance(vals[0], tuple):
            kw[f.name] = tuple(torch.cat([v[i] for v in vals]) for i in range(len(vals[0])))
        else:
            kw[f.name] = torch.cat(vals)
    return replace(parts[0], **kw)


def gather_row_stats(acc, parts: list[Any], rollout_ids: list[torch.Tensor]) -> tuple[Any, torch.Tensor]:
    """Concatenate this rank's per-micro-batch row statistics (``Entry.step_stats``) and gather them from every
    rank, with their global row ids; every rank ends with the same step-wide table."""
    ids = torch.cat(rollout_ids)
    rows = RowGather(acc, ids.numel(), ids.device)

    def gather(x: torch.Tensor, _i=None) -> torch.Tensor:
        return rows(x, 0)

    return _map_rows(_cat_rows(parts), gather), gather(ids)


def context_without(stats: Any, ids: torch.Tensor, rows: torch.Tensor) -> Any:
    """The step-wide row statistics minus ``rows`` (the micro-batch's own rows, which carry the gradient)."""
    other = ~torch.isin(ids, rows)
    return _map_rows(stats, lambda x, _i: x[other])
