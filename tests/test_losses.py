"""Tests for fdbpl_hf.losses against independent loop-based reference formulas."""

from __future__ import annotations

import math

import pytest
import torch

from fdbpl_hf.losses import coop_loss, fdbpl_loss, kd_weights, pcd_loss

# float64 formulas against the direct ones: the vectorised exp/log of AVX2 and AVX-512 (Sleef) and the
# scalar ones of ATen's default kernels differ in the last ulps; rel=1e-9 is ~10^7 float64 ulps.
pytestmark = pytest.mark.numerics

B, C, D = 6, 5, 8


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float64, teacher_scale: float = 3.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pos_logits": (torch.randn(B, C, generator=g, dtype=torch.float64) * 2).to(dtype),
        "neg_logits": (torch.randn(B, C, generator=g, dtype=torch.float64) * 2).to(dtype),
        "teacher_logits": (torch.randn(B, C, generator=g, dtype=torch.float64) * teacher_scale).to(dtype),
        "image_features": torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype),
        "pos_text_features": torch.randn(C, D, generator=g, dtype=torch.float64).to(dtype),
        "neg_text_features": torch.randn(C, D, generator=g, dtype=torch.float64).to(dtype),
    }


# --- references: plain Python loops over regions / classes / pairs --------------------------------

def _softmax_row(row: list[float]) -> list[float]:
    mx = max(row)
    ex = [math.exp(v - mx) for v in row]
    s = sum(ex)
    return [e / s for e in ex]


def _entropy_row(p: list[float]) -> float:
    return -sum(pi * math.log(pi) for pi in p if pi > 0)


def _kl_row(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def _ref_weights(teacher: torch.Tensor, mode: str = "soft", thr: float = 0.5) -> list[float]:
    out = []
    for row in teacher.tolist():
        c = len(row)
        if c == 1:
            out.append(1.0)
            continue
        h = _entropy_row(_softmax_row(row)) / math.log(c)
        out.append((1.0 if h < thr else 0.0) if mode == "threshold" else 1.0 - h)
    return out


def _normalise(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _ref_terms(x: dict[str, torch.Tensor], mode: str = "soft", margin: float = 0.2) -> dict[str, float]:
    teacher = x["teacher_logits"].double()
    w = _ref_weights(teacher, mode)
    pos = neg = sim = 0.0
    for n in range(B):
        pt = _softmax_row(teacher[n].tolist())
        sp = x["pos_logits"][n].double().tolist()
        sn = x["neg_logits"][n].double().tolist()
        pp, pn = _softmax_row(sp), _softmax_row(sn)
        pos += w[n] * (0.5 * _kl_row(pt, pp) + 0.5 * _kl_row(pp, pt))
        neg += (1 - w[n]) * (-_entropy_row(pn))
        sim += w[n] * _dot(sp, sn) / math.sqrt(_dot(sp, sp) * _dot(sn, sn))
    return {"pos": pos / B, "neg": neg / B, "sim": sim / B, "pcd": _ref_pcd(x, w, margin), "weight": sum(w) / B}


def _ref_pcd(x: dict[str, torch.Tensor], w: list[float], margin: float = 0.2) -> float:
    f = [_normalise(r) for r in x["image_features"].double().tolist()]
    tp = [_normalise(r) for r in x["pos_text_features"].double().tolist()]
    tn = [_normalise(r) for r in x["neg_text_features"].double().tolist()]
    d = [[a - b for a, b in zip(tp[c], tn[c])] for c in range(len(tp))]
    y = [max(range(len(r)), key=lambda c, r=r: r[c]) for r in x["teacher_logits"].double().tolist()]
    total, count = 0.0, 0
    for n in range(B):
        for m in range(B):
            if n == m or y[n] == y[m]:
                continue
            delta = [a - b for a, b in zip(d[y[n]], d[y[m]])]
            a_n, a_m = _dot(f[n], delta), _dot(f[m], delta)
            total += w[n] * w[m] * max(0.0, a_m - a_n + margin)
            count += 1
    return total / count if count else 0.0


# --- values ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_terms_match_reference(seed: int) -> None:
    x = _inputs(seed)
    assert len(set(x["teacher_logits"].argmax(-1).tolist())) > 1  # PCD has pairs to rank
    out = fdbpl_loss(**x)
    ref = _ref_terms(x)
    for key in ("pos", "neg", "sim", "pcd", "weight"):
        assert out[key].shape == ()
        assert out[key].item() == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
    assert ref["pcd"] > 0


def test_total_is_weighted_sum_with_custom_lambdas() -> None:
    x = _inputs(3)
    lam = {"lambda_neg": 0.7, "lambda_sim": 0.3, "lambda_pcd": 2.5, "pcd_margin": 0.5}
    out = fdbpl_loss(**x, **lam)
    ref = _ref_terms(x, margin=0.5)
    expected = ref["pos"] + 0.7 * ref["neg"] + 0.3 * ref["sim"] + 2.5 * ref["pcd"]
    assert out["total"].item() == pytest.approx(expected, rel=1e-9)
    assert out["pcd"].item() == pytest.approx(ref["pcd"], rel=1e-9)


def test_default_lambdas() -> None:
    x = _inputs(4)
    out = fdbpl_loss(**x)
    expected = out["pos"] + 1.0 * out["neg"] + 0.001 * out["sim"] + 1.0 * out["pcd"]
    torch.testing.assert_close(out["total"], expected)


def test_loss_defaults_equal_the_training_arguments_defaults() -> None:
    """Calling the pure loss without arguments trains what the Trainer trains by default."""
    import dataclasses
    import inspect

    from fdbpl_hf import FDBPLTrainingArguments

    trainer_defaults = {f.name: f.default for f in dataclasses.fields(FDBPLTrainingArguments)}
    shared = [p for p in inspect.signature(fdbpl_loss).parameters.values()
              if p.default is not inspect.Parameter.empty and p.name in trainer_defaults]
    assert {p.name for p in shared} >= {"lambda_neg", "lambda_sim", "lambda_pcd", "use_pcd", "pcd_reduction"}
    for p in shared:
        assert p.default == trainer_defaults[p.name], p.name


def test_threshold_weights_match_reference() -> None:
    x = _inputs(5, teacher_scale=4.0)
    w = kd_weights(x["teacher_logits"], "threshold", 0.5)
    ref = _ref_weights(x["teacher_logits"], "threshold", 0.5)
    assert w.tolist() == ref
    assert 0 < sum(ref) < B  # the seed gives both confident and unsure regions
    out = fdbpl_loss(**x, weight_mode="threshold")
    r = _ref_terms(x, mode="threshold")
    for key in ("pos", "neg", "sim", "pcd"):
        assert out[key].item() == pytest.approx(r[key], rel=1e-9, abs=1e-12), key


def test_bad_weight_mode() -> None:
    with pytest.raises(ValueError, match="weight_mode"):
        fdbpl_loss(**_inputs(), weight_mode="hard")


# --- weights --------------------------------------------------------------------------------------

def test_confident_teacher_gives_weight_one() -> None:
    x = _inputs(6)
    x["teacher_logits"] = torch.nn.functional.one_hot(torch.arange(B) % C, C).double() * 100.0
    w = kd_weights(x["teacher_logits"])
    torch.testing.assert_close(w, torch.ones(B, dtype=torch.float64), atol=1e-6, rtol=0)
    out = fdbpl_loss(**x)
    assert out["weight"].item() == pytest.approx(1.0, abs=1e-6)
    assert abs(out["neg"].item()) < 1e-4  # (1 − w) ≈ 0 switches the negative term off


def test_uniform_teacher_gives_weight_zero() -> None:
    x = _inputs(7)
    x["teacher_logits"] = torch.full((B, C), 2.5, dtype=torch.float64)
    out = fdbpl_loss(**x)
    assert out["weight"].item() == pytest.approx(0.0, abs=1e-12)
    assert out["pos"].item() == pytest.approx(0.0, abs=1e-12)
    assert out["sim"].item() == pytest.approx(0.0, abs=1e-12)
    mean_neg_entropy = sum(-_entropy_row(_softmax_row(r)) for r in x["neg_logits"].tolist()) / B
    assert out["neg"].item() == pytest.approx(mean_neg_entropy, rel=1e-9)


def test_single_class_weight_is_one() -> None:
    assert kd_weights(torch.randn(4, 1)).tolist() == [1.0] * 4


def test_weight_is_detached_and_teacher_gets_no_grad() -> None:
    x = _inputs(8)
    for k in x:
        x[k].requires_grad_(True)
    out = fdbpl_loss(**x)
    assert not out["weight"].requires_grad
    assert not kd_weights(x["teacher_logits"]).requires_grad
    out["total"].backward()
    assert x["teacher_logits"].grad is None or not x["teacher_logits"].grad.any()
    for k in ("pos_logits", "neg_logits", "image_features", "pos_text_features", "neg_text_features"):
        assert x[k].grad is not None and x[k].grad.abs().sum() > 0, k


# --- PCD ------------------------------------------------------------------------------------------

def test_pcd_gradient_reaches_both_text_sets_and_passes_gradcheck() -> None:
    x = _inputs(9)
    tp = x["pos_text_features"].clone().requires_grad_(True)
    tn = x["neg_text_features"].clone().requires_grad_(True)
    img = x["image_features"].clone().requires_grad_(True)
    out = fdbpl_loss(**{**x, "pos_text_features": tp, "neg_text_features": tn, "image_features": img})
    assert out["pcd"].item() > 0
    out["pcd"].backward()
    assert tp.grad.abs().sum() > 0 and tn.grad.abs().sum() > 0 and img.grad.abs().sum() > 0

    def pcd_only(f: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return fdbpl_loss(x["pos_logits"], x["neg_logits"], x["teacher_logits"], f, p, n)["pcd"]

    assert torch.autograd.gradcheck(pcd_only, (img.detach().requires_grad_(True), tp.detach().requires_grad_(True),
                                               tn.detach().requires_grad_(True)))


def test_pcd_gradient_matches_finite_differences_of_reference() -> None:
    x = _inputs(10)
    tp = x["pos_text_features"].clone().requires_grad_(True)
    fdbpl_loss(**{**x, "pos_text_features": tp})["pcd"].backward()
    w = _ref_weights(x["teacher_logits"])
    eps = 1e-6
    for c, k in [(0, 0), (1, 3), (2, 7), (4, 5)]:
        hi, lo = dict(x), dict(x)
        hi["pos_text_features"] = x["pos_text_features"].clone()
        lo["pos_text_features"] = x["pos_text_features"].clone()
        hi["pos_text_features"][c, k] += eps
        lo["pos_text_features"][c, k] -= eps
        fd = (_ref_pcd(hi, w) - _ref_pcd(lo, w)) / (2 * eps)
        assert tp.grad[c, k].item() == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_pcd_zero_when_all_teacher_classes_equal() -> None:
    x = _inputs(11)
    x["teacher_logits"] = torch.randn(B, C, dtype=torch.float64)
    x["teacher_logits"][:, 2] = 50.0
    tp = x["pos_text_features"].clone().requires_grad_(True)
    tn = x["neg_text_features"].clone().requires_grad_(True)
    out = fdbpl_loss(**{**x, "pos_text_features": tp, "neg_text_features": tn})
    assert out["pcd"].item() == 0.0
    out["pcd"].backward()
    for t in (tp, tn):
        assert t.grad is None or not t.grad.any()


def test_use_pcd_false_reproduces_released_behaviour() -> None:
    x = _inputs(12)
    on = fdbpl_loss(**x, lambda_pcd=1.0)
    off = fdbpl_loss(**x, lambda_pcd=1.0, use_pcd=False)
    assert off["pcd"].item() == 0.0
    assert on["pcd"].item() > 0
    torch.testing.assert_close(off["total"], on["pos"] + on["neg"] + 0.001 * on["sim"])


def test_pcd_loss_is_vectorised_over_the_batch() -> None:
    # A large C with a small batch must stay cheap: the cost is O(B²·D), never O(C²).
    g = torch.Generator().manual_seed(13)
    f = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)
    tp = torch.nn.functional.normalize(torch.randn(20000, 16, generator=g), dim=-1)
    tn = torch.nn.functional.normalize(torch.randn(20000, 16, generator=g), dim=-1)
    out = pcd_loss(f, tp, tn, torch.tensor([0, 19999, 5, 5]), torch.ones(4))
    assert out.shape == () and torch.isfinite(out)


# --- invariances and dtypes -----------------------------------------------------------------------

def test_teacher_shift_invariance() -> None:
    x = _inputs(14)
    a = fdbpl_loss(**x)
    b = fdbpl_loss(**{**x, "teacher_logits": x["teacher_logits"] + 17.0})
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_bf16_inputs_give_float32_outputs() -> None:
    x = {k: v.to(torch.bfloat16).requires_grad_(True) for k, v in _inputs(15).items()}
    out = fdbpl_loss(**x)
    for key, v in out.items():
        assert v.dtype == torch.float32, key
        assert torch.isfinite(v), key
    ref = fdbpl_loss(**{k: v.detach().float() for k, v in x.items()})
    for key in out:
        torch.testing.assert_close(out[key], ref[key])
    out["total"].backward()
    assert x["pos_logits"].grad.dtype == torch.bfloat16


def test_float32_inputs_stay_float32() -> None:
    out = fdbpl_loss(**_inputs(16, dtype=torch.float32))
    assert all(v.dtype == torch.float32 for v in out.values())


def test_returned_keys() -> None:
    assert set(fdbpl_loss(**_inputs())) == {"total", "pos", "neg", "sim", "pcd", "weight"}


# --- shape validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("key,bad,match", [
    ("pos_logits", torch.randn(B, C + 1), "neg_logits"),
    ("neg_logits", torch.randn(B, C + 1), "neg_logits"),
    ("teacher_logits", torch.randn(B + 1, C), "teacher_logits"),
    ("image_features", torch.randn(B + 1, D), "image_features"),
    ("pos_text_features", torch.randn(C + 1, D), "pos_text_features"),
    ("neg_text_features", torch.randn(C, D + 1), "neg_text_features"),
    ("pos_logits", torch.randn(B), "2-D"),
    ("image_features", torch.randn(B, D, 1), "2-D"),
])
def test_shape_errors(key: str, bad: torch.Tensor, match: str) -> None:
    x = {k: v.float() for k, v in _inputs().items()}
    x[key] = bad
    with pytest.raises(ValueError, match=match):
        fdbpl_loss(**x)


def test_empty_batch_rejected() -> None:
    x = {k: v.float() for k, v in _inputs().items()}
    x["pos_logits"] = x["neg_logits"] = x["teacher_logits"] = torch.randn(0, C)
    x["image_features"] = torch.randn(0, D)
    with pytest.raises(ValueError, match="non-empty"):
        fdbpl_loss(**x)


# --- CoOp baseline --------------------------------------------------------------------------------

def test_coop_loss_is_cross_entropy() -> None:
    logits = torch.randn(B, C, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    ref = sum(-math.log(_softmax_row(logits[i].tolist())[labels[i]]) for i in range(B)) / B
    assert coop_loss(logits, labels).item() == pytest.approx(ref, rel=1e-9)
    assert coop_loss(logits.bfloat16(), labels).dtype == torch.float32
    with pytest.raises(ValueError):
        coop_loss(logits, labels[:-1])


# --- the full-distribution entropy and the PCD reduction (K < C) -----------------------------------

def test_stored_entropy_drives_the_weights_not_the_top_k_rebuild() -> None:
    """A uniform teacher over C = 1000 classes: its top-20 rebuild alone would give w >= 1 - log 20 / log 1000;
    with the full entropy the weight is 0, as the spec says."""
    from fdbpl_hf.ril.replay import dense_teacher_logits

    c, k = 1000, 20
    full = torch.zeros(3, c)
    top = torch.log_softmax(full, -1).topk(k)
    rebuilt = dense_teacher_logits(top.indices, top.values, c)
    from_top_k = kd_weights(rebuilt)
    # the 0.3 bug: ~0.56 (just under 1 - log K / log C = 0.566, the MR fill's tail adds a little entropy)
    assert (from_top_k > 0.55).all()
    stored = torch.full((3,), math.log(c))  # H of the full uniform distribution
    torch.testing.assert_close(kd_weights(rebuilt, entropy=stored), torch.zeros(3))
    # and in the objective: no positive loss and full negative weight on a meaningless region
    x = _inputs(0, dtype=torch.float32)
    x["teacher_logits"] = torch.zeros(B, C)
    out = fdbpl_loss(**x, teacher_entropy=torch.full((B,), math.log(C)))
    assert float(out["weight"]) == pytest.approx(0.0, abs=1e-6) and float(out["pos"]) == pytest.approx(0.0, abs=1e-6)


def test_entropy_argument_equals_computing_it() -> None:
    x = _inputs(3)
    p = torch.log_softmax(x["teacher_logits"], -1)
    h = -(p.exp() * p).sum(-1)
    for mode in ("soft", "threshold"):
        torch.testing.assert_close(kd_weights(x["teacher_logits"], mode, entropy=h), kd_weights(x["teacher_logits"], mode))
    a, b = fdbpl_loss(**x), fdbpl_loss(**x, teacher_entropy=h)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    with pytest.raises(ValueError, match=r"entropy must be \[B\]"):
        kd_weights(x["teacher_logits"], entropy=h[:2])


def test_pcd_sum_reduction_is_mean_times_valid_pairs() -> None:
    x = _inputs(1)
    labels = x["teacher_logits"].argmax(-1)
    valid = int((labels[:, None] != labels[None, :]).sum())
    assert valid > 0
    args = (torch.nn.functional.normalize(x["image_features"], dim=-1),
            torch.nn.functional.normalize(x["pos_text_features"], dim=-1),
            torch.nn.functional.normalize(x["neg_text_features"], dim=-1), labels, torch.rand(B, dtype=torch.float64))
    torch.testing.assert_close(pcd_loss(*args, reduction="sum"), pcd_loss(*args) * valid)
    out = fdbpl_loss(**x, pcd_reduction="sum")
    torch.testing.assert_close(out["pcd"], torch.tensor(_ref_terms(x)["pcd"] * valid, dtype=torch.float64))
    with pytest.raises(ValueError, match="reduction"):
        pcd_loss(*args, reduction="max")
