"""Each classifier loss against a hand computation on fixed tensors."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distillkit.methods.dkd import dkd_terms
from distillkit.methods.kd import kd_loss

S = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, -1.0]], dtype=torch.float64)
T_ = torch.tensor([[1.5, 0.3, 0.2], [0.0, 3.0, 0.5]], dtype=torch.float64)
Y = torch.tensor([0, 1])


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def hand_kd(s, t, T):
    total = 0.0
    for zs, zt in zip(s.numpy(), t.numpy()):
        ps, pt = softmax(zs / T), softmax(zt / T)
        total += float(np.sum(pt * (np.log(pt) - np.log(ps))))
    return total / len(s) * T * T  # batchmean, times T^2


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_loss_matches_hand_computation(T):
    assert kd_loss(S, T_, T).item() == pytest.approx(hand_kd(S, T_, T), rel=1e-6)


def test_kd_reduction_mean_would_fail():
    """reduction='mean' divides by the number of classes too: the hand value rejects it."""
    T = 4.0
    wrong = F.kl_div(F.log_softmax(S / T, 1), F.softmax(T_ / T, 1), reduction="mean") * T * T
    assert wrong.item() != pytest.approx(hand_kd(S, T_, T), rel=1e-3)
    assert wrong.item() == pytest.approx(hand_kd(S, T_, T) / S.shape[1], rel=1e-6)


def test_kd_loss_zero_when_logits_equal_and_gradient_flows():
    s = S.clone().requires_grad_(True)
    assert kd_loss(s, S, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    kd_loss(s, T_, 4.0).backward()
    assert s.grad.abs().sum() > 0


def hand_dkd(s, t, y, T):
    tckd = nckd = 0.0
    for zs, zt, c in zip(s.numpy(), t.numpy(), y.numpy()):
        ps, pt = softmax(zs / T), softmax(zt / T)
        bs = np.array([ps[c], 1 - ps[c]])
        bt = np.array([pt[c], 1 - pt[c]])
        tckd += float(np.sum(bt * np.log(bt / bs)))
        keep = np.arange(len(zs)) != c
        qs, qt = softmax(zs[keep] / T), softmax(zt[keep] / T)
        nckd += float(np.sum(qt * np.log(qt / qs)))
    n = len(s)
    return tckd / n * T * T, nckd / n * T * T


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_terms_match_hand_computation(T):
    tckd, nckd = dkd_terms(S, T_, Y, T)
    h_tckd, h_nckd = hand_dkd(S, T_, Y, T)
    assert tckd.item() == pytest.approx(h_tckd, rel=1e-5)
    assert nckd.item() == pytest.approx(h_nckd, rel=1e-5)


def test_dkd_reformulates_kd():
    """Zhao et al. eq. (5), per sample: KD = TCKD + (1 - p_t^T) NCKD."""
    T = 2.0
    for i in range(len(S)):
        s, t, y = S[i : i + 1], T_[i : i + 1], Y[i : i + 1]
        tckd, nckd = dkd_terms(s, t, y, T)
        pt_target = F.softmax(t / T, 1)[0, y[0]]
        assert kd_loss(s, t, T).item() == pytest.approx((tckd + (1 - pt_target) * nckd).item(), rel=1e-5)


def test_dkd_warmup_factor_is_linear_in_epochs():
    from distillkit.methods.dkd import DKD
    from distillkit.models.cnn import DigitsCNN

    m = DKD(DigitsCNN(4), teacher=DigitsCNN(4), warmup_epochs=4)
    assert m.warmup_factor() == pytest.approx(0.25)  # epoch 1 of 4 (1-based, as mdistiller)
    m.warmup_epochs = 0
    assert m.warmup_factor() == 1.0


def test_fitnet_hint_is_mse_of_connector_output():
    from distillkit.methods.fitnet import FitNet
    from distillkit.models.cnn import DigitsCNN

    torch.manual_seed(0)
    student, teacher = DigitsCNN(4), DigitsCNN(8).eval()
    m = FitNet(student, teacher=teacher, student_layer="block2", teacher_layer="block2",
               hint_weight=2.0, ce_weight=0.5, input_shape=(1, 8, 8))
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    terms = m.losses(x, y)
    s_feat = student.block2(student.block1(x))
    with torch.no_grad():
        t_feat = teacher.block2(teacher.block1(x))
    hint = ((m.connector(s_feat) - t_feat) ** 2).mean()
    ce = F.cross_entropy(student(x), y)
    assert terms["hint"].item() == pytest.approx(hint.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(0.5 * ce.item() + 2.0 * hint.item(), rel=1e-5)
    assert tuple(m.connector(s_feat).shape) == tuple(t_feat.shape)


def test_fitnet_unknown_layer_names_the_key():
    from distillkit.errors import DistillError
    from distillkit.methods.fitnet import FitNet
    from distillkit.models.cnn import DigitsCNN

    with pytest.raises(DistillError, match="method.student_layer='block9'.*block1"):
        FitNet(DigitsCNN(4), teacher=DigitsCNN(8), student_layer="block9", teacher_layer="block2",
               input_shape=(1, 8, 8))
