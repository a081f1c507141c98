"""ModelState (snapshotd_client.modstate): ``state_dict()`` from a recipe while the model
stays as it was. Whatever changes between two calls -- a parameter replaced or added, a
buffer made non-persistent, a submodule swapped, a dict edited behind the module's back,
a hook, a class swap -- the result must equal what ``model.state_dict()`` gives now: the
same keys in the same order, ``_metadata``, the same storages and values, distinct
objects; and an unchanged model must be served from the recipe (``hits``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from snapshotd_client.modstate import ModelState


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)) for _ in range(2)])
        self.shared = nn.Linear(4, 4, bias=False)
        self.again = self.shared  # one module at two places of the tree
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight  # tied weights
        self.register_buffer("scratch", torch.zeros(3), persistent=False)
        self.register_buffer("mask", torch.ones(2))
        self.register_parameter("unused", None)


def _same(ms: ModelState, model: nn.Module) -> None:
    got, want = ms(), model.state_dict()
    assert list(got) == list(want)
    assert got._metadata == want._metadata
    held = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    for k in want:
        a, b = got[k], want[k]
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), k
        if b.data_ptr() in held:  # not a tensor a hook made for this call
            assert a.data_ptr() == b.data_ptr(), k
    assert len(set(map(id, got.values()))) == len(got)  # distinct objects, as state_dict()'s


def test_an_unchanged_model_is_served_from_the_recipe():
    model = _Tied()
    ms = ModelState(model)
    for _ in range(3):
        _same(ms, model)
    assert (ms.hits, ms.misses) == (2, 1)
    assert "head.weight" in ms() and "again.weight" in ms() and "scratch" not in ms()


def _replace_param(m):
    m.blocks[0][0].weight = nn.Parameter(torch.full((4, 4), 3.0))


def _edit_dict(m):
    m.blocks[1][0]._parameters["bias"] = nn.Parameter(torch.full((4,), 5.0))


def _rename_in_dict(m):
    d = m.blocks[1][0]._parameters
    d["b2"] = d.pop("bias")


def _non_persistent(m):
    m.register_buffer("mask", m.mask, persistent=False)  # the same tensor, now left out


def _persistent(m):
    m.register_buffer("scratch", m.scratch, persistent=True)


def _swap_module(m):
    m.blocks[0][1] = nn.LayerNorm(4)


def _add_module(m):
    m.extra = nn.Linear(2, 2)


def _drop_module(m):
    del m.blocks[1]


def _untie(m):
    m.head.weight = nn.Parameter(m.emb.weight.detach().clone())


def _post_hook(m):
    def hook(module, sd, prefix, local_metadata):
        sd[prefix + "hooked"] = torch.ones(1)
    m.blocks[0].register_state_dict_post_hook(hook) if hasattr(m.blocks[0], "register_state_dict_post_hook") \
        else m.blocks[0]._register_state_dict_hook(hook)


def _instance_override(m):
    orig = m.shared._save_to_state_dict

    def save(destination, prefix, keep_vars):
        orig(destination, prefix, keep_vars)
        destination[prefix + "extra_key"] = torch.zeros(1)
    m.shared._save_to_state_dict = save


def _parametrize(m):
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x
    parametrize.register_parametrization(m.blocks[0][0], "weight", Double())


def _assign_load(m):
    m.load_state_dict({k: v.clone() + 1 for k, v in m.state_dict().items()}, assign=True)


def _set_none(m):
    m.blocks[0][0].bias = None


@pytest.mark.parametrize("change", [
    _replace_param, _edit_dict, _rename_in_dict, _non_persistent, _persistent, _swap_module,
    _add_module, _drop_module, _untie, _post_hook, _instance_override, _parametrize,
    _assign_load, _set_none])
def test_every_change_is_what_state_dict_gives_now(change):
    model = _Tied()
    ms = ModelState(model)
    _same(ms, model)
    _same(ms, model)
    change(model)
    _same(ms, model)
    _same(ms, model)
    assert ms.misses >= 2  # the change was seen (and, when still plain, a new recipe made)


def test_values_change_in_place_without_a_new_walk():
    model = _Tied()
    ms = ModelState(model)
    ms()
    with torch.no_grad():
        model.blocks[0][0].weight.add_(1.0)
    model.train()
    model.blocks[0][1](torch.randn(3, 4))  # BatchNorm's running stats, in place
    _same(ms, model)
    assert ms.misses == 1


class _WithExtra(nn.Linear):
    def get_extra_state(self):
        return {"calls": 1}

    def set_extra_state(self, state):
        pass


class _OwnStateDict(nn.Linear):
    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        sd["mine"] = torch.zeros(1)
        return sd


@pytest.mark.parametrize("inner", [_WithExtra, _OwnStateDict])
def test_models_it_does_not_cover_get_state_dict_every_time(inner):
    model = nn.Sequential(nn.Linear(2, 2), inner(2, 2))
    ms = ModelState(model)
    for _ in range(3):
        got, want = ms(), model.state_dict()
        assert list(got) == list(want)
    assert ms.hits == 0 and ms.misses == 3 and ms._recipe is None


def test_a_module_with_a_pre_hook_is_not_covered():
    model = nn.Sequential(nn.Linear(2, 2))
    calls = []
    model[0].register_state_dict_pre_hook(lambda module, prefix, keep_vars: calls.append(prefix))
    ms = ModelState(model)
    ms()
    ms()
    assert calls == ["0.", "0."] and ms.hits == 0


class _Sub(torch.Tensor):
    pass


def test_a_model_holding_tensor_subclasses_is_not_covered():
    model = nn.Linear(2, 2)
    model.register_buffer("odd", torch.zeros(2).as_subclass(_Sub))
    ms = ModelState(model)
    for _ in range(2):
        got = ms()
        assert type(got["odd"]) is _Sub and not got["weight"].requires_grad  # state_dict()'s, detached
    assert ms.hits == 0 and ms._recipe is None


def test_a_scripted_module_and_a_stripped_one_fall_back_to_state_dict():
    scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 2)))
    ms = ModelState(scripted)
    for _ in range(2):
        assert list(ms()) == list(scripted.state_dict())
    assert ms.hits == 0
    model = nn.Sequential(nn.Linear(2, 2))
    ms = ModelState(model)
    ms()
    del model[0].__dict__["_state_dict_hooks"]  # what the walk reads, gone: no crash, no recipe
    with pytest.raises(AttributeError):
        model.state_dict()  # state_dict() itself fails on such a module, and so does the save
    with pytest.raises(AttributeError):
        ms()
