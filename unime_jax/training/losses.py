"""Pure-JAX losses for both UniME training stages.

Stage 1: textual discriminative knowledge distillation (paper Eq. 2)
--------------------------------------------------------------------
``stage1_kd_loss`` distils the teacher's *relational* structure: for every anchor (row) it compares
the softmax over in-batch candidate similarities of the student with the teacher's.  The paper's
Eq. 2 leaves the KL direction, τ and the matrix the distributions come from open; the choices
made here, each configurable where it matters:

* **Direction**: default ``"teacher_student"`` = KL(P_teacher ‖ P_student), the standard
  distillation direction (what ``F.kl_div(log_softmax(S_s), softmax(S_t))`` computes, mode-covering
  on the teacher's distribution).  ``"student_teacher"`` gives the literal reading of Eq. 2,
  KL(P_student ‖ P_teacher).
* **τ**: default 0.02, the stage-2 temperature of the released ``loss.py`` (the paper never prints a
  stage-1 value; E5-V used 0.05).  Pass it explicitly when sweeping.
* **Which matrix**: the default reading follows E5-V's NLI triplets: rows are ``sent0`` embeddings,
  columns are ``nli_candidates(sent1, hard_neg)`` (all positives, then all hard negatives: n × 2n).
  The "self" reading of Eq. 2 (anchors against themselves, n × n) is supported with
  ``mask_diagonal=True``: the self-similarity diagonal is the constant 1/τ, which would make every row
  almost one-hot and carry no information about the teacher, so it is excluded from both softmaxes.
* **Reduction**: mean over rows ("batchmean").  Eq. 2 sums over rows; that only rescales the
  learning rate, and the mean keeps the loss scale independent of the batch size.
* The teacher is frozen (NV-Embed-v2), so its side is wrapped in ``stop_gradient``.

Stage 2: hard-negative enhanced instruction tuning (paper Eq. 3–4, deepglint/UniME ``loss.py``)
------------------------------------------------------------------------------------------------
``stage2_hardneg_loss`` follows the released ``SimpleContrastiveLossBatchRank``: cosine matrix over
the global batch, false-negative filter ``S_ij > S_ii + β``, top-k hard negatives chosen without
gradient, InfoNCE over the positive plus the k selected logits.  Where the code and the paper
differ, the paper wins: a row with fewer than k valid candidates *duplicates* its valid hard
negatives (cycling through them) rather than picking masked entries.  A row with none has only the
positive logit and contributes exactly 0.

Offline-mined negatives (``extra_c``, from ``python -m unime_jax.mine``) are not selected among: every
one that passes the β filter joins the denominator, after the k in-batch ones.  With ``k=0`` they are
the only negatives.

All functions are pure, jittable (``k``, ``all_negatives``, ``direction`` and ``mask_diagonal`` are
Python values and must be static under ``jax.jit``) and operate on *global* arrays: under ``jit`` with
batch-sharded inputs XLA inserts the all-gathers, which is how the global-batch hard-negative pool
of the reference (``DistributedContrastiveLossBatchRank``) is obtained.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from unime_jax.models.pooling import l2_normalize

__all__ = ["nli_candidates", "stage1_kd_loss", "stage2_hardneg_loss"]

Direction = Literal["teacher_student", "student_teacher"]
Metrics = dict[str, jax.Array]


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine-similarity matrix (rows of ``a`` against rows of ``b``), float32."""
    return l2_normalize(a) @ l2_normalize(b).T


# ----------------------------------------------------------------------------------------------
# Stage 1
# ----------------------------------------------------------------------------------------------


def nli_candidates(pos: jax.Array, hard_neg: jax.Array) -> jax.Array:
    """E5-V style candidate set: all rows' positives, then all rows' hard negatives (2n rows)."""
    return jnp.concatenate([pos, hard_neg], axis=0)


def _masked_log_softmax(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """Row-wise log-softmax over ``valid`` entries; invalid entries come back as 0 (not -inf).

    Returning 0 instead of -inf keeps ``p * (log p - log q)`` free of ``-inf - -inf`` NaNs in the
    forward pass and, more importantly, in its gradient.
    """
    logp = jax.nn.log_softmax(jnp.where(valid, logits, -jnp.inf), axis=-1)
    return jnp.where(valid, logp, 0.0)


def _row_entropy(logp: jax.Array, valid: jax.Array) -> jax.Array:
    p = jnp.where(valid, jnp.exp(logp), 0.0)
    return -jnp.sum(p * logp, axis=-1)


def _masked_argmax(logits: jax.Array, valid: jax.Array) -> jax.Array:
    return jnp.argmax(jnp.where(valid, logits, -jnp.inf), axis=-1)


def stage1_kd_loss(
    student_q: jax.Array,
    student_c: jax.Array,
    teacher_q: jax.Array,
    teacher_c: jax.Array,
    *,
    tau: float = 0.02,
    direction: Direction = "teacher_student",
    mask_diagonal: bool = False,
) -> tuple[jax.Array, Metrics]:
    """Row-wise KL between teacher and student in-batch similarity distributions.

    Args:
      student_q: (n, Ds) student anchor embeddings (any norm).
      student_c: (m, Ds) student candidate embeddings, e.g. ``nli_candidates(pos, hard_neg)``, or
        ``student_q`` itself for the self variant.
      teacher_q: (n, Dt) teacher anchor embeddings; Dt may differ from Ds.
      teacher_c: (m, Dt) teacher candidate embeddings, same order as ``student_c``.
      tau: softmax temperature dividing the cosine similarities.
      direction: ``"teacher_student"`` → KL(P_t ‖ P_s); ``"student_teacher"`` → KL(P_s ‖ P_t).
      mask_diagonal: exclude column i from row i in both softmaxes (self variant; needs n == m ≥ 2).

    Returns:
      (loss, metrics): loss is the mean KL over rows; metrics hold ``kd_loss``,
      ``teacher_entropy``, ``student_entropy`` (mean row entropies, nats) and ``top1_agreement``.
    """
    if direction not in ("teacher_student", "student_teacher"):
        raise ValueError(f"direction must be 'teacher_student' or 'student_teacher', got {direction!r}")
    n, m = student_q.shape[0], student_c.shape[0]
    if teacher_q.shape[0] != n or teacher_c.shape[0] != m:
        raise ValueError(
            f"student/teacher row counts differ: student ({n}, {m}), teacher ({teacher_q.shape[0]}, {teacher_c.shape[0]})"
        )
    if mask_diagonal and (n != m or n < 2):
        # A 1×1 matrix with its diagonal masked has no entries left to form a distribution.
        raise ValueError(f"mask_diagonal needs a square matrix with ≥ 2 rows, got ({n}, {m})")

    s_logits = _cosine(student_q, student_c) / tau
    # The teacher is frozen: no gradient may reach its embeddings whichever direction is used.
    t_logits = jax.lax.stop_gradient(_cosine(teacher_q, teacher_c) / tau)

    valid = jnp.ones((n, m), dtype=bool)
    if mask_diagonal:
        valid = ~jnp.eye(n, dtype=bool)

    logp_s = _masked_log_softmax(s_logits, valid)
    logp_t = _masked_log_softmax(t_logits, valid)
    logp_from, logp_to = (logp_t, logp_s) if direction == "teacher_student" else (logp_s, logp_t)
    p_from = jnp.where(valid, jnp.exp(logp_from), 0.0)
    kl_rows = jnp.sum(p_from * (logp_from - logp_to), axis=-1)
    loss = jnp.mean(kl_rows)

    agree = _masked_argmax(s_logits, valid) == _masked_argmax(t_logits, valid)
    metrics = {
        "kd_loss": loss,
        "teacher_entropy": jnp.mean(_row_entropy(logp_t, valid)),
        "student_entropy": jnp.mean(_row_entropy(logp_s, valid)),
        "top1_agreement": jnp.mean(agree.astype(jnp.float32)),
    }
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# Stage 2
# ----------------------------------------------------------------------------------------------


def _candidate_sims(q: jax.Array, c: jax.Array, extra_c: jax.Array | None) -> jax.Array:
    """(B, B+M) cosines: in-batch targets first, then row i's own extra candidates."""
    qn = l2_normalize(q)
    sims = qn @ l2_normalize(c).T
    if extra_c is not None:
        extra = jnp.einsum("bd,bmd->bm", qn, l2_normalize(extra_c))
        sims = jnp.concatenate([sims, extra], axis=1)
    return sims


def _candidate_masks(
    sims: jax.Array, pos: jax.Array, beta: float | jax.Array, target_ids: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Masks over the (B, B+M) candidate matrix: (is_positive, beta_filtered, valid_negative)."""
    b, ncols = sims.shape
    is_pos = jnp.eye(b, ncols, dtype=bool)  # all-False on the extra columns
    beta_filtered = (sims > pos[:, None] + beta) & ~is_pos
    invalid = is_pos | beta_filtered
    if target_ids is not None:
        # Duplicate labels ("Yes"/"No", class names) have S_ij == S_ii, pass the β filter and would
        # become the top "hard negatives"; they are false negatives, so drop them too.
        same = target_ids[:, None] == target_ids[None, :]
        same = jnp.pad(same, ((0, 0), (0, ncols - b)))  # extra candidates carry no label
        invalid = invalid | same
    return is_pos, beta_filtered, ~invalid


def _select_hard_negatives(sims: jax.Array, valid: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Indices (B, k) of the k most similar valid candidates, and whether each row has any.

    Rows with 0 < n_valid < k repeat their valid negatives cyclically (paper §3.3.2), instead of
    picking masked entries as ``torch.topk`` over -inf does in the released code.
    """
    ncols = sims.shape[1]
    scores = jnp.where(valid, jax.lax.stop_gradient(sims), -jnp.inf)
    # top_k cannot ask for more than there are columns; the cycling below covers the rest.
    kk = min(k, ncols)
    _, top_idx = jax.lax.top_k(scores, kk)  # descending, so valid entries come first
    n_valid = jnp.sum(valid, axis=1, keepdims=True)
    slot = jnp.arange(k)[None, :] % jnp.maximum(n_valid, 1)  # < n_valid ≤ kk when n_valid ≥ 1
    idx = jnp.take_along_axis(top_idx, slot, axis=1)
    return jax.lax.stop_gradient(idx), n_valid[:, 0] > 0


def stage2_hardneg_loss(
    q: jax.Array,
    c: jax.Array,
    *,
    tau: float = 0.02,
    beta: float = 0.1,
    k: int = 8,
    all_negatives: bool = False,
    target_ids: jax.Array | None = None,
    extra_c: jax.Array | None = None,
    extra_valid: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """InfoNCE over the positive and k mined in-batch hard negatives, with false-negative filter.

    Args:
      q: (B, D) query embeddings of the global batch (any norm).
      c: (B, D) target embeddings; ``c[i]`` is the positive of ``q[i]`` and a candidate negative
        for every other row.
      tau: temperature dividing the cosine logits.
      beta: candidate j ≠ i is a suspected false negative, and excluded, if S_ij > S_ii + beta.
      k: number of in-batch hard negatives per row (static); 0 only with ``extra_c``.  Ignored when
        ``all_negatives``.
      all_negatives: use every remaining (unfiltered) candidate in the denominator instead of the
        top-k (VLM2Vec-style in-batch InfoNCE, but still with the false-negative filter).
      target_ids: optional (B,) int ids of the target contents; candidates whose id equals the
        row's own target id are excluded as well.  Extra candidates are never id-masked.
      extra_c: optional (B, M, D) externally mined negatives for each row, subject to the same β
        filter; every one that passes it is a negative, in addition to the in-batch ones (k=0 and
        not ``all_negatives``: the mined negatives alone).
      extra_valid: optional (B, M) bool; False marks an ``extra_c`` slot that holds no negative (the
        data had none for it): it is neither a negative nor counted as a candidate.

    Returns:
      (loss, metrics), all float32 scalars: ``loss``; ``false_neg_frac`` (fraction of non-positive
      candidates removed by the β rule, whether or not also id-masked); ``rows_with_false_neg``;
      ``pos_sim`` (mean S_ii); ``hardneg_sim`` (mean cosine of the negatives actually in the
      denominator, duplicates counted, 0 if none); ``acc`` (fraction of rows whose positive beats
      every such negative; a row without negatives counts as correct).
    """
    if k < 0:
        raise ValueError(f"k must be non-negative, got {k}")
    if k == 0 and not all_negatives and extra_c is None:
        raise ValueError(
            "k=0 with all_negatives=False and no extra_c leaves only the positive logit (loss ≡ 0); "
            "set all_negatives=True for the in-batch InfoNCE baseline"
        )
    b = q.shape[0]
    if c.shape[0] != b:
        raise ValueError(f"q and c must have the same batch size, got {b} and {c.shape[0]}")
    if extra_c is not None and extra_c.shape[0] != b:
        raise ValueError(f"extra_c must be (B, M, D) with B={b}, got {extra_c.shape}")
    if target_ids is not None and target_ids.shape != (b,):
        raise ValueError(f"target_ids must have shape ({b},), got {target_ids.shape}")

    sims = _candidate_sims(q, c, extra_c)
    pos = jnp.diagonal(sims[:, :b])
    _, beta_filtered, valid = _candidate_masks(sims, pos, beta, target_ids)
    n_offdiag = sims.size - b
    if extra_valid is not None:
        present = jnp.concatenate([jnp.ones((b, b), bool), extra_valid.astype(bool)], axis=1)
        beta_filtered, valid = beta_filtered & present, valid & present
        n_offdiag = jnp.sum(present) - b

    batch_sims, batch_valid = sims[:, :b], valid[:, :b]
    if all_negatives:
        # Every valid candidate is a negative (the positive column itself is not valid).
        neg_sims, neg_valid = batch_sims, batch_valid
    elif k > 0:
        idx, row_has_neg = _select_hard_negatives(batch_sims, batch_valid, k)
        neg_sims = jnp.take_along_axis(batch_sims, idx, axis=1)  # differentiable gather of real cosines
        neg_valid = jnp.broadcast_to(row_has_neg[:, None], idx.shape)
    else:  # mined negatives only
        neg_sims, neg_valid = batch_sims[:, :0], batch_valid[:, :0]
    # Mined negatives were chosen offline as the hardest: all that pass the β filter are used.
    neg_sims = jnp.concatenate([neg_sims, sims[:, b:]], axis=1)
    neg_valid = jnp.concatenate([neg_valid, valid[:, b:]], axis=1)
    # Positive at column 0; invalid negatives are -inf so a row without negatives has loss exactly 0
    # (and, since the positive is always there, log_softmax never sees an all -inf row).
    neg_logits = jnp.where(neg_valid, neg_sims / tau, -jnp.inf)
    logits = jnp.concatenate([pos[:, None] / tau, neg_logits], axis=1)
    loss = jnp.mean(-jax.nn.log_softmax(logits, axis=1)[:, 0])

    n_neg = jnp.sum(neg_valid)
    max_neg = jnp.max(jnp.where(neg_valid, neg_sims, -jnp.inf), axis=1)
    metrics = {
        "loss": loss,
        "false_neg_frac": jnp.sum(beta_filtered) / jnp.maximum(n_offdiag, 1).astype(jnp.float32),
        "rows_with_false_neg": jnp.mean(jnp.any(beta_filtered, axis=1).astype(jnp.float32)),
        "pos_sim": jnp.mean(pos),
        "hardneg_sim": jnp.sum(jnp.where(neg_valid, neg_sims, 0.0)) / jnp.maximum(n_neg, 1),
        "acc": jnp.mean((pos > max_neg).astype(jnp.float32)),
    }
    return loss, {name: v.astype(jnp.float32) for name, v in metrics.items()}
