"""Stage-1 and stage-2 losses against direct float64 numpy implementations (row loops)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from unime_jax.training.losses import nli_candidates, stage1_kd_loss, stage2_hardneg_loss

TOL = 1e-5

# Everything runs jitted (eager dispatch compiles every primitive) and with XLA's CPU backend
# optimisations off, which halves compile time, the dominant cost of this file.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
stage1_jit = fast_jit(stage1_kd_loss, static_argnames=("direction", "mask_diagonal"))


@functools.partial(fast_jit, static_argnames=("k", "all_negatives"))
def stage2_value_and_grad(q: jax.Array, c: jax.Array, **kw: Any):
    """((loss, metrics), (dL/dq, dL/dc))."""
    fn = functools.partial(stage2_hardneg_loss, **kw)
    return jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(q, c)


# ----------------------------------------------------------------------------------------------
# numpy references
# ----------------------------------------------------------------------------------------------


def np_normalize(x: Any) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_log_softmax(v: np.ndarray) -> np.ndarray:
    v = v - v.max()
    return v - np.log(np.exp(v).sum())


def np_stage1(sq, sc, tq, tc, *, tau, direction, mask_diagonal) -> dict[str, float]:
    s = np_normalize(sq) @ np_normalize(sc).T / tau
    t = np_normalize(tq) @ np_normalize(tc).T / tau
    kls, ent_t, ent_s, agree = [], [], [], []
    for i in range(s.shape[0]):
        cols = [j for j in range(s.shape[1]) if not (mask_diagonal and j == i)]
        ls, lt = np_log_softmax(s[i, cols]), np_log_softmax(t[i, cols])
        a, b = (lt, ls) if direction == "teacher_student" else (ls, lt)
        kls.append(np.sum(np.exp(a) * (a - b)))
        ent_t.append(-np.sum(np.exp(lt) * lt))
        ent_s.append(-np.sum(np.exp(ls) * ls))
        agree.append(np.argmax(ls) == np.argmax(lt))
    return {
        "kd_loss": np.mean(kls),
        "teacher_entropy": np.mean(ent_t),
        "student_entropy": np.mean(ent_s),
        "top1_agreement": np.mean(agree),
    }


def np_stage2(q, c, *, tau=0.02, beta=0.1, k=8, all_negatives=False, target_ids=None, extra_c=None):
    """Returns (metrics, chosen): chosen[i] lists the candidate columns in row i's denominator."""
    b = len(q)
    qn = np_normalize(q)
    s = qn @ np_normalize(c).T
    if extra_c is not None:
        s = np.concatenate([s, np.einsum("bd,bmd->bm", qn, np_normalize(extra_c))], axis=1)
    ncols = s.shape[1]
    losses, neg_sims, accs, chosen_rows, n_valid = [], [], [], [], []
    n_filtered = rows_filtered = 0
    for i in range(b):
        pos = s[i, i]
        filtered = {j for j in range(ncols) if j != i and s[i, j] > pos + beta}
        n_filtered += len(filtered)
        rows_filtered += bool(filtered)
        same_id = {j for j in range(b) if target_ids is not None and target_ids[j] == target_ids[i]}
        valid = [j for j in range(b) if j != i and j not in filtered and j not in same_id]
        n_valid.append(len(valid))
        if all_negatives:
            chosen = valid
        else:
            ranked = sorted(valid, key=lambda j: -s[i, j])  # stable: ties → lower index, like top_k
            chosen = [ranked[r % len(ranked)] for r in range(k)] if ranked else []
        chosen += [j for j in range(b, ncols) if j not in filtered]  # every unfiltered mined negative
        logits = np.array([pos] + [s[i, j] for j in chosen]) / tau
        losses.append(-np_log_softmax(logits)[0])
        neg_sims.extend(s[i, j] for j in chosen)
        accs.append(all(pos > s[i, j] for j in chosen))
        chosen_rows.append(chosen)
    metrics = {
        "loss": np.mean(losses),
        "false_neg_frac": n_filtered / (b * (ncols - 1)),
        "rows_with_false_neg": rows_filtered / b,
        "pos_sim": np.mean(np.diagonal(s[:, :b])),
        "hardneg_sim": np.mean(neg_sims) if neg_sims else 0.0,
        "acc": np.mean(accs),
        "n_valid": np.array(n_valid),
    }
    return metrics, chosen_rows


def assert_metrics_match(got: dict[str, jax.Array], ref: dict[str, Any]) -> None:
    for name, value in got.items():
        assert value.shape == () and value.dtype == jnp.float32, name
        np.testing.assert_allclose(float(value), ref[name], rtol=TOL, atol=TOL, err_msg=name)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def stage1_data(seed: int, n: int = 6, ds: int = 16, dt: int = 24):
    """Student and a related (noisy linear map of the student) teacher, so top-1 agreement is partial."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(ds, dt)) / np.sqrt(ds)
    sq, spos, sneg = (rng.normal(size=(n, ds)) for _ in range(3))
    spos = sq + 0.9 * spos  # positives resemble their anchors
    t = [x @ w + 0.7 * rng.normal(size=(n, dt)) for x in (sq, spos, sneg)]
    scale = rng.uniform(0.5, 3.0, size=(n, 1))  # embeddings need not be unit norm
    return [jnp.asarray(x * scale, jnp.float32) for x in (sq, spos, sneg, *t)]


def pair_data(seed: int, b: int, d: int = 16, noise: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, d))
    c = q + noise * rng.normal(size=(b, d))
    return q.astype(np.float32), c.astype(np.float32)


def with_false_negatives(q: np.ndarray, c: np.ndarray, pairs: list[tuple[int, int]], seed: int) -> np.ndarray:
    """Make target j a near copy of query i so that S_ij ≈ 1 > S_ii + β."""
    rng = np.random.default_rng(seed)
    c = c.copy()
    for i, j in pairs:
        c[j] = q[i] + 0.05 * rng.normal(size=q.shape[1])
    return c


# ----------------------------------------------------------------------------------------------
# stage 1
# ----------------------------------------------------------------------------------------------


def test_nli_candidates_order() -> None:
    pos = jnp.arange(6.0).reshape(3, 2)
    neg = -jnp.arange(6.0).reshape(3, 2)
    cand = nli_candidates(pos, neg)
    assert cand.shape == (6, 2)
    np.testing.assert_array_equal(cand[:3], pos)
    np.testing.assert_array_equal(cand[3:], neg)


@pytest.mark.parametrize("direction", ["teacher_student", "student_teacher"])
@pytest.mark.parametrize("variant", ["nli", "self"])
def test_stage1_matches_numpy(variant: str, direction: str) -> None:
    sq, spos, sneg, tq, tpos, tneg = stage1_data(seed=1)
    mask = variant == "self"
    if mask:
        sc, tc = sq, tq
    else:
        sc, tc = nli_candidates(spos, sneg), nli_candidates(tpos, tneg)
    loss, metrics = stage1_jit(sq, sc, tq, tc, tau=0.02, direction=direction, mask_diagonal=mask)
    ref = np_stage1(sq, sc, tq, tc, tau=0.02, direction=direction, mask_diagonal=mask)
    assert ref["kd_loss"] > 1e-2  # the teacher really differs from the student
    np.testing.assert_allclose(float(loss), ref["kd_loss"], rtol=TOL, atol=TOL)
    assert_metrics_match(metrics, ref)


def test_stage1_self_without_mask_is_dominated_by_diagonal() -> None:
    sq, _, _, tq, _, _ = stage1_data(seed=2)
    _, unmasked = stage1_jit(sq, sq, tq, tq, mask_diagonal=False)
    _, masked = stage1_jit(sq, sq, tq, tq, mask_diagonal=True)
    # The constant 1/τ diagonal makes every row nearly one-hot on itself: perfect, useless agreement.
    assert float(unmasked["top1_agreement"]) == 1.0
    assert float(unmasked["teacher_entropy"]) < 0.5 * float(masked["teacher_entropy"])
    ref = np_stage1(sq, sq, tq, tq, tau=0.02, direction="teacher_student", mask_diagonal=False)
    assert_metrics_match(unmasked, ref)


@pytest.mark.parametrize("direction", ["teacher_student", "student_teacher"])
def test_stage1_gradients(direction: str) -> None:
    sq, spos, sneg, tq, tpos, tneg = stage1_data(seed=3)
    sc, tc = nli_candidates(spos, sneg), nli_candidates(tpos, tneg)

    def loss_fn(sq, sc, tq, tc):
        return stage1_kd_loss(sq, sc, tq, tc, direction=direction)[0]

    grads = fast_jit(jax.grad(loss_fn, argnums=(0, 1, 2, 3)))(sq, sc, tq, tc)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    assert min(np.abs(np.asarray(g)).max() for g in grads[:2]) > 1e-3
    # The teacher is frozen.
    assert max(np.abs(np.asarray(g)).max() for g in grads[2:]) == 0.0
    # A student identical to the teacher is at the minimum, in either direction.
    loss_same, _ = stage1_jit(tq, tc, tq, tc, direction=direction)
    assert abs(float(loss_same)) < 1e-6
    # Self variant with masked diagonal: finite gradients despite the -inf diagonal.
    g_self = fast_jit(
        jax.grad(lambda x: stage1_kd_loss(x, x, tq, tq, direction=direction, mask_diagonal=True)[0])
    )(sq)
    assert np.isfinite(np.asarray(g_self)).all()


def test_stage1_argument_errors() -> None:
    sq, spos, sneg, tq, tpos, tneg = stage1_data(seed=4)
    sc, tc = nli_candidates(spos, sneg), nli_candidates(tpos, tneg)
    with pytest.raises(ValueError, match="direction"):
        stage1_kd_loss(sq, sc, tq, tc, direction="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="square"):
        stage1_kd_loss(sq, sc, tq, tc, mask_diagonal=True)
    with pytest.raises(ValueError, match="row counts"):
        stage1_kd_loss(sq, sc, tq, tq)


# ----------------------------------------------------------------------------------------------
# stage 2
# ----------------------------------------------------------------------------------------------


def run_both(q, c, **kw):
    """Checks loss and metrics against numpy; returns (reference metrics, chosen columns, grads)."""
    (loss, metrics), grads = stage2_value_and_grad(jnp.asarray(q), jnp.asarray(c), **_as_jnp(kw))
    ref, chosen = np_stage2(q, c, **kw)
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=TOL, atol=TOL)
    assert_metrics_match(metrics, ref)
    return ref, chosen, grads


def _as_jnp(kw: dict[str, Any]) -> dict[str, Any]:
    # tau and beta always passed (traced), so calls that differ only in them share one compilation.
    kw = {"tau": 0.02, "beta": 0.1, "all_negatives": False, **kw}
    return {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}


FALSE_NEG_PAIRS = [(0, 1), (2, 5), (3, 4), (7, 6)]


def beta_data() -> tuple[np.ndarray, np.ndarray]:
    q, c = pair_data(seed=11, b=12)
    return q, with_false_negatives(q, c, FALSE_NEG_PAIRS, seed=12)


def fewer_than_k_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Six rows, three sharing an id: every row has fewer than k=8 valid candidates."""
    q, c = pair_data(seed=14, b=6)
    return q, c, np.array([0, 0, 0, 1, 2, 3], np.int32)


def test_stage2_plain_topk() -> None:
    q, c = pair_data(seed=10, b=12)
    ref, chosen, _ = run_both(q, c, k=4)
    assert ref["false_neg_frac"] == 0.0 and all(len(r) == 4 for r in chosen)


def test_stage2_beta_filter() -> None:
    q, c = beta_data()
    ref, chosen, _ = run_both(q, c, k=4, beta=0.1)
    # The filter must actually fire, and the filtered near-copies must not be chosen.
    assert ref["false_neg_frac"] > 0 and 0 < ref["rows_with_false_neg"] < 1
    for i, j in FALSE_NEG_PAIRS:
        assert j not in chosen[i]
    # Without the filter the near-copies become the top hard negatives (so the loss differs).
    ref_nofilter, chosen_nofilter, _ = run_both(q, c, k=4, beta=10.0)
    assert chosen_nofilter[0][0] == 1
    assert ref_nofilter["loss"] > ref["loss"] + 1.0


def test_stage2_duplicate_target_ids() -> None:
    q, c = pair_data(seed=13, b=10)
    ids = np.array([0, 1, 0, 2, 3, 1, 4, 0, 5, 6], np.int32)
    # Duplicate labels have identical embeddings, hence S_ij == S_ii: not caught by β.
    for j, src in [(2, 0), (7, 0), (5, 1)]:
        c[j] = c[src]
    ref_ids, chosen_ids, _ = run_both(q, c, k=3, target_ids=ids)
    ref_plain, chosen_plain, _ = run_both(q, c, k=3)
    assert chosen_plain[0][0] in (2, 7)  # the duplicate is the top "hard negative" without ids
    for i in range(len(ids)):
        assert all(ids[j] != ids[i] for j in chosen_ids[i])
    assert ref_ids["loss"] != pytest.approx(ref_plain["loss"], rel=1e-3)


def test_stage2_fewer_than_k_duplicates() -> None:
    q, c, ids = fewer_than_k_data()
    ref, chosen, _ = run_both(q, c, k=8, target_ids=ids)
    # Every row has fewer than k valid candidates, so its negatives repeat.
    assert all(0 < n < 8 for n in ref["n_valid"])
    assert all(len(r) == 8 and len(set(r)) == n for r, n in zip(chosen, ref["n_valid"], strict=True))


def zero_valid_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row 0 has no valid candidate: 1, 2 share its id and 3 is β-filtered."""
    q, c = pair_data(seed=15, b=4, noise=0.3)
    c[3] = q[0]
    c[0] = -q[0]
    return q, c, np.array([5, 5, 5, 7], np.int32)


def test_stage2_zero_valid_row_is_finite() -> None:
    q, c, ids = zero_valid_data()
    ref, chosen, (gq, gc) = run_both(q, c, k=2, target_ids=ids)
    assert ref["n_valid"][0] == 0 and ref["n_valid"].max() > 0 and chosen[0] == []
    assert np.isfinite(np.asarray(gq)).all() and np.isfinite(np.asarray(gc)).all()
    # Row 0 contributes no loss, so its query gets no gradient.
    assert np.abs(np.asarray(gq)[0]).max() == 0.0 and np.abs(np.asarray(gq)[1:]).max() > 0.0

    # Degenerate batch: nobody has a negative, loss is exactly 0 with zero gradients.
    same = jnp.zeros(4, jnp.int32)
    for k, all_neg in [(2, False), (0, True)]:
        (loss, metrics), grads = stage2_value_and_grad(
            jnp.asarray(q), jnp.asarray(c), **_as_jnp({"k": k, "target_ids": same, "all_negatives": all_neg})
        )
        assert float(loss) == 0.0 and float(metrics["acc"]) == 1.0
        assert all(np.abs(np.asarray(g)).max() == 0.0 for g in grads)


def test_stage2_all_negatives() -> None:
    q, c = pair_data(seed=16, b=10)
    c = with_false_negatives(q, c, [(1, 2), (4, 8)], seed=17)
    ids = np.array([0, 1, 2, 3, 4, 5, 6, 0, 7, 8], np.int32)
    # k is ignored (and k=0 allowed) when all negatives are used.
    ref, chosen, _ = run_both(q, c, k=0, all_negatives=True, target_ids=ids)
    assert ref["false_neg_frac"] > 0
    assert 2 not in chosen[1] and 7 not in chosen[0] and len(chosen[3]) == 9


def test_stage2_extra_negatives() -> None:
    b, m, d = 8, 3, 16
    q, c = pair_data(seed=18, b=b, d=d)
    rng = np.random.default_rng(19)
    extra = rng.normal(size=(b, m, d)).astype(np.float32)
    extra[:, 0] = q + 0.6 * rng.normal(size=(b, d))  # mined: hard, usually selected
    extra[2, 1] = q[2] + 0.01 * rng.normal(size=d)  # a false negative: must be filtered
    ref, chosen, _ = run_both(q, c, k=4, extra_c=extra)
    # Four in-batch negatives per row, plus the mined ones the β filter keeps (all of them).
    assert all(sum(j < b for j in r) == 4 for r in chosen)
    assert sum(j >= b for r in chosen for j in r) > 2 * b
    assert b + 1 not in chosen[2] and ref["false_neg_frac"] > 0
    run_both(q, c, k=0, all_negatives=True, extra_c=extra)


def test_stage2_mined_negatives_alone() -> None:
    b, m, d = 8, 3, 16
    q, c = pair_data(seed=18, b=b, d=d)
    extra = np.random.default_rng(19).normal(size=(b, m, d)).astype(np.float32)
    extra[2, 1] = q[2] + 0.01 * np.random.default_rng(20).normal(size=d)  # a false negative
    _, chosen, _ = run_both(q, c, k=0, extra_c=extra)
    assert all(j >= b for r in chosen for j in r) and b + 1 not in chosen[2]
    assert [len(r) for r in chosen] == [m, m, m - 1] + [m] * (b - 3)


def test_stage2_k_zero_raises() -> None:
    q, c = pair_data(seed=20, b=4)
    with pytest.raises(ValueError, match="all_negatives=True"):
        stage2_hardneg_loss(jnp.asarray(q), jnp.asarray(c), k=0)


def fixed_index_loss(q: jax.Array, c: jax.Array, idx: jax.Array, tau: float) -> jax.Array:
    """The numpy reference written in jax with the hard-negative indices frozen."""
    qn = q / jnp.linalg.norm(q, axis=1, keepdims=True)
    cn = c / jnp.linalg.norm(c, axis=1, keepdims=True)
    s = qn @ cn.T
    pos = jnp.diagonal(s)
    logits = jnp.concatenate([pos[:, None], jnp.take_along_axis(s, idx, axis=1)], axis=1) / tau
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - pos / tau)


@pytest.mark.parametrize("case", ["filtered", "duplicated"])
def test_stage2_gradient_with_same_indices(case: str) -> None:
    # Same shapes and static arguments as earlier tests, so the jitted loss is not recompiled.
    if case == "filtered":
        q, c = beta_data()
        kw: dict[str, Any] = {"k": 4, "tau": 0.02}
    else:
        q, c, ids = fewer_than_k_data()
        kw = {"k": 8, "target_ids": ids, "tau": 0.1}  # a warmer τ keeps the gradients non-negligible
    ref, chosen = np_stage2(q, c, **kw)
    idx = np.array(chosen)
    assert idx.shape == (len(q), kw["k"])
    if case == "filtered":
        assert ref["false_neg_frac"] > 0
    else:  # duplicated negatives must count once per copy in the gradient
        assert ref["n_valid"].max() < kw["k"]

    _, got = stage2_value_and_grad(jnp.asarray(q), jnp.asarray(c), **_as_jnp(kw))
    want = fast_jit(jax.grad(fixed_index_loss, argnums=(0, 1)))(
        jnp.asarray(q), jnp.asarray(c), jnp.asarray(idx), kw["tau"]
    )
    for g, w in zip(got, want, strict=True):
        assert np.abs(np.asarray(w)).max() > 1e-2
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=TOL, atol=TOL)


def test_stage2_gradient_finite_differences() -> None:
    q, c = pair_data(seed=24, b=4, d=3)
    kw: dict[str, Any] = {"k": 2, "tau": 0.2}
    _, got = stage2_value_and_grad(jnp.asarray(q), jnp.asarray(c), **_as_jnp(kw))
    h = 1e-6
    for x, g in zip((q, c), got, strict=True):
        fd = np.zeros(x.shape)
        for pos in np.ndindex(x.shape):
            x64 = x.astype(np.float64)
            plus, minus = x64.copy(), x64.copy()
            plus[pos] += h
            minus[pos] -= h
            args_p = (plus, c) if x is q else (q, plus)
            args_m = (minus, c) if x is q else (q, minus)
            fd[pos] = (np_stage2(*args_p, **kw)[0]["loss"] - np_stage2(*args_m, **kw)[0]["loss"]) / (2 * h)
        assert np.abs(fd).max() > 1e-2
        np.testing.assert_allclose(np.asarray(g), fd, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# jit + sharding
# ----------------------------------------------------------------------------------------------


def data_mesh() -> jax.sharding.Mesh:
    assert jax.device_count() == 8, "tests/conftest.py should provide 8 CPU devices"
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def test_stage2_jit_sharded_matches_unsharded() -> None:
    b, m, d = 16, 2, 16
    q, c = pair_data(seed=25, b=b, d=d)
    c = with_false_negatives(q, c, [(0, 9), (3, 12)], seed=26)
    extra = np.random.default_rng(27).normal(size=(b, m, d)).astype(np.float32)
    ids = np.arange(b, dtype=np.int32) % 12  # rows 0-3 share ids with rows 12-15
    mesh = data_mesh()
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", *([None] * (x.ndim - 1)))))  # noqa: E731
    args = [shard(x) for x in (q, c, ids, extra)]
    assert len(args[0].sharding.device_set) == 8 and not args[0].sharding.is_fully_replicated

    (loss, metrics), grads = stage2_value_and_grad(args[0], args[1], k=5, target_ids=args[2], extra_c=args[3])
    assert len(grads[0].sharding.device_set) == 8  # the computation really ran on the mesh
    # Reference: the same computation on plain single-device arrays (a separate compilation).
    (loss_ref, metrics_ref), grads_ref = stage2_value_and_grad(
        jnp.asarray(q), jnp.asarray(c), k=5, target_ids=jnp.asarray(ids), extra_c=jnp.asarray(extra)
    )
    assert len(grads_ref[0].sharding.device_set) == 1
    assert float(metrics_ref["false_neg_frac"]) > 0
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6, atol=1e-6)
    for name in metrics_ref:
        np.testing.assert_allclose(float(metrics[name]), float(metrics_ref[name]), rtol=1e-6, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-6)
    # And the sharded result still agrees with the numpy reference.
    ref, _ = np_stage2(q, c, k=5, target_ids=ids, extra_c=extra)
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=TOL, atol=TOL)


def test_stage1_jit_sharded_matches_unsharded() -> None:
    sq, spos, sneg, tq, tpos, tneg = stage1_data(seed=28, n=8)
    sc, tc = nli_candidates(spos, sneg), nli_candidates(tpos, tneg)
    mesh = data_mesh()
    sharded = [jax.device_put(x, NamedSharding(mesh, P("data", None))) for x in (sq, sc, tq, tc)]
    loss, metrics = stage1_jit(*sharded, tau=0.05, direction="student_teacher")
    loss_ref, metrics_ref = stage1_jit(sq, sc, tq, tc, tau=0.05, direction="student_teacher")
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6, atol=1e-6)
    for name in metrics_ref:
        np.testing.assert_allclose(float(metrics[name]), float(metrics_ref[name]), rtol=1e-6, atol=1e-6)
    ref = np_stage1(sq, sc, tq, tc, tau=0.05, direction="student_teacher", mask_diagonal=False)
    np.testing.assert_allclose(float(loss), ref["kd_loss"], rtol=TOL, atol=TOL)
