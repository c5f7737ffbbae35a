"""LocaLoss (loca_kernels/losses.py) against a plain-PyTorch composition: values and
gradients of every term, ignored patches, the all-ignored batch, input layouts,
torch.compile, and the mean-entropy term over two ranks of a process group."""
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from loca_kernels import LocaLoss
from helpers import assert_close

TEMPERATURE = 0.1


def _batch(b, v, nq, nr, k, dtype, ignored=0.3, seed=0):
    """Position logits (B, V, Nq, Nr), targets (B, V, Nq), student cluster logits (B, V, Nq, K)
    and teacher assignments (B, Nr, K) whose rows sum to 1."""
    g = torch.Generator().manual_seed(seed)
    position = torch.randn(b, v, nq, nr, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, nr, (b, v, nq), generator=g)
    targets[torch.rand(b, v, nq, generator=g) < ignored] = -1
    cluster = torch.randn(b, v, nq, k, generator=g).to(dtype).requires_grad_()
    teacher = torch.softmax(3 * torch.randn(b, nr, k, generator=g), dim=-1)
    return position, targets, cluster, teacher


def _reference_terms(position, targets, cluster, teacher):
    """The three terms in float64 on the kept patches only (the composition the loss must equal)."""
    position, cluster, teacher = position.double(), cluster.double(), teacher.double()
    valid = targets != -1
    if not valid.any():
        zero = (position.sum() + cluster.sum()) * 0
        return zero, zero, zero
    localisation = F.cross_entropy(position[valid], targets[valid])
    at_targets = teacher[torch.arange(targets.shape[0])[:, None, None], targets.clamp_min(0)][valid]
    log_q = F.log_softmax(cluster[valid] / TEMPERATURE, dim=-1)
    cluster_ce = -(at_targets * log_q).sum(-1).mean()
    mean_prediction = log_q.exp().mean(0)
    return localisation, cluster_ce, (mean_prediction * mean_prediction.log()).sum()


def _check_terms(total, terms, expected_terms, inputs, dtype):
    names = ("localisation", "cluster", "mean_entropy")
    for name, expected in zip(names, expected_terms):
        assert terms[name].dtype == torch.float32
        assert_close(terms[name], expected, torch.float32, name=name)
    assert_close(total, sum(expected_terms), torch.float32, name="total")
    grads = torch.autograd.grad(total, inputs)
    expected_grads = torch.autograd.grad(sum(expected_terms), inputs)
    for i, (grad, expected) in enumerate(zip(grads, expected_grads)):
        assert_close(grad, expected, dtype if dtype != torch.float64 else torch.float32, name=f"grad {i}")


@pytest.mark.parametrize("shape", [(2, 3, 5, 9, 6), (1, 1, 1, 1, 1), (3, 10, 7, 16, 33)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_loss_terms_and_gradients_match_plain_pytorch(shape, dtype):
    position, targets, cluster, teacher = _batch(*shape, dtype, ignored=0.3 if shape[2] > 1 else 0.0)
    total, terms = LocaLoss()(position, targets, cluster, teacher)
    expected = _reference_terms(position, targets, cluster, teacher)
    _check_terms(total, terms, expected, (position, cluster), dtype)


def test_flattened_and_view_major_inputs_give_the_same_loss():
    b, v, nq, nr, k = 2, 3, 4, 9, 5
    position, targets, cluster, teacher = _batch(b, v, nq, nr, k, torch.float32)
    loss = LocaLoss()
    total, _ = loss(position, targets, cluster, teacher)
    flat_total, _ = loss(position.reshape(-1, nr), targets, cluster.reshape(-1, k), teacher)
    assert_close(flat_total, total)
    # Query views as masked_cross_attention orders them: (V*B, Nq, C), view-major.
    view_major = position.transpose(0, 1).reshape(v * b, nq, nr)
    cluster_view_major = cluster.transpose(0, 1).reshape(v * b, nq, k)
    vm_total, _ = loss(view_major.unflatten(0, (v, b)).transpose(0, 1), targets,
                       cluster_view_major.unflatten(0, (v, b)).transpose(0, 1), teacher)
    assert_close(vm_total, total)


def test_ignored_patches_do_not_enter_any_term():
    position, targets, cluster, teacher = _batch(2, 3, 6, 9, 5, torch.float32, ignored=0.5)
    ignored = targets == -1
    assert ignored.any() and (~ignored).any()
    total, terms = LocaLoss()(position, targets, cluster, teacher)
    # Whatever sits at ignored patches changes nothing.
    g = torch.Generator().manual_seed(5)
    position2 = torch.where(ignored[..., None], 1e4 * torch.randn(position.shape, generator=g),
                            position.detach()).requires_grad_()
    cluster2 = torch.where(ignored[..., None], 1e4 * torch.randn(cluster.shape, generator=g),
                           cluster.detach()).requires_grad_()
    total2, terms2 = LocaLoss()(position2, targets, cluster2, teacher)
    for name in terms:
        assert_close(terms2[name], terms[name], name=name)
    total2.backward()
    assert torch.equal(position2.grad[ignored], torch.zeros_like(position2.grad[ignored]))
    assert torch.equal(cluster2.grad[ignored], torch.zeros_like(cluster2.grad[ignored]))


def test_a_batch_with_every_patch_ignored_gives_zero_loss_and_zero_gradients():
    position, targets, cluster, teacher = _batch(2, 2, 3, 4, 5, torch.float32)
    targets = torch.full_like(targets, -1)
    total, terms = LocaLoss()(position, targets, cluster, teacher)
    assert total.item() == 0 and all(t.item() == 0 for t in terms.values())
    total.backward()
    assert torch.equal(position.grad, torch.zeros_like(position))
    assert torch.equal(cluster.grad, torch.zeros_like(cluster))


def test_mean_entropy_over_all_patches_includes_those_outside_the_reference():
    # The official trainer's me-max block averages softmax(q_feat_pred) over every query patch.
    position, targets, cluster, teacher = _batch(2, 3, 6, 9, 5, torch.float64, ignored=0.5)
    assert (targets == -1).any()
    _, terms = LocaLoss(mean_entropy_over="all")(position, targets, cluster, teacher)
    mean_prediction = F.softmax(cluster.double() / TEMPERATURE, dim=-1).mean(dim=(0, 1, 2))
    assert_close(terms["mean_entropy"], (mean_prediction * mean_prediction.log()).sum(), torch.float32)
    _, valid_terms = LocaLoss()(position, targets, cluster, teacher)
    assert_close(valid_terms["mean_entropy"], _reference_terms(position, targets, cluster, teacher)[2],
                 torch.float32)
    assert abs(valid_terms["mean_entropy"].item() - terms["mean_entropy"].item()) > 1e-3
    for name in ("localisation", "cluster"):   # the cross-entropies still leave those patches out
        assert_close(terms[name], valid_terms[name], torch.float32, name=name)
    # Without patches outside, both choices agree; an all-outside batch still has a finite term.
    inside = targets.clamp_min(0)
    assert_close(LocaLoss(mean_entropy_over="all")(position, inside, cluster, teacher)[1]["mean_entropy"],
                 LocaLoss()(position, inside, cluster, teacher)[1]["mean_entropy"], torch.float32)
    outside = torch.full_like(targets, -1)
    assert_close(LocaLoss(mean_entropy_over="all")(position, outside, cluster, teacher)[1]["mean_entropy"],
                 terms["mean_entropy"], torch.float32)
    with pytest.raises(ValueError, match="mean_entropy_over"):
        LocaLoss(mean_entropy_over="some")


def test_localisation_only_weights_and_ignore_index():
    position, targets, cluster, teacher = _batch(2, 3, 5, 9, 6, torch.float64)
    expected = _reference_terms(position, targets, cluster, teacher)
    total, terms = LocaLoss()(position, targets)
    assert_close(total, expected[0], torch.float32)
    assert terms["cluster"].item() == 0 and terms["mean_entropy"].item() == 0
    weighted = LocaLoss(localisation_weight=0.5, cluster_weight=2.0, entropy_weight=3.0)
    total, _ = weighted(position, targets, cluster, teacher)
    assert_close(total, 0.5 * expected[0] + 2 * expected[1] + 3 * expected[2], torch.float32)
    shifted = torch.where(targets == -1, 255, targets)
    total, _ = LocaLoss(ignore_index=255)(position, shifted, cluster, teacher)
    assert_close(total, sum(expected), torch.float32)


def test_bad_inputs_raise_errors_that_name_the_argument():
    position, targets, cluster, teacher = _batch(2, 3, 5, 9, 6, torch.float32)
    loss = LocaLoss()
    with pytest.raises(TypeError, match="LocaLoss: targets must have dtype in \\(int64\\), got torch.int32"):
        loss(position, targets.int())
    with pytest.raises(ValueError, match=r"LocaLoss: position_logits must have shape \(B, V, Nq, C\) = "
                                         r"\(2, 3, 5\) \+ \(C,\) or \(B\*V\*Nq, C\) = \(30, C\), got \(3, 2, 5, 9\)"):
        loss(position.transpose(0, 1), targets)
    with pytest.raises(ValueError, match=r"LocaLoss: targets must be in \[0, Nr=9\) or ignore_index=-1, "
                                         r"got values in \[-2, 8\]"):
        loss(position, torch.where(targets == -1, -2, targets))
    with pytest.raises(ValueError, match=r"in \[0, Nr=8\) or ignore_index=-1, got values in \[-1, 8\]"):
        loss(position[..., :8], targets.clamp_max(8))
    with pytest.raises(ValueError, match="LocaLoss: cluster_logits need teacher_assignments"):
        loss(position, targets, cluster)
    with pytest.raises(ValueError, match="teacher_assignments were given without cluster_logits"):
        loss(position, targets, None, teacher)
    with pytest.raises(ValueError, match=r"teacher_assignments must have shape \(B=2, Nr=9, K=6\), got \(2, 9, 5\)"):
        loss(position, targets, cluster, teacher[..., :5])
    with pytest.raises(ValueError, match=r"teacher_assignments must have shape \(B=2, Nr=9, K=6\), got \(2, 8, 6\)"):
        loss(position, targets, cluster, teacher[:, :8])
    with pytest.raises(ValueError, match="student_temperature must be > 0"):
        LocaLoss(student_temperature=0)


def test_compile_fullgraph_has_no_graph_break():
    position, targets, cluster, teacher = _batch(2, 3, 5, 9, 6, torch.float32)
    loss = LocaLoss()
    explanation = torch._dynamo.explain(loss)(position, targets, cluster, teacher)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    total, terms = torch.compile(loss, fullgraph=True, backend="aot_eager")(position, targets, cluster, teacher)
    expected, _ = loss(position, targets, cluster, teacher)
    assert_close(total, expected)
    total.backward()


# ---------------------------------------------------------------- over two ranks

WORLD_SIZE = 2
# Rank 0 gets the first reference image, rank 1 the other two: uneven kept-patch counts.
RANK_ROWS = [slice(0, 1), slice(1, 3)]


def _rank_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        position, targets, cluster, teacher = _batch(3, 2, 5, 9, 6, torch.float64)
        rows = RANK_ROWS[rank]
        local_cluster = cluster.detach()[rows].requires_grad_()
        # The all-reduce must not be a deprecated one (its FutureWarning used to show on every rank).
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            _, terms = LocaLoss(group=dist.group.WORLD)(position.detach()[rows], targets[rows], local_cluster,
                                                       teacher[rows])
            terms["mean_entropy"].backward()
        torch.save({"mean_entropy": terms["mean_entropy"].detach(), "grad": local_cluster.grad},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch was built without torch.distributed (gloo)")
def test_mean_entropy_over_a_process_group_equals_the_single_process_value(tmp_path):
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE)
    position, targets, cluster, teacher = _batch(3, 2, 5, 9, 6, torch.float64)
    assert (targets[RANK_ROWS[0]] != -1).sum() != (targets[RANK_ROWS[1]] != -1).sum()
    expected = _reference_terms(position, targets, cluster, teacher)[2]
    expected_grad, = torch.autograd.grad(expected, cluster)
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert_close(result["mean_entropy"], expected, torch.float32, name=f"rank {rank} mean_entropy")
        # The backward of the all-reduce sums over ranks, so DDP's mean over ranks of these
        # gradients is the gradient of the global term.
        assert_close(result["grad"], WORLD_SIZE * expected_grad[RANK_ROWS[rank]], torch.float32,
                     name=f"rank {rank} gradient")
