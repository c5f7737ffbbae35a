"""DenseContrastiveLoss against a direct transcription of DenseCL's head (WXinlong/DenseCL,
openselfsup/models/densecl.py forward_train, in DenseCL's (B, D, S) layout), its queues (ring
buffer, state_dict, keys gathered over two gloo ranks), errors and torch.compile."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import loca_kernels as lk
from helpers import assert_close, backend_params

# The module on the reference and the C++ backends in float32 against the transcription in float64
# (each op's own tests cover every backend and dtype).
BACKENDS = [p for p in backend_params("queue_contrastive_forward") if p.values[0] in ("torch", "cpu")]


def densecl_head(q, q_grid, k, k_grid, q_b, k_b, queue, queue2, temperature, weight):
    """DenseCL's formulas: q, k (B, D); q_grid, k_grid (B, D, S); q_b, k_b (B, C, S); queues (D, K)."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    q_grid, k_grid = F.normalize(q_grid, dim=1), F.normalize(k_grid, dim=1)
    q_b, k_b = F.normalize(q_b, dim=1), F.normalize(k_b, dim=1)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, queue)
    match = torch.matmul(q_b.permute(0, 2, 1), k_b).max(dim=2)[1]                   # (B, S)
    positive = torch.gather(k_grid, 2, match.unsqueeze(1).expand(-1, k_grid.size(1), -1))
    l_pos_dense = (q_grid * positive).sum(1).reshape(-1, 1)
    l_neg_dense = torch.einsum("nc,ck->nk", q_grid.permute(0, 2, 1).reshape(-1, q_grid.size(1)), queue2)

    def head(pos, neg):
        logits = torch.cat([pos, neg], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))

    return (1 - weight) * head(l_pos, l_neg) + weight * head(l_pos_dense, l_neg_dense)


def make_inputs(batch=3, patches=7, dim=16, channels=24, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shapes = dict(query_global=(batch, dim), query_dense=(batch, patches, dim), key_global=(batch, dim),
                  key_dense=(batch, patches, dim), query_backbone=(batch, patches, channels),
                  key_backbone=(batch, patches, channels))
    return {name: torch.randn(shape, generator=g, dtype=dtype) for name, shape in shapes.items()}


@pytest.mark.parametrize("backend,device", [p.values for p in BACKENDS], ids=[p.id for p in BACKENDS])
def test_equals_densecl_head_and_enqueues_its_keys(backend, device):
    x = make_inputs(dtype=torch.float32)
    student = {n: x[n].clone().requires_grad_() for n in ("query_global", "query_dense")}
    loss_fn = lk.DenseContrastiveLoss(16, 12, temperature=0.2, dense_weight=0.5, backend=backend)
    queue, queue2 = loss_fn.queue_global.clone(), loss_fn.queue_dense.clone()
    total, terms = loss_fn(**{**x, **student})
    total.backward()

    x = {name: t.double() for name, t in x.items()}
    reference = {n: x[n].clone().requires_grad_() for n in ("query_global", "query_dense")}
    expected = densecl_head(reference["query_global"], reference["query_dense"].transpose(1, 2), x["key_global"],
                            x["key_dense"].transpose(1, 2), x["query_backbone"].transpose(1, 2),
                            x["key_backbone"].transpose(1, 2), queue.double(), queue2.double(), 0.2, 0.5)
    expected.backward()
    assert_close(total, expected, torch.float32, name="total")
    assert_close(terms["global"] + terms["dense"], 2 * expected, torch.float32, name="terms")
    for name in student:
        assert_close(student[name].grad, reference[name].grad, torch.float32, name=f"grad {name}")

    # Enqueued: the normalised key vectors and the pooled dense keys (DenseCL's k2), at 0..B-1.
    assert int(loss_fn.queue_ptr) == 3
    assert_close(loss_fn.queue_global[:, :3], F.normalize(x["key_global"], dim=1).t(), torch.float32,
                 name="queue_global")
    pooled = F.normalize(x["key_dense"].mean(dim=1), dim=1)
    assert_close(loss_fn.queue_dense[:, :3], pooled.t(), torch.float32, name="queue_dense")
    assert torch.equal(loss_fn.queue_global[:, 3:], queue[:, 3:])
    assert torch.equal(loss_fn.queue_dense[:, 3:], queue2[:, 3:])


def test_ring_buffer_wraps_and_state_dict_resumes():
    loss_fn = lk.DenseContrastiveLoss(16, 6).double()
    for step in range(3):
        loss_fn(**make_inputs(seed=step))
    # 3 steps of 3 keys in 6 slots: the third step overwrote slots 0..2 and the pointer is 3.
    assert int(loss_fn.queue_ptr) == 3
    last = F.normalize(make_inputs(seed=2)["key_global"], dim=1).t()
    assert_close(loss_fn.queue_global[:, :3], last, name="wrapped keys")
    resumed = lk.DenseContrastiveLoss(16, 6).double()
    resumed.load_state_dict(loss_fn.state_dict())
    assert set(loss_fn.state_dict()) == {"queue_global", "queue_dense", "queue_ptr"}
    x = make_inputs(seed=9)
    assert torch.equal(resumed(**x)[0], loss_fn(**x)[0])


def test_loss_reads_a_snapshot_so_backward_survives_the_enqueue():
    x = make_inputs(dtype=torch.float32)
    query = x["query_global"].requires_grad_()
    total, _ = lk.DenseContrastiveLoss(16, 12)(**x)
    total.backward()            # the queues were written after the loss: no version-counter error
    assert query.grad is not None and torch.isfinite(query.grad).all()


def test_errors_name_the_argument():
    loss_fn = lk.DenseContrastiveLoss(16, 12)
    x = make_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="queue_size=12 must be a multiple of the global batch"):
        lk.DenseContrastiveLoss(16, 12)(**make_inputs(batch=5, dtype=torch.float32))
    with pytest.raises(ValueError, match="key_dense"):
        loss_fn(**{**x, "key_dense": x["key_dense"][:, :, :8]})
    with pytest.raises(ValueError, match="query_global must have 2 dimensions"):
        loss_fn(**{**x, "query_global": x["query_global"][None]})
    with pytest.raises(ValueError, match="query_backbone"):
        loss_fn(**{**x, "query_backbone": x["query_backbone"][:, :5]})
    for kwargs, match in (({"temperature": 0.0}, "temperature"), ({"dense_weight": 1.5}, "dense_weight"),
                          ({"queue_size": 0}, "queue_size")):
        with pytest.raises(ValueError, match=match):
            lk.DenseContrastiveLoss(16, **{"queue_size": 12, **kwargs})


def test_torch_compile_fullgraph():
    x = make_inputs(dtype=torch.float32)
    eager = lk.DenseContrastiveLoss(16, 12)
    compiled = lk.DenseContrastiveLoss(16, 12)
    compiled.load_state_dict(eager.state_dict())
    expected, _ = eager(**x)
    total, _ = torch.compile(compiled, fullgraph=True, backend="aot_eager")(**x)
    assert_close(total, expected)
    assert torch.equal(compiled.queue_global, eager.queue_global) and int(compiled.queue_ptr) == 3


# ---------------------------------------------------------------- keys gathered over two ranks

def _rank_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)             # the same initial queues on both ranks
        loss_fn = lk.DenseContrastiveLoss(16, 12, group=dist.group.WORLD)
        loss_fn(**make_inputs(seed=rank, dtype=torch.float32))
        torch.save(loss_fn.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch was built without torch.distributed (gloo)")
def test_two_gloo_ranks_enqueue_the_keys_of_both(tmp_path):
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    keys = torch.cat([F.normalize(make_inputs(seed=r, dtype=torch.float32)["key_global"], dim=1) for r in (0, 1)])
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for state in states:
        assert int(state["queue_ptr"]) == 6
        assert_close(state["queue_global"][:, :6], keys.t(), name="gathered keys, rank-major")
    assert torch.equal(states[0]["queue_dense"], states[1]["queue_dense"])
